"""Selection strategies. Each method says which weights compete, how they are ranked, and
what it needs (its capability fields).

Adding a method is one class here plus one line in METHODS: the optimizer, the CLI and the
tests read its fields (`kind`, `takes_budget`, `needs_total_steps`, `needs_calibration`,
`supports_low_memory`, `supports_fsdp`, `distributed`), never its name.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from unmask.choose import scores
from unmask.choose.token_moments import TokenMoments, covered_parameters

Kind = Literal["increment", "repeat", "static", "all", "dense"]


@dataclass
class Method:
    """Base strategy.

    kind:
      increment  a few new weights every step by the schedule; the mask only grows (ID3);
      repeat     a fresh top-B every step; weights that leave stay at their current value;
      static     B weights chosen once before training;
      all        every candidate weight is selected (BitFit), stored as a sparse delta;
      dense      every candidate trained densely by the wrapped optimizer (full fine-tuning).

    Capability fields (class attributes, read by the optimizer, the CLI and the tests; the
    kind's own ones, `grows_mask` ... `trains_dense`, are derived from `kind` below):
      takes_budget       it chooses weights within a budget (False: it trains a fixed set,
                         every bias or every weight, and takes budget=None);
      needs_total_steps  it spreads the budget over T steps (SelectiveOptimizer's total_steps);
      needs_grad         the ranking reads the current gradient;
      needs_calibration  the ranking needs `SelectiveOptimizer.calibrate` before the first step;
      supports_low_memory  it works with low_memory=True (it does not need every weight's
                         gradient at once);
      supports_fsdp      it works on FSDP2-sharded models;
      distributed        it works with several processes (its keys come from the averaged
                         gradient, not from statistics each process gathers itself).
    """

    name: ClassVar[str]
    kind: ClassVar[Kind]
    takes_budget: ClassVar[bool] = True
    needs_total_steps: ClassVar[bool] = False
    needs_grad: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    supports_low_memory: ClassVar[bool] = True
    supports_fsdp: ClassVar[bool] = True
    distributed: ClassVar[bool] = True
    floor: ClassVar[float] = float("-inf")

    # When the weights are chosen, set from `kind` for every subclass (the optimizer
    # dispatches on these): a few new ones every step until B is spent (increment); a fresh
    # top-B every step (repeat); once, before training (static, all); every candidate as
    # slots (all); every candidate trained whole, without slots (dense).
    grows_mask: ClassVar[bool] = False
    reselects: ClassVar[bool] = False
    chooses_once: ClassVar[bool] = False
    selects_all: ClassVar[bool] = False
    trains_dense: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        kind = getattr(cls, "kind", None)
        cls.grows_mask = kind == "increment"
        cls.reselects = kind == "repeat"
        cls.chooses_once = kind in ("static", "all")
        cls.selects_all = kind == "all"
        cls.trains_dense = kind == "dense"

    def is_candidate(self, name: str, param: Tensor) -> bool:
        return True

    def no_candidate_hint(self) -> str:
        return "check the include/exclude/dense patterns and that parameters require grad"

    def keys(self, name: str, param: Tensor, signal: Tensor | None, out: Tensor) -> Tensor:
        """Ranking keys of parameter `name` (see scores.py); `signal` is its gradient or Fisher sum.

        Must be deterministic: it may be called twice for one tensor in one selection.
        """
        raise NotImplementedError

    def shard_keys(
        self, name: str, shard: Tensor, signal: Tensor | None, out: Tensor, start: int, numel: int
    ) -> Tensor:
        """Keys of `shard`: elements [start, start + shard.numel()) of the flattened parameter
        `name` (numel elements in all); `signal` is the same part of its gradient or Fisher sum.

        A weight's keys must equal the keys a single process computes on the whole tensor, so a
        sharded (FSDP) run selects what an unsharded one does. The default computes the keys of
        the shard alone, right for methods whose key of a weight depends only on that weight's
        value and signal; a method whose keys depend on the position (RandomMask) overrides it.
        """
        return self.keys(name, shard, signal, out)

    def config(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}

    def allocation_of(self) -> str:
        """ "global": one top-k over all candidates; "proportional": each tensor first gets a
        share of every step's quota proportional to its size (see `ID3SNR.allocation`)."""
        return "global"

    # Lifecycle for methods whose keys need more than the gradient (statistics gathered by
    # hooks during backward). The optimizer calls them; the defaults do nothing.

    def attach(self, model: nn.Module) -> None:
        """Called once, before the candidates are chosen, with the model being fine-tuned."""

    def bind(self, model: nn.Module, candidates: list[Tensor]) -> None:
        """Called once the candidates are chosen (in `model.named_parameters()` order)."""

    def clear(self) -> None:
        """Called after every step and zero_grad(): the next backward starts a new batch."""

    def release(self, param: Tensor) -> None:
        """Called when `param`'s keys of this step are taken (low-memory mode)."""

    def detach(self) -> None:
        """Called when the mask is final or the optimizer closes: stop collecting."""

    def eligibility_floor(self) -> float:
        return self.floor


@dataclass
class ID3(Method):
    """Increment-S with the D3 score |g| / (|θ| + score_eps)^score_exp."""

    name: ClassVar[str] = "id3"
    kind: ClassVar[Kind] = "increment"
    needs_total_steps: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = True
    score_eps: float = 1e-3
    score_exp: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.score_eps, int | float) and math.isfinite(self.score_eps)) or (
            self.score_eps <= 0
        ):
            raise ValueError(f"score_eps must be a positive finite number, got {self.score_eps!r}")
        if not (isinstance(self.score_exp, int | float) and math.isfinite(self.score_exp)):
            raise ValueError(f"score_exp must be a finite number, got {self.score_exp!r}")

    def keys(self, name: str, param: Tensor, signal: Tensor | None, out: Tensor) -> Tensor:
        assert signal is not None
        return scores.d3(param, signal, out, self.score_eps, self.score_exp)

    def eligibility_floor(self) -> float:
        return scores.d3_floor(self.score_exp)


