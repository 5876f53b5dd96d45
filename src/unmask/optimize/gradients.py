"""What happens to the gradients a step uses: the non-finite guard and clipping."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from unmask.optimize.sharding import local

if TYPE_CHECKING:
    from unmask.optimize.selector import Selector
    from unmask.optimize.sharding import Shards


def step_is_finite(
    selector: Selector, dense_params: list[Tensor], shards: Shards | None, gather: bool
) -> bool:
    """Whether every gradient that would enter the weights or the optimizer state is finite.

    Only selected weights and dense parameters are checked (O(B) plus the dense size): weights
    chosen this step are finite, since non-finite scores are never selected. `gather`: read the
    slots' gradients from the parameters' `.grad` first. Under FSDP the answer is every rank's
    (collective): the ranks must skip a step together.
    """
    finite = selector.gradients_finite(gather=gather) and all(
        bool(torch.isfinite(local(p.grad)).all()) for p in dense_params if p.grad is not None
    )
    return finite if shards is None else shards.all_true(finite)


def check_max_nonfinite_steps(value: int) -> int:
    """`value` if it is a valid max_nonfinite_steps (>= 0), else ValueError."""
    if value < 0:
        raise ValueError(f"max_nonfinite_steps must be >= 0, got {value}")
    return value


def warn_or_stop(steps_done: int, in_a_row: int, in_all: int, max_in_a_row: int) -> None:
    """Warn that step `steps_done` was skipped for a non-finite gradient; FloatingPointError
    once more than `max_in_a_row` steps in a row were skipped."""
    message = (
        f"step {steps_done}: non-finite gradient in a selected or dense weight; the step "
        f"was skipped ({in_a_row} in a row, {in_all} in all)"
    )
    if in_a_row > max_in_a_row:
        raise FloatingPointError(
            f"{message}; more than max_nonfinite_steps={max_in_a_row} in a row, "
            "so training stops: lower the learning rate, check the data for bad examples, or "
            "resume from the last checkpoint"
        )
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def squared_norm(grads: list[Tensor]) -> Tensor | int:
    """Σ ||g||² over `grads` (a float64 scalar, 0 for none; each norm taken in float32)."""
    return sum(torch.linalg.vector_norm(g, dtype=torch.float32).double().square() for g in grads)


def scale_to_norm(grads: list[Tensor], norm: Tensor, max_norm: float) -> Tensor:
    """Scale `grads` in place by max_norm / (norm + 1e-6) if that is below 1; returns `norm`."""
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return norm


def clip_grad_norm_(grads: list[Tensor], max_norm: float, shards: Shards | None) -> Tensor:
    """Scale `grads` so that their global L2 norm is <= max_norm; returns the norm before.
    Under FSDP (`shards`) the norm of the full gradients, from every rank (collective)."""
    if shards is not None:
        norm = shards.total_norm(grads)
    else:
        norm = torch.nn.utils.get_total_norm(grads).cpu() if grads else torch.tensor(0.0)
    return scale_to_norm(grads, norm, max_norm)
