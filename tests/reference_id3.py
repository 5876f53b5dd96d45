"""A deliberately simple dense reference implementation of ID3, used as a test oracle.

Dense boolean masks, dense delta tensors, dense optimizer state and a brute-force global top-k
over one concatenated score vector. Slow and memory-hungry on purpose: it shares no code with
the library, so agreement between the two is evidence that the sparse implementation is right.
"""

from __future__ import annotations

import torch


def run_reference(
    model,
    batches,
    budget: int,
    total_steps: int,
    lr: float,
    weight_decay: float,
    score_eps: float,
    score_exp: float,
    adam_step: str,
    betas=(0.9, 0.999),
    adam_eps: float = 1e-8,
):
    """Train `model` in place with dense-reference ID3 + AdamW; return the masks after each step."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    base = [p.detach().clone() for p in params]
    masks = [torch.zeros_like(p, dtype=torch.bool) for p in params]
    deltas = [torch.zeros_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    age = [torch.zeros_like(p) for p in params]
    history = []
    for t, batch in enumerate(batches):
        for p in params:
            p.grad = None
        model(**batch).loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        target = budget if t >= total_steps - 1 else budget * (t + 1) // total_steps
        k = target - sum(int(mask.sum()) for mask in masks)
        if k > 0:
            keys = torch.cat(
                [
                    _d3(p.detach(), g, score_eps, score_exp).flatten()
                    for p, g in zip(params, grads, strict=True)
                ]
            )
            taken = torch.cat([mask.flatten() for mask in masks])
            eligible = (~taken) & torch.isfinite(keys) & (keys > _floor(score_exp))
            candidates = eligible.nonzero().flatten().tolist()
            # Lexicographic: largest key first, then lowest global index.
            candidates.sort(key=lambda i: (-keys[i].item(), i))
            flat_taken = taken.clone()
            flat_taken[candidates[:k]] = True
            start = 0
            for j, mask in enumerate(masks):
                masks[j] = flat_taken[start : start + mask.numel()].view_as(mask)
                start += mask.numel()
        history.append([mask.clone() for mask in masks])
        with torch.no_grad():
            beta1, beta2 = betas
            step_no = t + 1
            for j, p in enumerate(params):
                g = torch.where(masks[j], grads[j], torch.zeros_like(grads[j]))
                age[j] += masks[j].to(age[j].dtype)
                deltas[j].mul_(torch.where(masks[j], 1 - lr * weight_decay, 1.0))
                m[j] = beta1 * m[j] + (1 - beta1) * g
                v[j] = beta2 * v[j] + (1 - beta2) * g * g
                n = age[j] if adam_step == "per-weight" else torch.full_like(age[j], step_no)
                n = n.clamp(min=1)
                m_hat = m[j] / (1 - beta1**n)
                v_hat = v[j] / (1 - beta2**n)
                update = lr * m_hat / (v_hat.sqrt() + adam_eps)
                deltas[j] -= torch.where(masks[j], update, torch.zeros_like(update))
                p.copy_(torch.where(masks[j], base[j] + deltas[j], base[j]))
    return history


def _d3(p, g, eps, exp):
    if exp == 0:
        return g.abs()
    if exp == 1:
        return g.abs() / (p.abs() + eps)
    return (p.abs() + eps).log().mul(-exp).add(g.abs().log())


def _floor(exp):
    return 0.0 if exp in (0, 1) else float("-inf")
