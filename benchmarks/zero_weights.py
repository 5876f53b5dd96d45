"""Count the pretrained weights that are exactly zero, per tensor, in the benchmark models.

    .venv/bin/python -m benchmarks.zero_weights [--out benchmarks/results/quality]

PaFi ranks the smallest |θ| first, so exact zeros are the first weights it picks; when a model
has more of them than the budget, its mask is only those zeros (the quality benchmark's decoder
runs). Writes OUT/zero_weights.json: per model, the total, the count of exact zeros and the
zeros per tensor (tensors without any are left out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModel

from unmask.app.models import MODEL_ALIASES, resolve_model
from unmask.store.files import atomic_write_text


def count_zeros(model: torch.nn.Module) -> dict:
    """{"weights": int, "zeros": int, "zeros_per_tensor": {name: int}} over named_parameters."""
    per_tensor = {}
    total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        zeros = int((param.detach() == 0).sum())
        if zeros:
            per_tensor[name] = zeros
    return {"weights": total, "zeros": sum(per_tensor.values()), "zeros_per_tensor": per_tensor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    args = parser.parse_args()
    result = {}
    for alias in MODEL_ALIASES:
        model = AutoModel.from_pretrained(resolve_model(alias), dtype=torch.float32)
        result[alias] = count_zeros(model)
        print(f"{alias}: {result[alias]['zeros']:,} of {result[alias]['weights']:,} weights are 0")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "zero_weights.json", json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
