"""Adam / AdamW over flat slot buffers, with one step count per slot.

The selective optimizer keeps the selected weights' deltas in one flat tensor whose slots are
filled as weights are unmasked. torch's Adam keeps a single step count per tensor, so a weight
unmasked at step s gets the bias correction of step s instead of step 1: its first update is
lr * g * (1 - b1) / (1 - b1^s) / sqrt(g^2 (1 - b2) / (1 - b2^s)) — about 0.5 lr at s = 10, lr at
s = 100, 2.5 lr at s = 1000 and up to 3.2 lr later (default betas), instead of Adam's lr.
`SlotAdamW` keeps a step count per slot and corrects each weight by its own age; the selective
optimizer zeroes a slot's state (its count included) when a weight is assigned to it.

Unused slots have zero gradient and zero moments, so their update is exactly zero.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


class SlotAdamW(torch.optim.Optimizer):
    """Adam (decoupled=False: L2 added to the gradient) or AdamW (decoupled=True).

    State per parameter (all of the parameter's shape): exp_avg, exp_avg_sq, and step (float32,
    the number of updates each element has received since its slot was last reset).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        decoupled: bool = True,
    ) -> None:
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not _is_real(value) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise ValueError(f"betas must be two finite numbers in [0, 1), got {betas!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, self.state[p], group)
        return loss

    @staticmethod
    def _update(p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        if not state:
            state["step"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
        step.add_(1)
        if wd != 0:
            if group["decoupled"]:
                p.mul_(1 - lr * wd)
            else:
                grad = grad.add(p, alpha=wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt_()
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
        p.sub_(exp_avg.div(bias_correction1).div_(denom).mul_(lr))


def _is_real(value) -> bool:
    """A real number (a 0-d tensor counts): something `math.isfinite` and `<` can judge."""
    if torch.is_tensor(value):
        return value.ndim == 0 and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
