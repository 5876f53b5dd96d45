"""SparseDelta: the result of selective fine-tuning, stored in O(B) bytes.

A delta holds, per changed tensor, the flat indices and the change (trained - pretrained) there,
or the whole trained tensor for dense parameters; its file format is in `delta_format`, the
fingerprints of the base model in `fingerprints`.

apply_ writes ``w[i] = (w[i].to(values.dtype) + values).to(w.dtype)`` — the expression training
used — so it reproduces the trained weights bit for bit. remove_ subtracts the values again,
which restores the base within one rounding step of the values' dtype (exactly whenever the
subtraction is exact, which fp32 arithmetic does not promise), and refuses a model that does not
hold base + delta. Both compute and check every value first (finite in the parameter's dtype)
and write only then.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from unmask.optimize.sharding import full
from unmask.store.delta_format import (
    CONFIG_FILE,
    TENSORS_FILE,
    DeltaError,
    check_labels,
    check_sparse_entry,
    dtype_name,
    read_folder,
    saved_bytes,
    write_folder,
)
from unmask.store.fingerprints import dependent_parameters, tensor_hash
from unmask.store.hub import delta_folder, upload

# Callers import the store layer from here: the delta, its errors, fingerprints and file names.
__all__ = [
    "CONFIG_FILE",
    "TENSORS_FILE",
    "DeltaError",
    "SparseDelta",
    "dependent_parameters",
    "saved_bytes",
    "tensor_hash",
]

_NEIGHBOURS = 3  # remove_ looks this many floats either side of (current - delta) for the base


@dataclass
class SparseDelta:
    """Changed weights of a model, relative to the base model they were trained from.

    sparse: name -> (indices, values); indices 1-D int32/int64 ascending unique flat positions,
        values 1-D float of the same length: trained - pretrained.
    replace: name -> the whole trained tensor (dense parameters: a new head, or `full`).
    shapes, dtypes: of the model parameters the delta touches (dtype as "float32", ...).
    base_hashes: name -> sha256 of the base tensor (sparse entries only); apply_ refuses a model
        whose tensor differs.
    metadata: how the delta was trained (method, budget, score_eps, score_exp, total_steps, ...).
    dependency_hashes: name -> sha256 of a base tensor the delta does not change but its changes
        depend on (one sharing a module with a changed tensor: for a LoRA layer its lora_A,
        lora_B and base layer weights); apply_ refuses a model whose tensor differs, and `+`
        refuses deltas that record different fingerprints for one tensor. Empty for deltas
        saved before it was recorded (then only base_hashes are checked).
    """

    sparse: dict[str, tuple[Tensor, Tensor]]
    replace: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    base_hashes: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)
    dependency_hashes: dict[str, str] = field(default_factory=dict)
    # (name, id(parameter)) -> (weakref to it, its base values at the indices): what apply_
    # overwrote, so that remove_ on that model restores the exact base (see remove_).
    _overwritten: dict[tuple[str, int], tuple[weakref.ref, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_overwritten": {}}  # weak references do not pickle

    def __post_init__(self) -> None:
        for name, (indices, values) in self.sparse.items():
            check_sparse_entry(name, indices, values, self.shapes.get(name))
        for name, values in self.replace.items():
            if not bool(torch.isfinite(values).all()):
                raise DeltaError(f"replaced tensor {name}: values contain NaN or infinity")
            if name in self.sparse:
                raise DeltaError(f"tensor {name} is both sparse and replaced")
            if tuple(values.shape) != tuple(self.shapes.get(name, ())):
                raise DeltaError(
                    f"replaced tensor {name} has shape {tuple(values.shape)}, "
                    f"expected {self.shapes.get(name)}"
                )
            if dtype_name(values.dtype) != self.dtypes.get(name):
                raise DeltaError(
                    f"replaced tensor {name} is {dtype_name(values.dtype)}, but the delta "
                    f"records its parameter as {self.dtypes.get(name)}: the file is corrupt or "
                    "was edited; re-create the delta"
                )
        missing = set(self.sparse) - set(self.base_hashes)
        if missing:
            raise DeltaError(f"no base fingerprint for {sorted(missing)[:3]}")
        if not isinstance(self.dependency_hashes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.dependency_hashes.items()
        ):
            raise DeltaError("dependency fingerprints must map tensor names to sha256 strings")

    # ------------------------------------------------------------------ building

    @classmethod
    def from_training(
        cls,
        model: nn.Module,
        sparse: dict[str, tuple[Tensor, Tensor]],
        base_values: dict[str, Tensor],
        replace: dict[str, Tensor],
        metadata: dict[str, Any],
    ) -> SparseDelta:
        """Build a delta from a trained model and the pretrained values at the changed indices.

        Besides each changed tensor's base, it fingerprints the tensors the changes depend on
        (`dependent_parameters` of the sparse entries, except the delta's own tensors): they
        still hold their base values, as the delta does not change them. On a peft model
        (ID3 on LoRA, IA3, ...) that is every weight of its adapters, whose initialisation the
        model's output depends on even where the delta changes nothing (a LoRA layer whose B
        is not initialised to zero), so the delta applies only to an identically
        initialised adapter.

        The base hashes need whole tensors: FSDP-sharded (DTensor) parameters are gathered one
        at a time, so under FSDP every rank calls this with the same `sparse`.
        """
        params = dict(model.named_parameters())
        names = [*sparse, *replace]
        hashes = {}
        for name, (indices, _) in sparse.items():
            base = full(params[name].detach()).to("cpu", copy=True).reshape(-1)
            base[indices.long()] = base_values[name].to(base.dtype)
            hashes[name] = tensor_hash(base.view(params[name].shape))
        dependencies = {
            name: tensor_hash(full(params[name].detach()))
            for name in sorted({*dependent_parameters(model, sparse), *_adapter_parameters(model)})
            if name not in sparse and name not in replace
        }
        return cls(
            sparse=sparse,
            replace=replace,
            shapes={n: tuple(params[n].shape) for n in names},
            dtypes={n: dtype_name(params[n].dtype) for n in names},
            base_hashes=hashes,
            metadata=metadata,
            dependency_hashes=dependencies,
        )

    # ------------------------------------------------------------------ inspection

    @property
    def num_weights(self) -> int:
        """Number of weights the delta changes."""
        return sum(i.numel() for i, _ in self.sparse.values()) + sum(
            v.numel() for v in self.replace.values()
        )

    def allocation(self) -> dict[str, int]:
        """Changed weights per parameter name."""
        counts = {n: int(i.numel()) for n, (i, _) in self.sparse.items()}
        counts.update({n: v.numel() for n, v in self.replace.items()})
        return counts

    def __add__(self, other: SparseDelta) -> SparseDelta:
        """Sum of two deltas of the same base model (values add where indices overlap)."""
        if not isinstance(other, SparseDelta):
            return NotImplemented
        for name in set(self.shapes) & set(other.shapes):
            if self.shapes[name] != other.shapes[name] or self.dtypes[name] != other.dtypes[name]:
                raise DeltaError(f"cannot add deltas: tensor {name} differs in shape or dtype")
        # Every base fingerprint either delta records (changed tensors and the tensors their
        # changes depend on) must agree where both record one.
        mine = {**self.dependency_hashes, **self.base_hashes}
        theirs = {**other.dependency_hashes, **other.base_hashes}
        for name in sorted(set(mine) & set(theirs)):
            if mine[name] != theirs[name]:
                raise DeltaError(
                    f"cannot add deltas made for different base models (tensor {name})"
                )
        clash = (set(self.replace) & set(other.shapes)) | (set(other.replace) & set(self.shapes))
        if clash:
            raise DeltaError(
                f"cannot add deltas that both change replaced tensor(s) {sorted(clash)}"
            )
        sparse = dict(self.sparse)
        for name, (idx_b, val_b) in other.sparse.items():
            if name not in sparse:
                sparse[name] = (idx_b, val_b)
                continue
            idx_a, val_a = sparse[name]
            dtype = torch.promote_types(val_a.dtype, val_b.dtype)
            merged, inverse = torch.unique(
                torch.cat([idx_a.long(), idx_b.long()]), return_inverse=True
            )
            values = torch.zeros(merged.numel(), dtype=dtype, device=merged.device)
            values.index_add_(0, inverse, torch.cat([val_a.to(dtype), val_b.to(dtype)]))
            sparse[name] = (merged.to(idx_a.dtype), values)
        return SparseDelta(
            sparse=sparse,
            replace={**self.replace, **other.replace},
            shapes={**self.shapes, **other.shapes},
            dtypes={**self.dtypes, **other.dtypes},
            base_hashes={**self.base_hashes, **other.base_hashes},
            metadata={"combined": [self.metadata, other.metadata]},
            dependency_hashes={
                n: h
                for n, h in {**self.dependency_hashes, **other.dependency_hashes}.items()
                if n not in sparse
            },
        )

    # ------------------------------------------------------------------ applying

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Add the delta to `model` in place and return it.

        Checks first that every tensor exists with the recorded shape and dtype, that each
        changed tensor and each tensor the changes depend on (`dependency_hashes`) is
        bit-identical to the base the delta was trained from, and that every value to be
        written is finite in the parameter's dtype; on any failure raises DeltaError and leaves
        the model untouched.
        """
        params = self._check_model(model)
        for name, tensor in params.items():
            if name in self.base_hashes and tensor_hash(tensor) != self.base_hashes[name]:
                raise DeltaError(
                    f"tensor {name} of this model differs from the base model the delta was "
                    f"trained on (base model: {self.metadata.get('base_model')!r}); apply it to "
                    "that model, or to the model before any other delta was applied"
                )
        self._check_dependencies(model)
        writes = self._plan(params, sign=1)
        overwritten = {}
        for name, (indices, _) in self.sparse.items():
            p = params[name].detach()
            index = indices.to(device=p.device, dtype=torch.long)
            overwritten[(name, id(params[name]))] = (
                weakref.ref(params[name]),
                p.reshape(-1).index_select(0, index),
            )
        _commit(writes)
        self._overwritten = {k: v for k, v in self._overwritten.items() if v[0]() is not None}
        self._overwritten.update(overwritten)
        return model

    @torch.no_grad()
    def remove_(self, model: nn.Module) -> nn.Module:
        """Subtract the delta from `model` in place (undo `apply_`) and return it.

        Refuses (DeltaError, model untouched) a model that does not hold base + delta at the
        delta's indices: the base model itself, or values that no base value rounds to when the
        delta is added. On a model this delta object was applied to, the result is the exact
        base: apply_ keeps the values it overwrote, and they are used when they still round to
        the current values and match the base's fingerprint, so that apply A, remove A, apply B
        swaps deltas bit-exactly. Elsewhere, where the base value is the only one that rounds
        to the current one, the result is the exact base (checked against its fingerprint);
        otherwise it is within one rounding step of the values' dtype. Deltas that replace
        whole tensors cannot be removed (the base values are not stored).
        """
        if self.replace:
            raise DeltaError(
                f"this delta replaces whole tensors ({sorted(self.replace)[:3]}), whose base "
                "values it does not store; reload the base model instead of removing it"
            )
        params = self._check_model(model)
        _commit(self._plan(params, sign=-1))
        for name in self.sparse:
            self._overwritten.pop((name, id(params[name])), None)
        return model

    def labels(self) -> list[str] | None:
        """The checked `label_names` of the metadata (None if it records none); see
        `delta_format.check_labels`."""
        return check_labels(self.metadata, self.shapes)

    def _check_dependencies(self, model: nn.Module) -> None:
        """DeltaError unless every tensor the changes depend on matches its fingerprint."""
        if not self.dependency_hashes:
            return
        available = dict(model.named_parameters())
        for name, expected in sorted(self.dependency_hashes.items()):
            p = available.get(name)
            if p is None:
                raise DeltaError(
                    f"the model has no parameter {name}, which the delta's changes depend on; "
                    f"the delta was made for {self.metadata.get('base_model')!r}"
                )
            if p.is_meta:
                raise DeltaError(
                    f"parameter {name} is on the meta device (its weights are not loaded); load "
                    "or materialise the model's weights (e.g. model.to('cpu')) before applying"
                )
            if tensor_hash(p) != expected:
                raise DeltaError(
                    f"tensor {name} of this model differs from the base model the delta was "
                    f"trained on (base model: {self.metadata.get('base_model')!r}): the delta "
                    "does not change it, but its changes to the same module depend on it (for "
                    "LoRA: another adapter initialisation; build the adapter with the same "
                    "config and seed). Apply it to that model, or to the model before any "
                    "other delta was applied"
                )

    def _check_model(self, model: nn.Module) -> dict[str, Tensor]:
        available = dict(model.named_parameters())
        params = {}
        for name, shape in self.shapes.items():
            if name not in available:
                raise DeltaError(
                    f"the model has no parameter {name}; the delta was made for "
                    f"{self.metadata.get('base_model')!r}"
                )
            p = available[name]
            if p.is_meta:
                raise DeltaError(
                    f"parameter {name} is on the meta device (its weights are not loaded); load "
                    "or materialise the model's weights (e.g. model.to('cpu')) before applying"
                )
            if tuple(p.shape) != tuple(shape):
                raise DeltaError(
                    f"parameter {name} has shape {tuple(p.shape)}, the delta "
                    f"expects {tuple(shape)}; it was made for another model"
                )
            if dtype_name(p.dtype) != self.dtypes[name]:
                raise DeltaError(
                    f"parameter {name} is {dtype_name(p.dtype)}, the delta was trained in "
                    f"{self.dtypes[name]}; load the model with dtype={self.dtypes[name]}"
                )
            if any(st == 0 and n > 1 for st, n in zip(p.stride(), p.shape, strict=True)):
                raise DeltaError(
                    f"parameter {name} is an expanded view (stride 0): several of its elements "
                    "share memory, so they cannot be changed one by one; make it a real tensor "
                    "(e.g. .clone()) first"
                )
            params[name] = p
        return params

    def _plan(
        self, params: dict[str, Tensor], sign: int
    ) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """Every write (parameter, flat indices or None for all, new values), all checked."""
        writes: list[tuple[Tensor, Tensor | None, Tensor]] = []
        for name, (indices, values) in self.sparse.items():
            p = params[name].detach()
            index = indices.to(device=p.device, dtype=torch.long)
            current = p.reshape(-1).index_select(0, index)
            change = values.to(p.device)
            if sign > 0:
                updated = (current.to(change.dtype) + change).to(p.dtype)
            else:
                kept = self._overwritten.get((name, id(params[name])))
                if kept is not None and kept[0]() is not params[name]:
                    kept = None  # another tensor that got the same id
                updated = _restored(
                    name,
                    p,
                    index,
                    current,
                    change,
                    self.base_hashes[name],
                    None if kept is None else kept[1],
                )
            _check_finite(name, p, updated)
            writes.append((p, index, updated))
        for name, values in self.replace.items():
            p = params[name].detach()
            updated = values.to(device=p.device, dtype=p.dtype)
            _check_finite(name, p, updated)
            writes.append((p, None, updated))
        return writes

    # ------------------------------------------------------------------ files

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write delta.safetensors, delta_config.json and a README.md model card into
        `directory` (created if missing); a README.md unmask did not write is kept.

        Crash-safe: any sequence of saves killed at any point leaves a folder that loads; a full
        disk raises OSError with the previous delta intact (see `delta_format.write_folder`).
        """
        write_folder(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        name: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ) -> SparseDelta:
        """Load and validate a delta written by `save_pretrained`; raises DeltaError.

        name: a local folder, or a Hugging Face hub repository id (``owner/name``) that holds
            one; a local path that exists always wins. Hub files go through
            `huggingface_hub.snapshot_download` (its cache, ``HF_HUB_OFFLINE``, `revision`,
            `cache_dir` and `token` as usual); see `unmask.store.hub.delta_folder`.
        """
        return cls(**read_folder(delta_folder(name, revision, cache_dir, token)))

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
    ) -> Any:
        """Upload the delta's files (and a model card naming `repo_id`) to a hub repository,
        created if missing; returns `HfApi.upload_folder`'s commit information."""
        return upload(self, repo_id, private, token, commit_message, revision)


