"""Learning-rate search for the default job, on the validation split (never the test split).

Runs `unmask train`'s default job (MiniLM, sentence polarity, ID3, 0.1%) once per learning rate
with evaluation on the 400-sentence validation split, and writes one record per rate. The best
rate becomes the default of `unmask train` (`TrainConfig.lr`).

    .venv/bin/python benchmarks/default_job_lr.py --out benchmarks/results/default_job_lr.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from unmask.files import atomic_write_text
from unmask.train import TrainConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            report = run(TrainConfig(lr=lr, eval_split="validation", output=folder, progress=False))
        records.append(
            {
                "lr": lr,
                "validation_accuracy": report["accuracy"],
                "train_seconds": report["train_seconds"],
                "steps": report["steps"],
                "weights_changed": report["weights_changed"],
            }
        )
        print(json.dumps(records[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
