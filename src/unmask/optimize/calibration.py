"""Calibration for methods that choose their mask before training from several batches (FISH).

The empirical Fisher of a weight is Σ g² over the calibration batches' gradients. Under FSDP the
gradient of each batch is already averaged over the ranks, and each rank sums its own shard's
rows; under DDP without FSDP, `unmask.integrations.trainer.calibrate_across_processes` averages each
batch's gradients first, so every process ranks the same sums.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from unmask.optimize.sharding import local as _local

LossFn = Callable[[nn.Module, Any], Tensor]


def fisher_sums(
    model: nn.Module,
    params: list[Tensor],
    batches: Iterable[Any],
    loss_fn: LossFn | None,
    num_batches: int | None,
    zero_grad: Callable[[], None],
) -> list[Tensor]:
    """Σ g² of each of `params` (float32, this process's part's shape) over at most
    `num_batches` of `batches` (ValueError if there is none).

    `loss_fn(model, batch)` returns the loss; by default ``model(**batch).loss``. `zero_grad`
    clears the gradients before each batch and after the last. Holds one float32 accumulator
    per parameter.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    fisher = [torch.zeros_like(_local(p), dtype=torch.float32) for p in params]
    used = 0
    for batch in batches:
        if num_batches is not None and used >= num_batches:
            break
        zero_grad()
        with torch.enable_grad():
            loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
            loss.backward()
        for acc, p in zip(fisher, params, strict=True):
            if p.grad is not None:
                grad = _local(p.grad)  # under FSDP: this rank's rows of the averaged gradient
                acc.addcmul_(grad, grad)
        used += 1
    zero_grad()
    if used == 0:
        raise ValueError("calibrate() got no batches; pass at least one batch")
    return fisher