def _adapter_parameters(model: nn.Module) -> list[str]:
    """Parameters of a peft model's adapters (names holding ``.<adapter name>.``, peft's layout:
    ``...lora_A.default.weight``, ``...ia3_l.default``); none for a model without adapters."""
    adapters = getattr(model, "peft_config", None)
    if not isinstance(adapters, dict) or not adapters:
        return []
    marks = [f".{name}." for name in adapters]
    return [n for n, _ in model.named_parameters() if any(m in f"{n}." for m in marks)]


def _restored(
    name: str,
    p: Tensor,
    index: Tensor,
    current: Tensor,
    change: Tensor,
    base_hash: str,
    overwritten: Tensor | None = None,
) -> Tensor:
    """The base values of `p` at `index`, from base + delta there; DeltaError if it is not that.

    current: p's flat values at `index`; change: the delta's values there; base_hash: the
    fingerprint of the base tensor; overwritten: the values apply_ replaced at `index`, if this
    delta was applied to `p`.
    """

    def added(base: Tensor) -> Tensor:  # what apply_ writes for a base value
        return (base.to(change.dtype) + change).to(p.dtype)

    def is_base(values: Tensor) -> bool:
        tensor = p.reshape(-1).clone()
        tensor[index] = values
        return tensor_hash(tensor.view(p.shape)) == base_hash

    if (
        overwritten is not None
        and overwritten.shape == current.shape
        and bool((added(overwritten.to(p.device)) == current).all())
        and is_base(overwritten.to(p.device))
    ):
        return overwritten.to(p.device)
    subtracted = (current.to(change.dtype) - change).to(p.dtype)
    if is_base(subtracted):
        return subtracted
    subtracted = subtracted + 0.0  # -0.0 becomes +0.0, the sign a zero weight usually has
    if is_base(subtracted):
        return subtracted
    not_applied = DeltaError(
        f"tensor {name} of this model does not hold base + delta at the delta's indices, so "
        "the delta was not applied to it (or it was changed since); remove_ undoes apply_ "
        "on the model it was applied to: reload the base model instead"
    )
    if tensor_hash(p) == base_hash and bool((added(current) != current).any()):
        raise not_applied  # the model still has the base values there
    # The base values b with added(b) == current form an interval around `subtracted`.
    inf = torch.full_like(subtracted, math.inf)
    candidates, up, down = [subtracted], subtracted, subtracted
    for _ in range(_NEIGHBOURS):
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        candidates += [up, down]
    candidates = torch.stack(candidates)
    fits = added(candidates) == current
    count = fits.sum(0) + (fits & (candidates == 0)).sum(0)  # a zero fits with either sign
    if bool((count == 0).any()):
        raise not_applied  # no base value rounds to the current one
    chosen = candidates.gather(0, fits.int().argmax(0, keepdim=True)).squeeze(0)
    if bool((count == 1).all()) and not is_base(chosen):
        raise not_applied  # the only possible base differs from the recorded one
    return chosen


# ------------------------------------------------------------------ files


def _check_finite(name: str, p: Tensor, updated: Tensor) -> None:
    bad = int((~torch.isfinite(updated)).sum())
    if bad:
        raise DeltaError(
            f"the delta would write {bad:,} NaN or infinite value(s) into {name} "
            f"({dtype_name(p.dtype)}): its values overflow that dtype; nothing was changed. The "
            "delta is corrupt or was made for a model in another dtype"
        )


def _commit(writes: list[tuple[Tensor, Tensor | None, Tensor]]) -> None:
    """Write checked values; works for any strides (channels_last and other non-contiguous)."""
    for p, index, values in writes:
        if index is None:
            p.copy_(values)
        elif p.is_contiguous():
            p.view(-1).index_copy_(0, index, values)
        else:
            p.index_put_(torch.unravel_index(index, p.shape), values)
