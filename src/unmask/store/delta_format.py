"""The on-disk format of a SparseDelta, and the checks every delta passes.

A delta is a folder with two files (and a README.md model card, see `model_card`, which loading
never reads):
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

An fp32 delta takes 8 bytes per changed weight plus a constant per tensor. Reading never uses
pickle: safetensors and JSON only, validated before anything touches a model. Writing is
crash-safe and reading sees one whole save (see `write_folder` and `read_folder`).
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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load, save_file
from torch import Tensor

from unmask.store.files import (
    atomic_write,
    atomic_write_text,
    file_sha256,
    remove_stale_temporaries,
)
from unmask.store.model_card import CARD_FILE, is_unmask_card, model_card

if TYPE_CHECKING:
    from unmask.store.delta import SparseDelta

TENSORS_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"
PREVIOUS_TENSORS_FILE = ".delta.safetensors.previous"
_SAVED_FILES = (TENSORS_FILE, CONFIG_FILE, PREVIOUS_TENSORS_FILE, CARD_FILE)
_LOAD_ATTEMPTS = 20  # reads of a folder that a concurrent save keeps changing, before giving up
FORMAT = "unmask.SparseDelta"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 16 * 2**20
MAX_LABELS = 100_000  # label_names longer than this are refused before a head is built
MAX_LABEL_CHARS = 1_000
INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DeltaError(ValueError):
    """A delta file is malformed, or a delta does not fit the model it is applied to."""


def write_folder(delta: SparseDelta, directory: str | os.PathLike) -> None:
    """Write `delta` as delta.safetensors and delta_config.json into `directory` (created).

    Each file is written to a temporary file and renamed into place; the config, renamed
    last, records the tensors file's sha256. Until it lands, a copy of the tensors file that
    matches the current config is kept as .delta.safetensors.previous, so any sequence of
    saves killed at any point leaves a folder that loads: the last complete save, or the
    one in progress once its config landed. Saves into one folder take turns (a lock on the
    folder); each first deletes the temporary files of earlier saves that were killed. A
    full disk raises OSError with the previous delta intact.

    The model card (README.md) is written atomically before the config, unless the folder
    holds a README.md that unmask did not write, which is kept.
    """
    from safetensors import SafetensorError

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    entries = []
    for name, (indices, values) in delta.sparse.items():
        tensors[f"{name}:indices"] = indices.contiguous().cpu()
        tensors[f"{name}:values"] = values.contiguous().cpu()
        entries.append(_entry(delta, name, "sparse", indices.numel()))
    for name, values in delta.replace.items():
        tensors[f"{name}:replace"] = values.contiguous().cpu()
        entries.append(_entry(delta, name, "replace", values.numel()))
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
            "num_weights": delta.num_weights,
            "tensors": entries,
            "metadata": delta.metadata,
            "dependency_sha256": dict(sorted(delta.dependency_hashes.items())),
        }
        _write_card(delta, directory)
        text = json.dumps(config, indent=1, sort_keys=True)
        atomic_write_text(directory / CONFIG_FILE, text)
        previous.unlink(missing_ok=True)


def _write_card(delta: SparseDelta, directory: Path) -> None:
    """Write the README.md model card, keeping a README.md of the user's own."""
    card = directory / CARD_FILE
    try:
        if not is_unmask_card(_read_regular(card, MAX_CONFIG_BYTES).decode("utf-8", "replace")):
            return
    except FileNotFoundError:
        pass
    except (OSError, DeltaError):
        return  # not a regular file we could read: not ours to replace
    atomic_write_text(card, model_card(delta, str(directory)))


def _entry(delta: SparseDelta, name: str, kind: str, count: int) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "count": count,
        "shape": list(delta.shapes[name]),
        "dtype": delta.dtypes[name],
        "base_sha256": delta.base_hashes.get(name),
    }


def read_folder(directory: str | os.PathLike) -> dict[str, Any]:
    """The fields of the delta saved in `directory` by `write_folder`, as SparseDelta's keywords.

    Raises DeltaError for a missing, malformed or inconsistent folder. The fields are checked
    here as far as the files go (format, entries, sha256, the tensors the config lists); the
    tensors themselves are checked by SparseDelta when it is built from them.
    """
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
        keys = [f"{name}:indices", f"{name}:values"] if kind == "sparse" else [f"{name}:replace"]
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
            if replace[name].dtype not in VALUE_DTYPES:
                raise DeltaError(f"replaced tensor {name} has dtype {replace[name].dtype}")
    extra = set(tensors) - expected
    if extra:
        raise DeltaError(
            f"{tensors_path} holds tensors its config does not list: {sorted(extra)[:3]}"
        )
    return {
        "sparse": sparse,
        "replace": replace,
        "shapes": shapes,
        "dtypes": dtypes,
        "base_hashes": hashes,
        "metadata": config["metadata"],
        "dependency_hashes": dict(config.get("dependency_sha256", {})),
    }


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


def check_sparse_entry(name: str, indices: Tensor, values: Tensor, shape: Any) -> None:
    """DeltaError unless (indices, values) is a valid sparse change of a tensor of `shape`.

    Valid: 1-D int32/int64 indices, strictly ascending and inside the tensor's ``prod(shape)``
    elements, and as many 1-D finite floating-point values.
    """
    if shape is None:
        raise DeltaError(f"no shape recorded for tensor {name}")
    numel = math.prod(shape)
    if indices.dtype not in INDEX_DTYPES or indices.dim() != 1:
        raise DeltaError(
            f"tensor {name}: indices must be 1-D int32/int64, got "
            f"{indices.dtype} with shape {tuple(indices.shape)}"
        )
    if values.dtype not in VALUE_DTYPES or values.dim() != 1:
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
            and entry["dtype"] in {dtype_name(d) for d in VALUE_DTYPES}
            and (entry["kind"] == "replace" or isinstance(entry.get("base_sha256"), str))
        )
        if not ok:
            raise DeltaError(f"{path}: malformed tensor entry {str(entry)[:200]}")
        if entry["name"] in seen:
            raise DeltaError(f"{path}: tensor {entry['name']} listed twice")
        seen.add(entry["name"])
    return entries


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the format records it: "float32", "bfloat16", ..."""
    return str(dtype).removeprefix("torch.")


def check_labels(
    metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> list[str] | None:
    """The checked ``label_names`` of a delta's metadata (None if it records none).

    Raises DeltaError unless they are distinct strings, at most MAX_LABELS of them, and as
    many as the first dimension of one of `shapes` (the classification head's rows).
    """
    labels = metadata.get("label_names")
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
    rows = {shape[0] for shape in shapes.values() if shape}
    if len(labels) not in rows:
        raise DeltaError(
            f"the delta's label_names has {len(labels):,} labels, but no tensor of the "
            "delta has that many rows (a classification head has one per label); the "
            "config is corrupt or was edited: pass --num-labels or re-create the delta"
        )
    return labels
