"""Per-token second moments of weight gradients, collected by module hooks during backward.

A weight's gradient over a batch is a sum of per-token contributions, g = Σ_t g_t. For the
modules that make up transformers these contributions have a closed form, so Σ_t g_t² can be
computed from what the backward pass already has, without per-example gradients:

    nn.Linear  (y = x Wᵀ + b)        Σ_t g_t²[r, c] = Σ_t dy[t, r]² · x[t, c]²   (one GEMM)
    Conv1D     (y = x W + b, HF GPT-2) the same with W transposed
    nn.Embedding (y[t] = W[id_t])   Σ_t g_t²[v, :] = Σ_{t: id_t = v} dy[t, :]²
    LayerNorm / RMSNorm (y = x̂ ⊙ w + b)  Σ_t g_t²[c] = Σ_t dy[t, c]² · x̂[t, c]²
    biases of all of them           Σ_t dy[t, r]²

The hook on a module's output runs when the output's gradient dy is complete and before the
module's own backward, so the moments of a parameter are ready when its gradient is (also in
the low-memory mode's post-accumulate-grad hooks). A module called several times in one forward
(shared layers, tied embeddings) adds one term per call. Gradient checkpointing runs forward
hooks again during backward and would count those calls twice: not supported.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_NORMS = (nn.LayerNorm, nn.RMSNorm)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def _is_rms_norm(module: nn.Module) -> bool:
    """Hugging Face's own RMSNorm classes (Llama, Qwen, Mistral, T5, Gemma ...): a 1-D gain."""
    weight = getattr(module, "weight", None)
    return (
        ("RMSNorm" in type(module).__name__ or type(module).__name__ == "T5LayerNorm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
    )


class TokenMoments:
    """Σ_t g_t² for the parameters of `params` that sit in a supported module (see above).

    `moments(param)` is a float32 tensor of the parameter's shape (None if it saw no backward
    since the last `clear()`). Collection runs only while `active` is True and gradients are
    enabled; `remove()` takes the hooks off the model.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        wanted = {id(p) for p in params}
        self.active = True
        self._sums: dict[int, Tensor] = {}
        self._handles = []
        self.covered: set[int] = set()
        conv1d = _conv1d_type()
        for module in model.modules():
            kind = _kind(module, conv1d)
            if kind is None:
                continue
            own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
            if own:
                self.covered.update(id(p) for p in own)
                self._handles.append(
                    module.register_forward_hook(self._forward_hook(kind), with_kwargs=True)
                )

    def moments(self, param: Tensor) -> Tensor | None:
        return self._sums.get(id(param))

    def release(self, param: Tensor) -> None:
        """Free one parameter's moments (low-memory mode, once its keys are taken)."""
        self._sums.pop(id(param), None)

    def clear(self) -> None:
        self._sums.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._sums.clear()

    # ------------------------------------------------------------------ hooks

    def _forward_hook(self, kind: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            if not (self.active and torch.is_grad_enabled()):
                return
            if not (isinstance(output, Tensor) and output.requires_grad):
                return
            # The input is the first argument, given by position or by name (input=...).
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, Tensor):
                return
            # The closure keeps this call's input: a module called twice gets two hooks.
            output.register_hook(lambda dy: self._backward(kind, module, x, dy))

        return hook

    @torch.no_grad()
    def _backward(self, kind: str, module: nn.Module, x: Tensor, dy: Tensor) -> None:
        if not self.active:
            return
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        dy2 = dy.detach().float().square().reshape(-1, dy.shape[-1])
        if kind == "embedding":
            if _tracked(self, weight):
                rows = torch.zeros(weight.shape, dtype=torch.float32, device=dy.device)
                rows.index_add_(0, x.reshape(-1), dy2)
                self._add(weight, rows)
            return
        if kind == "norm":
            x2 = _normalized(module, x).float().square().reshape(-1, dy.shape[-1])
            if _tracked(self, weight):
                self._add(weight, (dy2 * x2).sum(0))
        elif _tracked(self, weight):
            x2 = x.detach().float().square().reshape(-1, x.shape[-1])
            self._add(weight, dy2.T @ x2 if kind == "linear" else x2.T @ dy2)
        if _tracked(self, bias):
            self._add(bias, dy2.sum(0))

    def _add(self, param: Tensor, value: Tensor) -> None:
        key = id(param)
        if key in self._sums:
            self._sums[key].add_(value.view(param.shape))
        else:
            self._sums[key] = value.view(param.shape)


def _tracked(moments: TokenMoments, param) -> bool:
    return isinstance(param, Tensor) and id(param) in moments.covered and param.requires_grad


def _kind(module: nn.Module, conv1d: type | None) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, _NORMS) or _is_rms_norm(module):
        weight = getattr(module, "weight", None)
        # Gains over more than the last dimension have no closed form here.
        return "norm" if weight is None or weight.dim() == 1 else None
    return None


def _normalized(module: nn.Module, x: Tensor) -> Tensor:
    """x̂, the normalised input that a norm layer's gain multiplies."""
    x = x.detach().float()
    if isinstance(module, nn.LayerNorm):
        return nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-6
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
