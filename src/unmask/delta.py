"""SparseDelta: the result of selective fine-tuning, stored in O(B) bytes.

On disk a delta is a folder with two files:
  delta.safetensors   per tensor NAME either ``NAME:indices`` (int32, or int64 for tensors with
                      >= 2^31 elements; ascending, unique) with ``NAME:values`` (the change from
                      the pretrained value, float32/float64), or ``NAME:replace`` (the whole
                      trained tensor, for dense parameters such as a new classification head);
  delta_config.json   format version, the tensor list (shape, dtype, kind, count), the training
                      metadata (method, budget, ε, exp, T, base model), a sha256 of each base
                      tensor the delta changes, ``dependency_sha256``: a sha256 of each other base
                      tensor those changes depend on (the ones sharing a module with a changed
                      tensor, see `dependent_parameters`; absent in older files, which then get
                      the first check only), and a sha256 of delta.safetensors.

An fp32 delta takes 8 bytes per changed weight plus a constant per tensor. Loading never uses
pickle: safetensors and JSON only, validated before anything touches a model.

apply_ writes ``w[i] = (w[i].to(values.dtype) + values).to(w.dtype)`` — the expression training
used — so it reproduces the trained weights bit for bit. remove_ subtracts the values again,
which restores the base within one rounding step of the values' dtype (exactly whenever the
subtraction is exact, which fp32 arithmetic does not promise), and refuses a model that does not
hold base + delta. Both compute and check every value first (finite in the parameter's dtype)
and write only then.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import stat
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file
from torch import Tensor, nn

from .files import atomic_write, atomic_write_text, file_sha256, remove_stale_temporaries
from .sharding import full

TENSORS_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"
PREVIOUS_TENSORS_FILE = ".delta.safetensors.previous"
_SAVED_FILES = (TENSORS_FILE, CONFIG_FILE, PREVIOUS_TENSORS_FILE)
_LOAD_ATTEMPTS = 20  # reads of a folder that a concurrent save keeps changing, before giving up
FORMAT = "unmask.SparseDelta"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 16 * 2**20
MAX_LABELS = 100_000  # label_names longer than this are refused before a head is built
MAX_LABEL_CHARS = 1_000
_NEIGHBOURS = 3  # remove_ looks this many floats either side of (current - delta) for the base
_INDEX_DTYPES = (torch.int32, torch.int64)
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DeltaError(ValueError):
    """A delta file is malformed, or a delta does not fit the model it is applied to."""


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
            _check_sparse_entry(name, indices, values, self.shapes.get(name))
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
            if _dtype_name(values.dtype) != self.dtypes.get(name):
                raise DeltaError(
                    f"replaced tensor {name} is {_dtype_name(values.dtype)}, but the delta "
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
        still hold their base values, as the delta does not change them.

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
            for name in dependent_parameters(model, sparse)
            if name not in sparse and name not in replace
        }
        return cls(
            sparse=sparse,
            replace=replace,
            shapes={n: tuple(params[n].shape) for n in names},
            dtypes={n: _dtype_name(params[n].dtype) for n in names},
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
            values = torch.zeros(merged.numel(), dtype=dtype)
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
        """The checked `label_names` of the metadata (None if it records none).

        Raises DeltaError unless they are distinct strings, at most MAX_LABELS of them, and as
        many as the first dimension of a tensor of the delta (the classification head's rows).
        """
        labels = self.metadata.get("label_names")
        if labels is None:
            return None
        if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_LABELS:
            count = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise DeltaError(
                f"the delta's label_names must be a list of 2 to {MAX_LABELS:,} labels, got "
                f"{count}; the config is corrupt or was edited: pass --num-labels or re-create "
                "the delta"
            )
        if not all(isinstance(x, str) and len(x) <= MAX_LABEL_CHARS for x in labels):
            raise DeltaError(
                f"the delta's label_names must be strings of at most {MAX_LABEL_CHARS} "
                "characters; the config is corrupt or was edited"
            )
        if len(set(labels)) != len(labels):
            raise DeltaError("the delta's label_names repeat a label; the config is corrupt")
        rows = {shape[0] for shape in self.shapes.values() if shape}
        if len(labels) not in rows:
            raise DeltaError(
                f"the delta's label_names has {len(labels):,} labels, but no tensor of the "
                "delta has that many rows (a classification head has one per label); the "
                "config is corrupt or was edited: pass --num-labels or re-create the delta"
            )
        return labels

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
            if _dtype_name(p.dtype) != self.dtypes[name]:
                raise DeltaError(
                    f"parameter {name} is {_dtype_name(p.dtype)}, the delta was trained in "
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
                updated = self._restored(
                    name, p, index, current, change, None if kept is None else kept[1]
                )
            _check_finite(name, p, updated)
            writes.append((p, index, updated))
        for name, values in self.replace.items():
            p = params[name].detach()
            updated = values.to(device=p.device, dtype=p.dtype)
            _check_finite(name, p, updated)
            writes.append((p, None, updated))
        return writes

    def _restored(
        self,
        name: str,
        p: Tensor,
        index: Tensor,
        current: Tensor,
        change: Tensor,
        overwritten: Tensor | None = None,
    ) -> Tensor:
        """The base values at `index`, from base + delta there; DeltaError if it is not that.

        `overwritten`: the values apply_ replaced at `index`, if this delta was applied to `p`.
        """

        def added(base: Tensor) -> Tensor:  # what apply_ writes for a base value
            return (base.to(change.dtype) + change).to(p.dtype)

        def is_base(values: Tensor) -> bool:
            tensor = p.reshape(-1).clone()
            tensor[index] = values
            return tensor_hash(tensor.view(p.shape)) == self.base_hashes[name]

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
        if tensor_hash(p) == self.base_hashes[name] and bool((added(current) != current).any()):
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

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write delta.safetensors and delta_config.json into `directory` (created if missing).

        Each file is written to a temporary file and renamed into place; the config, renamed
        last, records the tensors file's sha256. Until it lands, a copy of the tensors file that
        matches the current config is kept as .delta.safetensors.previous, so any sequence of
        saves killed at any point leaves a folder that loads: the last complete save, or the
        one in progress once its config landed. Saves into one folder take turns (a lock on the
        folder); each first deletes the temporary files of earlier saves that were killed. A
        full disk raises OSError with the previous delta intact.
        """
        from safetensors import SafetensorError

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        entries = []
        for name, (indices, values) in self.sparse.items():
            tensors[f"{name}:indices"] = indices.contiguous().cpu()
            tensors[f"{name}:values"] = values.contiguous().cpu()
            entries.append(self._entry(name, "sparse", indices.numel()))
        for name, values in self.replace.items():
            tensors[f"{name}:replace"] = values.contiguous().cpu()
            entries.append(self._entry(name, "replace", values.numel()))
        digest = {}

        def write_tensors(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
            digest["sha256"] = file_sha256(tmp)

        tensors_path, previous = directory / TENSORS_FILE, directory / PREVIOUS_TENSORS_FILE
        with _folder_lock(directory):
            remove_stale_temporaries(directory, _SAVED_FILES)
            intact = _file_matching_config(directory)
            if intact == tensors_path:
                # Keep the tensors that match the config until the new config lands: a save cut
                # between the two renames then still leaves a loadable (old) delta.
                atomic_write(previous, lambda tmp: shutil.copyfile(tensors_path, tmp))
            elif intact is None:
                previous.unlink(missing_ok=True)  # matches nothing: no delta to keep
            # else an earlier save was cut after replacing the tensors: the previous copy is
            # the only file that matches the config, and it is kept as it is.
            try:
                atomic_write(tensors_path, write_tensors, io_errors=(SafetensorError,))
            except BaseException:
                if intact == tensors_path:
                    previous.unlink(missing_ok=True)  # the tensors file was never replaced
                raise
            config = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "tensors_sha256": digest["sha256"],
                "num_weights": self.num_weights,
                "tensors": entries,
                "metadata": self.metadata,
                "dependency_sha256": dict(sorted(self.dependency_hashes.items())),
            }
            text = json.dumps(config, indent=1, sort_keys=True)
            atomic_write_text(directory / CONFIG_FILE, text)
            previous.unlink(missing_ok=True)

    def _entry(self, name: str, kind: str, count: int) -> dict[str, Any]:
        return {
            "name": name,
            "kind": kind,
            "count": count,
            "shape": list(self.shapes[name]),
            "dtype": self.dtypes[name],
            "base_sha256": self.base_hashes.get(name),
        }

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SparseDelta:
        """Load and validate a delta folder written by `save_pretrained`; raises DeltaError."""
        directory = Path(directory)
        config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
        for path in (config_path, tensors_path):
            if not os.path.lexists(path):
                raise DeltaError(
                    f"{path} not found: a delta folder holds {CONFIG_FILE} and "
                    f"{TENSORS_FILE} (written by SparseDelta.save_pretrained)"
                )
            _check_regular(path, os.lstat(path))
        # One consistent snapshot: the config's bytes, then a tensors file whose bytes (read
        # once, hashed and parsed from memory) have the sha256 the config records. A save that
        # lands in between changes the config; the load then starts again.
        for _ in range(_LOAD_ATTEMPTS):
            raw_config = _read_config_bytes(config_path)
            try:
                config = json.loads(raw_config.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as err:
                raise DeltaError(f"{config_path} is not valid JSON: {err}") from err
            entries = _check_config(config, config_path)
            found = _read_matching(
                (tensors_path, directory / PREVIOUS_TENSORS_FILE), config["tensors_sha256"]
            )
            if found is not None:
                tensors_path, data = found
                break
            try:
                unchanged = _read_config_bytes(config_path) == raw_config
            except DeltaError:
                unchanged = False
            if unchanged:
                raise DeltaError(
                    f"{tensors_path} does not match its config (sha256 differs): the "
                    "files are corrupted or from different saves"
                )
            time.sleep(0.01)
        else:
            raise DeltaError(
                f"{directory} changed on every one of {_LOAD_ATTEMPTS} reads: another process "
                "keeps saving a delta into it; load it once that save is done"
            )
        try:
            tensors = load(data)
        except Exception as err:  # safetensors raises several types for malformed files
            raise DeltaError(f"{tensors_path} is not a readable safetensors file: {err}") from err
        del data
        expected = set()
        sparse, replace, shapes, dtypes, hashes = {}, {}, {}, {}, {}
        for entry in entries:
            name, kind = entry["name"], entry["kind"]
            shapes[name], dtypes[name] = tuple(entry["shape"]), entry["dtype"]
            keys = (
                [f"{name}:indices", f"{name}:values"] if kind == "sparse" else [f"{name}:replace"]
            )
            for key in keys:
                if key not in tensors:
                    raise DeltaError(f"{tensors_path} lacks tensor {key}")
            expected.update(keys)
            if kind == "sparse":
                sparse[name] = (tensors[keys[0]], tensors[keys[1]])
                hashes[name] = entry["base_sha256"]
                if sparse[name][0].numel() != entry["count"]:
                    raise DeltaError(
                        f"tensor {name}: config says {entry['count']} weights, "
                        f"file has {sparse[name][0].numel()}"
                    )
            else:
                replace[name] = tensors[keys[0]]
                if replace[name].dtype not in _VALUE_DTYPES:
                    raise DeltaError(f"replaced tensor {name} has dtype {replace[name].dtype}")
        extra = set(tensors) - expected
        if extra:
            raise DeltaError(
                f"{tensors_path} holds tensors its config does not list: {sorted(extra)[:3]}"
            )
        return cls(
            sparse=sparse,
            replace=replace,
            shapes=shapes,
            dtypes=dtypes,
            base_hashes=hashes,
            metadata=config["metadata"],
            dependency_hashes=dict(config.get("dependency_sha256", {})),
        )


def saved_bytes(directory: str | os.PathLike) -> int:
    """Bytes of a saved delta on disk: its config and tensors files (no temporary files)."""
    return sum((Path(directory) / name).stat().st_size for name in (CONFIG_FILE, TENSORS_FILE))


@contextlib.contextmanager
def _folder_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (flock of the folder itself, where available)."""
    try:
        import fcntl
    except ImportError:  # Windows: saves into one folder must not overlap
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _file_matching_config(directory: Path) -> Path | None:
    """The tensors file (current or previous copy) whose sha256 the config records, if any."""
    try:
        config = json.loads(_read_config_bytes(directory / CONFIG_FILE).decode("utf-8"))
        expected = config["tensors_sha256"]
    except (DeltaError, OSError, ValueError, TypeError, KeyError, RecursionError):
        return None
    for path in (directory / TENSORS_FILE, directory / PREVIOUS_TENSORS_FILE):
        try:
            if path.is_file() and file_sha256(path) == expected:
                return path
        except OSError:
            continue
    return None


def _read_config_bytes(path: Path) -> bytes:
    try:
        raw = _read_regular(path, MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as err:
        raise DeltaError(f"{path} not found: the delta folder lacks its config") from err
    if len(raw) > MAX_CONFIG_BYTES:
        raise DeltaError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    return raw


def _read_regular(path: Path, limit: int = -1) -> bytes:
    """The bytes of `path` (at most `limit`), refused (DeltaError) unless it is a regular file.

    Opened without following a symlink and without blocking, and checked on the open file, so
    a FIFO, a device such as /dev/zero or a symlink is refused before a byte is read, also when
    it was swapped in after an earlier check.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        if os.path.islink(path):  # O_NOFOLLOW's ELOOP
            _check_regular(path, os.lstat(path))
        raise
    with os.fdopen(fd, "rb") as f:
        _check_regular(path, os.fstat(fd))
        return f.read(limit)


def _check_regular(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a symbolic link" if stat.S_ISLNK(info.st_mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode)
            else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
            else "a folder" if stat.S_ISDIR(info.st_mode)
            else "a special file"
        )  # fmt: skip
        raise DeltaError(
            f"{path} is not a regular file ({kind}); a delta folder holds the regular files "
            "save_pretrained writes: copy the real files into the folder, or save the delta again"
        )


def _read_matching(paths: tuple[Path, ...], sha256: str) -> tuple[Path, bytes] | None:
    """The first of `paths` whose bytes, read once, have this sha256, with those bytes."""
    for path in paths:
        try:
            data = _read_regular(path)
        except FileNotFoundError:  # e.g. the previous copy, removed by a save that completed
            continue
        if hashlib.sha256(data).hexdigest() == sha256:
            return path, data
    return None


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


def tensor_hash(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (hex, first 32 characters)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{_dtype_name(tensor.dtype)}{tuple(tensor.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().data)
    return h.hexdigest()[:32]


def _check_finite(name: str, p: Tensor, updated: Tensor) -> None:
    bad = int((~torch.isfinite(updated)).sum())
    if bad:
        raise DeltaError(
            f"the delta would write {bad:,} NaN or infinite value(s) into {name} "
            f"({_dtype_name(p.dtype)}): its values overflow that dtype; nothing was changed. The "
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


def _check_sparse_entry(name: str, indices: Tensor, values: Tensor, shape: Any) -> None:
    if shape is None:
        raise DeltaError(f"no shape recorded for tensor {name}")
    numel = math.prod(shape)
    if indices.dtype not in _INDEX_DTYPES or indices.dim() != 1:
        raise DeltaError(
            f"tensor {name}: indices must be 1-D int32/int64, got "
            f"{indices.dtype} with shape {tuple(indices.shape)}"
        )
    if values.dtype not in _VALUE_DTYPES or values.dim() != 1:
        raise DeltaError(
            f"tensor {name}: values must be 1-D floating point, got "
            f"{values.dtype} with shape {tuple(values.shape)}"
        )
    if indices.numel() != values.numel():
        raise DeltaError(f"tensor {name}: {indices.numel()} indices but {values.numel()} values")
    if indices.numel():
        if int(indices.min()) < 0 or int(indices.max()) >= numel:
            raise DeltaError(f"tensor {name}: indices out of range [0, {numel})")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise DeltaError(f"tensor {name}: indices are not strictly ascending")
    if not bool(torch.isfinite(values).all()):
        raise DeltaError(f"tensor {name}: values contain NaN or infinity")


def _check_config(config: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise DeltaError(f"{path} is not an unmask delta config (format != {FORMAT!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise DeltaError(
            f"{path} has format_version {config.get('format_version')!r}; this "
            f"unmask reads version {FORMAT_VERSION}"
        )
    if not isinstance(config.get("tensors_sha256"), str) or not isinstance(
        config.get("metadata"), dict
    ):
        raise DeltaError(f"{path} lacks tensors_sha256 or metadata")
    entries = config.get("tensors")
    if not isinstance(entries, list):
        raise DeltaError(f"{path}: 'tensors' must be a list")
    dependencies = config.get("dependency_sha256", {})  # absent before it was recorded
    if not isinstance(dependencies, dict) or not all(
        isinstance(h, str) for h in dependencies.values()
    ):
        raise DeltaError(f"{path}: 'dependency_sha256' must map tensor names to sha256 strings")
    seen = set()
    for entry in entries:
        ok = (
            isinstance(entry, Mapping)
            and isinstance(entry.get("name"), str)
            and entry.get("kind") in ("sparse", "replace")
            and isinstance(entry.get("count"), int)
            and entry["count"] >= 0
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("dtype"), str)
            and entry["dtype"] in {_dtype_name(d) for d in _VALUE_DTYPES}
            and (entry["kind"] == "replace" or isinstance(entry.get("base_sha256"), str))
        )
        if not ok:
            raise DeltaError(f"{path}: malformed tensor entry {str(entry)[:200]}")
        if entry["name"] in seen:
            raise DeltaError(f"{path}: tensor {entry['name']} listed twice")
        seen.add(entry["name"])
    return entries


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
