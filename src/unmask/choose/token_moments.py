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
hooks again while it recomputes: the recomputed outputs get hooks of their own, and which
ones fire depends on the checkpoint implementation (see the test with torch.utils.checkpoint).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

_NORMS = (nn.LayerNorm, nn.RMSNorm)


def conv1d_type() -> type | None:
    """transformers' Conv1D (GPT-2: y = x W + b, W stored in x out); None without transformers."""
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


def covered_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters whose per-token moments `TokenMoments` can gather: those owned by
    a supported module whose own forward runs (not the out_proj of nn.MultiheadAttention, whose
    weight is used functionally)."""
    conv1d = conv1d_type()
    inside_mha = {
        id(sub) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
        for sub in m.modules()
    }  # fmt: skip
    return {
        id(p)
        for module in model.modules()
        if id(module) not in inside_mha and _kind(module, conv1d) is not None
        for p in module.parameters(recurse=False)
    }


class TokenMoments:
    """Σ_t g_t² for the parameters of `params` that sit in a supported module (see above).

    `moments(param)` is a float32 tensor of the parameter's shape (None if it saw no backward
    since the last `clear()`). Collection runs only while `active` is True and gradients are
    enabled; `remove()` takes the hooks off the model, and so does dropping this object (the
    hooks hold it weakly, so a dropped optimizer leaves nothing running on the model).
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        wanted = {id(p) for p in params} & covered_parameters(model)
        self.active = True
        self._sums: dict[int, Tensor] = {}
        self._handles: list = []
        self.covered: set[int] = set()
        conv1d = conv1d_type()
        this = weakref.ref(self)
        for module in model.modules():
            kind = _kind(module, conv1d)
            own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
            if kind is None or not own:
                continue
            self.covered.update(id(p) for p in own)
            self._handles.append(
                module.register_forward_hook(_forward_hook(this, kind), with_kwargs=True)
            )
        weakref.finalize(self, _remove_all, self._handles)

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

    @torch.no_grad()
    def _backward(self, kind: str, module: nn.Module, x: Tensor, dy: Tensor) -> None:
        if not self.active:
            return
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        dy, dy_scale = _scaled(dy)
        dy2 = dy.square().reshape(-1, dy.shape[-1])
        if kind == "embedding":
            if _tracked(self, weight):
                rows = torch.zeros(weight.shape, dtype=torch.float32, device=dy.device)
                rows.index_add_(0, x.reshape(-1), dy2)
                self._add(weight, rows, dy_scale)
            return
        if kind == "norm":
            xs, x_scale = _scaled(_normalized(module, x))
            if _tracked(self, weight):
                x2 = xs.square().reshape(-1, dy.shape[-1])
                self._add(weight, (dy2 * x2).sum(0), dy_scale * x_scale)
        elif _tracked(self, weight):
            xs, x_scale = _scaled(x)
            x2 = xs.square().reshape(-1, x.shape[-1])
            product = dy2.T @ x2 if kind == "linear" else x2.T @ dy2
            self._add(weight, product, dy_scale * x_scale)
        if _tracked(self, bias):
            self._add(bias, dy2.sum(0), dy_scale)

    def _add(self, param: Tensor, value: Tensor, scale: Tensor) -> None:
        value = value.div_(scale.square())  # undo _scaled: the true Σ_t g_t²
        key = id(param)
        if key in self._sums:
            self._sums[key].add_(value.view(param.shape))
        else:
            self._sums[key] = value.view(param.shape)


def _forward_hook(ref: weakref.ref, kind: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        moments = ref()
        if moments is None or not (moments.active and torch.is_grad_enabled()):
            return
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        # The input is the first argument, given by position or by name (input=...).
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, Tensor):
            return

        def backward(dy: Tensor) -> None:
            alive = ref()
            if alive is not None:
                alive._backward(kind, module, x, dy)

        # The closure keeps this call's input: a module called twice gets two hooks.
        output.register_hook(backward)

    return hook


def _remove_all(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _scaled(t: Tensor) -> tuple[Tensor, Tensor]:
    """`t` in float32 times a power of two that brings its largest magnitude to [0.5, 1), and
    that factor (a 0-d tensor, >= 1: only small values are scaled up). Squares of values below
    ~1e-23 underflow float32; scaling first keeps Σ_t g_t² right for tiny gradients (the key
    would otherwise exceed its bound and rank first). No host synchronisation."""
    t = t.detach().float()
    if not t.numel():
        return t, torch.ones((), device=t.device)
    _, exponent = torch.frexp(t.abs().amax())
    scale = torch.ldexp(torch.ones((), device=t.device), (-exponent).clamp(min=0))
    return t * scale, scale


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
    dtype = x.dtype
    x = x.detach().float()
    if isinstance(module, nn.LayerNorm):
        return nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    if eps is None:  # torch's nn.RMSNorm(eps=None) uses the input dtype's machine epsilon
        eps = torch.finfo(dtype).eps
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