@dataclass
class ID3SNR(Method):
    """Increment-S ranked by the gradient's signal-to-noise ratio over the batch's tokens.

    key = |Σ_t g_t| / sqrt(Σ_t g_t²), where g_t is token t's contribution to the weight's
    gradient g = Σ_t g_t (see `unmask.choose.token_moments`). If the per-token contributions were
    independent noise around zero the key would be about 1 whatever the weight's scale, so keys
    of different tensors, rows and columns are comparable; it is large only where the tokens
    agree on the direction. Unlike |g| (and D3) it does not grow with the scale of the input
    feature a weight reads, so activation-outlier columns and untrained modules gain nothing
    from their scale.

    Candidates are the weights, biases and gains of nn.Linear, Conv1D, nn.Embedding and
    LayerNorm / RMSNorm modules; other parameters are left frozen (so are the projections of
    nn.MultiheadAttention, which uses their weights without calling their forward). The key is
    at most sqrt(tokens) for a module called once per forward. Single process only.
    """

    name: ClassVar[str] = "id3-snr"
    kind: ClassVar[Kind] = "increment"
    needs_total_steps: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = True
    distributed: ClassVar[bool] = False
    floor: ClassVar[float] = 0.0
    # "global": one global top-k per step. "proportional" (an ablation; standard mode only):
    # each step first tops every tensor up towards floor(C_t * n_i / N) weights, in model
    # order while the step's quota lasts (C_t: the schedule's count, n_i: the tensor's size,
    # N: all candidates; a uniformly random mask's expected share), then spends the rest of the
    # quota on the global top-k.
    allocation: str = "global"

    def __post_init__(self) -> None:
        if self.allocation not in ("global", "proportional"):
            raise ValueError(
                f"allocation must be 'global' or 'proportional', got {self.allocation!r}"
            )
        self._moments: TokenMoments | None = None
        self._covered: set[int] | None = None
        self._params: dict[str, Tensor] = {}
        self._warned: set[str] = set()

    def attach(self, model: nn.Module) -> None:
        if self._covered is not None:
            raise ValueError(
                "this id3-snr method object is already used by an optimizer (it holds that "
                "optimizer's hooks and statistics); pass method='id3-snr' or a new ID3SNR()"
            )
        if isinstance(model, nn.DataParallel):
            raise ValueError(
                "id3-snr cannot gather per-token statistics inside nn.DataParallel replicas; "
                "build the optimizer on model.module and train without DataParallel"
            )
        self._params = dict(model.named_parameters())
        self._covered = covered_parameters(model)

    def bind(self, model: nn.Module, candidates: list[Tensor]) -> None:
        self._moments = TokenMoments(model, candidates)

    def allocation_of(self) -> str:
        return self.allocation

    def is_candidate(self, name: str, param: Tensor) -> bool:
        return self._covered is None or id(param) in self._covered

    def no_candidate_hint(self) -> str:
        return (
            "id3-snr ranks the parameters of nn.Linear, Conv1D, nn.Embedding and LayerNorm / "
            "RMSNorm modules and this model has none among its candidates; use method='id3'"
        )

    def keys(self, name: str, param: Tensor, signal: Tensor | None, out: Tensor) -> Tensor:
        return self.shard_keys(name, param, signal, out, 0, param.numel())

    def shard_keys(
        self, name: str, shard: Tensor, signal: Tensor | None, out: Tensor, start: int, numel: int
    ) -> Tensor:
        assert signal is not None
        count = shard.numel()
        keys = out[:count]
        moments = None if self._moments is None else self._moments.moments(self._params[name])
        if moments is None:  # no backward through its module: no evidence, never eligible
            if name not in self._warned and bool(signal.detach().ne(0).any()):
                self._warned.add(name)
                warnings.warn(
                    f"id3-snr: {name} has a gradient but no per-token statistics (its module's "
                    "forward did not run: the weight is used elsewhere), so it is never "
                    "selected; exclude it, or use method='id3'",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return keys.zero_()
        second = moments.reshape(-1)[start : start + count]
        torch.div(signal.detach().reshape(-1).abs(), second.sqrt(), out=keys)
        # 0/0 (no token touched the weight) and g/0 (a gradient of ~1e-34 whose per-token
        # squares underflowed) carry no evidence: key 0, never selected.
        return keys.nan_to_num_(nan=0.0, posinf=0.0)

    def clear(self) -> None:
        if self._moments is not None:
            self._moments.clear()

    def release(self, param: Tensor) -> None:
        if self._moments is not None:
            self._moments.release(param)

    def detach(self) -> None:
        if self._moments is not None:
            self._moments.remove()
            self._moments.active = False


@dataclass
class ID3Repeat(ID3):
    """Repeat-S ablation: the D3 top-B is chosen afresh every step (over-spends the budget)."""

    name: ClassVar[str] = "id3-repeat"
    kind: ClassVar[Kind] = "repeat"
    supports_low_memory: ClassVar[bool] = False  # the top-B of every weight's gradient
    supports_fsdp: ClassVar[bool] = False  # slots change owners every step


@dataclass
class IncrementPaFi(Method):
    """Increment-S ablation ranked by PaFi's heuristic: smallest |θ| first."""

    name: ClassVar[str] = "increment-pafi"
    kind: ClassVar[Kind] = "increment"
    needs_total_steps: ClassVar[bool] = True

    def keys(self, name: str, param: Tensor, signal: Tensor | None, out: Tensor) -> Tensor:
        return scores.small_magnitude(param, out)


@dataclass
class PaFi(Method):
    """Static: the B pretrained weights of smallest magnitude.

    Exact zeros rank first, in no particular order among themselves. A checkpoint dequantized
    from a low-bit format can hold more exact zeros than B (SmolLM2-135M's Q4_1 GGUF has 325K,
    90% of them in the embedding matrix), and then the mask is only those zeros.
    """

    name: ClassVar[str] = "pafi"
    kind: ClassVar[Kind] = "static"

    def keys(self, name: str, param: Tensor, signal: Tensor | None, out: Tensor) -> Tensor:
        return scores.small_magnitude(param, out)


_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: consecutive seeds land far apart


@dataclass
class RandomMask(Method):
    """Static: a uniformly random set of B weights, reproducible from `seed`."""

    name: ClassVar[str] = "random"
    kind: ClassVar[Kind] = "static"
    seed: int = 0

    def keys(self, name: str, param: Tensor, signal: Tensor | None, out: Tensor) -> Tensor:
        return self.shard_keys(name, param, signal, out, 0, param.numel())

    def shard_keys(
        self, name: str, shard: Tensor, signal: Tensor | None, out: Tensor, start: int, numel: int
    ) -> Tensor:
        # One generator per (seed, tensor name), so the same tensor always gets the same keys; a
        # shard draws the whole tensor's keys and keeps its own part (O(numel) while it runs).
        # torch's CPU generator keeps only the low 32 bits of its seed, so the seed is mixed
        # into those bits (seed 0 keeps the keys it always had).
        mixed = (zlib.crc32(name.encode()) + self.seed * _GOLDEN) % 2**32
        generator = torch.Generator().manual_seed(mixed)
        return scores.uniform_random(numel, out, generator, start, shard.numel())


@dataclass
class Fish(Method):
    """Static: top-B by the empirical Fisher Σ g² over calibration batches (FISH mask)."""

    name: ClassVar[str] = "fish"
    kind: ClassVar[Kind] = "static"
    needs_calibration: ClassVar[bool] = True

    def keys(self, name: str, param: Tensor, signal: Tensor | None, out: Tensor) -> Tensor:
        assert signal is not None
        return out[: param.numel()].copy_(signal.reshape(-1))


@dataclass
class BitFit(Method):
    """Every bias term (parameters named `*bias`), not LayerNorm gains or other 1-D tensors."""

    name: ClassVar[str] = "bitfit"
    kind: ClassVar[Kind] = "all"
    takes_budget: ClassVar[bool] = False

    def is_candidate(self, name: str, param: Tensor) -> bool:
        return name.rsplit(".", 1)[-1] == "bias"

    def no_candidate_hint(self) -> str:
        return (
            "bitfit trains bias terms (parameters named '*.bias') and this model has none among "
            "its candidates; choose another method, e.g. method='id3'"
        )


@dataclass
class Full(Method):
    """Full fine-tuning of every candidate weight with the wrapped optimizer."""

    name: ClassVar[str] = "full"
    kind: ClassVar[Kind] = "dense"
    takes_budget: ClassVar[bool] = False
    supports_low_memory: ClassVar[bool] = False  # the wrapped optimizer reads every .grad


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (ID3, ID3SNR, ID3Repeat, IncrementPaFi, PaFi, RandomMask, Fish, BitFit, Full)
}


def make_method(method: str | Method, **options: object) -> Method:
    """Build a method from its name, passing each option only to methods that declare it.

    Options a method does not use are ignored, so one call site can serve every method.
    """
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    cls = METHODS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names})
