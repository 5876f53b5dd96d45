"""Fingerprints of base tensors: how a delta recognises the model it was trained from.

A delta records a sha256 of each base tensor it changes and of each tensor those changes depend
on; `SparseDelta.apply_` refuses a model whose tensors do not match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from unmask.store.delta_format import dtype_name


def tensor_hash(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (hex, first 32 characters)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{dtype_name(tensor.dtype)}{tuple(tensor.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]


def dependent_parameters(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Parameters of `model` that the changes to the parameters `names` depend on, sorted.

    A change to an adapter weight means something only together with the rest of its adapter:
    for a peft LoRA layer (``q.lora_B.default.weight``) that is every parameter of the layer
    ``q`` (lora_A, lora_B, the base layer). Other parameters depend on nothing else, so deltas
    that change different tensors of an ordinary model can be applied one after another.
    """
    all_names = [n for n, _ in model.named_parameters()]
    found: set[str] = set()
    for name in names:
        parts = name.split(".")
        cut = next((i for i, part in enumerate(parts) if part.startswith("lora_")), None)
        if cut:
            layer = ".".join(parts[:cut]) + "."
            found.update(n for n in all_names if n.startswith(layer))
    return sorted(found)
