"""Fuzzing SparseDelta.from_pretrained + apply_ with hypothesis.

Every case starts from a valid saved delta of a tiny BERT (sparse tensors plus a replaced
classification head) and damages it: truncation, random bit flips (with the config's
tensors_sha256 recomputed, so the checks behind the checksum are reached, and without), edits of
the safetensors JSON header, re-saved tensors with edited contents, and crafted
delta_config.json files. The property, for every case:

- from_pretrained either returns a delta or raises DeltaError; never another exception, never
  pickle (pickle.load(s), pickle.Unpickler and torch.load are patched to raise a
  BaseException here);
- a returned delta, applied to a fresh copy of the base model, either succeeds and changes no
  weight outside the delta's indices (and replaced tensors), or raises DeltaError and leaves
  every weight bit-identical.

Examples per test: UNMASK_FUZZ_EXAMPLES (default 200; five fuzz tests, about 1000 cases in
about 10 s on 2 cores). Longer runs by hand, e.g.

    UNMASK_FUZZ_EXAMPLES=2000 UNMASK_FUZZ_REPORT=fuzz.json \\
        .venv/bin/python -m pytest tests/test_fuzz_delta.py -q -s

The cases run and their outcomes are printed at the end of the module (and written as JSON to
$UNMASK_FUZZ_REPORT when set).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import id3_with_dense_head
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from unmask import DeltaError, SparseDelta

TENSORS = "delta.safetensors"
CONFIG = "delta_config.json"
FORMAT = "unmask.SparseDelta"

EXAMPLES = int(os.environ.get("UNMASK_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)

# (test, outcome) -> cases; outcomes "refused-on-load", "refused-on-apply", "applied". NOTES
# counts facts about some of those cases: which check refused them ("why:..."),
# "unchanged-file" (bit flips that cancelled out) and "applied-non-finite" (a delta that loaded
# and applied wrote NaN/inf into the model).
COUNTS: Counter[tuple[str, str]] = Counter()
NOTES: Counter[tuple[str, str]] = Counter()


REASONS = [
    ("sha256 differs", "checksum"),
    ("not a readable safetensors", "safetensors-parse"),
    ("not valid JSON", "config-json"),
    ("larger than", "config-size"),
    ("not an unmask delta config", "config-format"),
    ("format_version", "config-version"),
    ("lacks tensors_sha256 or metadata", "config-fields"),
    ("'tensors' must be a list", "config-fields"),
    ("malformed tensor entry", "config-entry"),
    ("listed twice", "config-entry"),
    ("lacks tensor", "missing-tensor"),
    ("does not list", "extra-tensor"),
    ("config says", "count"),
    ("indices must be", "index-dtype-or-rank"),
    ("values must be", "value-dtype-or-rank"),
    ("indices but", "length"),
    ("out of range", "index-range"),
    ("strictly ascending", "index-order"),
    ("NaN or infinity", "non-finite-values"),
    ("replaced tensor", "replaced-tensor"),
    ("both sparse and replaced", "sparse-and-replaced"),
    ("no base fingerprint", "base-hash"),
    ("no shape recorded", "shape"),
    ("has no parameter", "model:name"),
    ("has shape", "model:shape"),
    ("the delta was trained in", "model:dtype"),
    ("differs from the base model", "model:base-hash"),
]


def _reason(err: DeltaError) -> str:
    message = str(err)
    return next((label for text, label in REASONS if text in message), "other")


class PickleUsed(BaseException):
    """Raised by the patched pickle entry points; a BaseException so no `except Exception`
    in the code under test can turn it into a DeltaError."""


def _no_pickle(*args, **kwargs):
    raise PickleUsed("a delta file was unpickled")


class _NoUnpickler:
    def __init__(self, *args, **kwargs):
        _no_pickle()


@pytest.fixture(scope="module", autouse=True)
def forbid_pickle():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pickle, "load", _no_pickle)
        mp.setattr(pickle, "loads", _no_pickle)
        mp.setattr(pickle, "Unpickler", _NoUnpickler)
        mp.setattr(torch, "load", _no_pickle)
        mp.setattr(torch.serialization, "load", _no_pickle)
        yield


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    total = sum(COUNTS.values())
    lines = [f"fuzz_delta: {total} cases run ({EXAMPLES} max examples per test)"]
    by_test = {
        test: {
            "cases": sum(n for (t, _), n in COUNTS.items() if t == test),
            **{o: n for (t, o), n in sorted(COUNTS.items()) if t == test},
            **{f"note:{o}": n for (t, o), n in sorted(NOTES.items()) if t == test},
        }
        for test in sorted({t for t, _ in COUNTS})
    }
    for test, counts in by_test.items():
        lines.append(f"  {test}: {counts}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))
    path = os.environ.get("UNMASK_FUZZ_REPORT")
    if path:
        report = {"max_examples_per_test": EXAMPLES, "total_cases": total, "by_test": by_test}
        Path(path).write_text(json.dumps(report, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------- the subject


class Subject:
    """A valid saved delta (bytes) and a working copy of its base model, reset after each case."""

    def __init__(self, folder: Path) -> None:
        base, opt = id3_with_dense_head(steps=3, budget=300)
        good = folder / "good"
        opt.delta().save_pretrained(good)
        self.tensors = (good / TENSORS).read_bytes()
        self.config = json.loads((good / CONFIG).read_text())
        self.header_end = 8 + struct.unpack("<Q", self.tensors[:8])[0]
        self.header = json.loads(self.tensors[8 : self.header_end])
        self.model = base
        self.base = {n: p.detach().clone() for n, p in base.named_parameters()}
        self.trained = {n: p.detach().clone() for n, p in opt.model.named_parameters()}
        self.folder = folder / "case"
        self.folder.mkdir()

    def write(self, tensors: bytes, config: dict | str | bytes, rehash: bool) -> Path:
        """Write a case; with `rehash`, a dict config gets the sha256 of these tensors bytes."""
        if isinstance(config, dict):
            if rehash:
                config = {**config, "tensors_sha256": hashlib.sha256(tensors).hexdigest()}
            config = json.dumps(config)
        if isinstance(config, str):
            config = config.encode("utf-8", "surrogatepass")
        (self.folder / TENSORS).write_bytes(tensors)
        (self.folder / CONFIG).write_bytes(config)
        return self.folder

    def reset(self) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.base[name])


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Subject:
    s = Subject(tmp_path_factory.mktemp("fuzz"))
    # Positive control: the unmodified files load and reproduce the trained model.
    delta = SparseDelta.from_pretrained(s.write(s.tensors, s.config, rehash=False))
    delta.apply_(s.model)
    for name, p in s.model.named_parameters():
        assert torch.equal(p.detach(), s.trained[name]), name
    s.reset()
    return s


def test_pickle_guard_is_active(tmp_path):
    """Control for the property's 'never pickle': the patched entry points do raise."""
    torch.save({"x": torch.zeros(1)}, tmp_path / "x.pt")  # pickling is fine, unpickling is not
    attempts = (
        lambda: torch.load(tmp_path / "x.pt"),
        lambda: pickle.loads(b"N."),
        lambda: pickle.Unpickler(open(tmp_path / "x.pt", "rb")),
    )
    for load in attempts:
        with pytest.raises(PickleUsed):
            load()


def check(subject: Subject, folder: Path, test: str) -> str:
    """The fuzzing property; returns and counts the outcome."""
    outcome = _check(subject, folder, test)
    COUNTS[test, outcome] += 1
    return outcome


def _check(subject: Subject, folder: Path, test: str) -> str:
    try:
        delta = SparseDelta.from_pretrained(folder)
    except DeltaError as err:
        NOTES[test, f"why:{_reason(err)}"] += 1
        return "refused-on-load"
    except Exception as err:
        raise AssertionError(
            f"from_pretrained raised {type(err).__name__}, not DeltaError: {err}"
        ) from err
    model = subject.model
    try:
        try:
            delta.apply_(model)
        except DeltaError as err:
            NOTES[test, f"why:{_reason(err)}"] += 1
            for name, p in model.named_parameters():
                assert torch.equal(p.detach(), subject.base[name]), f"{name} changed"
            return "refused-on-apply"
        except Exception as err:
            raise AssertionError(
                f"apply_ raised {type(err).__name__}, not DeltaError: {err}"
            ) from err
        non_finite = False
        for name, p in model.named_parameters():
            before = subject.base[name]
            assert p.dtype == before.dtype and p.shape == before.shape, name
            if name in delta.replace:
                non_finite |= not bool(torch.isfinite(p).all())
                continue
            untouched = torch.ones(before.numel(), dtype=torch.bool)
            if name in delta.sparse:
                untouched[delta.sparse[name][0].long()] = False
                non_finite |= not bool(torch.isfinite(p).all())
            flat = p.detach().reshape(-1)
            assert torch.equal(flat[untouched], before.reshape(-1)[untouched]), (
                f"{name}: a weight outside the delta's indices changed"
            )
        if non_finite:
            NOTES[test, "applied-non-finite"] += 1
        return "applied"
    finally:
        subject.reset()


# ---------------------------------------------------------------------------- strategies

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([10**40, -(10**40), 2**63, 2**64, -(2**63) - 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
SAFETENSORS_DTYPES = [
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8",
    "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "E8M0", "C64",
    "", "f32", "FLOAT32", "F32 ",
]  # fmt: skip
TORCH_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
]  # fmt: skip
CONFIG_DTYPES = ["float32", "float16", "bfloat16", "float64", "int32", "int64", "bool", ""]
BIG_INTS = st.one_of(
    st.integers(min_value=-2, max_value=64),
    st.integers(min_value=-(2**64), max_value=2**65),
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64]),
)


def _tensors_with_header(subject: Subject, header: dict, length: int | None) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text) if length is None else length)
    return prefix + text + subject.tensors[subject.header_end :]


# ---------------------------------------------------------------------------- tests


@FUZZ
@given(data=st.data())
def test_truncated_tensors_file(subject, data):
    keep = data.draw(st.integers(0, len(subject.tensors) - 1), label="keep")
    rehash = data.draw(st.booleans(), label="rehash")
    folder = subject.write(subject.tensors[:keep], subject.config, rehash)
    assert check(subject, folder, "truncation") == "refused-on-load"


@FUZZ
@given(data=st.data())
def test_bit_flips(subject, data):
    bits = len(subject.tensors) * 8
    header_bits = subject.header_end * 8
    position = st.integers(0, header_bits - 1) | st.integers(0, bits - 1)
    flips = data.draw(st.lists(position, min_size=1, max_size=8), label="bits")
    rehash = data.draw(st.booleans(), label="rehash")
    flipped = bytearray(subject.tensors)
    for bit in flips:
        flipped[bit // 8] ^= 1 << (bit % 8)
    flipped = bytes(flipped)
    folder = subject.write(flipped, subject.config, rehash)
    if flipped == subject.tensors:
        assert check(subject, folder, "bit-flips") == "applied"
        NOTES["bit-flips", "unchanged-file"] += 1
        return
    outcome = check(subject, folder, "bit-flips")
    if not rehash:
        assert outcome == "refused-on-load"  # the checksum catches any changed byte


@FUZZ
@given(data=st.data())
def test_header_edits(subject, data):
    header = copy.deepcopy(subject.header)
    names = sorted(header)
    tensor_names = [n for n in names if n != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from(names), label="key")
        action = data.draw(
            st.sampled_from(
                ["dtype", "shape", "offsets", "swap-offsets", "delete", "rename", "value", "add"]
            ),
            label="action",
        )
        entry = header.get(key)
        if action == "dtype" and isinstance(entry, dict):
            entry["dtype"] = data.draw(st.sampled_from(SAFETENSORS_DTYPES) | JSON_VALUES)
        elif action == "shape" and isinstance(entry, dict):
            entry["shape"] = data.draw(st.lists(BIG_INTS, max_size=4) | JSON_VALUES)
        elif action == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = data.draw(
                st.lists(BIG_INTS, min_size=2, max_size=2)
                | st.lists(BIG_INTS, max_size=3)
                | JSON_VALUES
            )
        elif action == "swap-offsets":
            other = data.draw(st.sampled_from(tensor_names), label="other")
            a, b = header.get(key), header.get(other)
            if isinstance(a, dict) and isinstance(b, dict):
                a["data_offsets"], b["data_offsets"] = b.get("data_offsets"), a.get("data_offsets")
        elif action == "delete":
            header.pop(key, None)
        elif action == "rename" and key in header:
            new = data.draw(st.sampled_from(tensor_names) | st.text(max_size=40), label="new")
            header[new] = header.pop(key)
        elif action == "value":
            header[key] = data.draw(JSON_VALUES, label="value")
        elif action == "add":
            end = len(subject.tensors) - subject.header_end
            header[data.draw(st.text(max_size=40), label="added")] = {
                "dtype": "F32",
                "shape": [0],
                "data_offsets": [end, end],
            }
    length = data.draw(
        st.none() | st.none() | st.none() | BIG_INTS.filter(lambda v: 0 <= v < 2**64),
        label="length",
    )
    # Always rehashed: without it the checksum refuses every edit (see the bit-flip test).
    tensors = _tensors_with_header(subject, header, length)
    check(subject, subject.write(tensors, subject.config, rehash=True), "header-edits")


@FUZZ
@given(data=st.data())
def test_tensor_edits(subject, data):
    """Re-saved, well-formed safetensors files with edited contents: the delta's own checks."""
    tensors = dict(sorted(load_safetensors(subject.tensors).items()))  # Rust HashMap order
    config = copy.deepcopy(subject.config)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from(sorted(tensors) or ["none"]), label="key")
        t = tensors.get(key)
        action = data.draw(
            st.sampled_from(
                ["set", "duplicate", "reverse", "cast", "reshape", "truncate", "drop", "add"]
            ),
            label="action",
        )
        if t is None and action != "add":
            continue
        if action == "set" and t.numel():
            i = data.draw(st.integers(0, t.numel() - 1), label="index")
            if t.is_floating_point():
                value = data.draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
            else:
                value = data.draw(BIG_INTS.filter(lambda v: -(2**63) <= v < 2**63))
            flat = t.reshape(-1).clone()
            try:
                flat[i] = value
            except (RuntimeError, OverflowError):  # value does not fit the dtype
                continue
            tensors[key] = flat.view(t.shape)
        elif action == "duplicate" and t.numel() > 1:
            i = data.draw(st.integers(1, t.numel() - 1), label="index")
            flat = t.reshape(-1).clone()
            flat[i] = flat[i - 1]
            tensors[key] = flat.view(t.shape)
        elif action == "reverse":
            tensors[key] = t.reshape(-1).flip(0).reshape(t.shape).contiguous()
        elif action == "cast":
            tensors[key] = t.to(data.draw(st.sampled_from(TORCH_DTYPES), label="dtype"))
        elif action == "reshape":
            tensors[key] = t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1)
        elif action == "truncate":
            tensors[key] = t.reshape(-1)[: data.draw(st.integers(0, t.numel()))].clone()
        elif action == "drop":
            del tensors[key]
        elif action == "add":
            name = data.draw(
                st.sampled_from(
                    [
                        f"{k.rsplit(':', 1)[0]}:{s}"
                        for k in sorted(tensors)
                        for s in ("indices", "values", "replace")
                    ]
                )
                | st.text(min_size=1, max_size=30),
                label="added",
            )
            tensors[name] = torch.zeros(data.draw(st.integers(0, 4)), dtype=torch.float32)
    if data.draw(st.booleans(), label="fix-counts"):
        for entry in config["tensors"]:
            key = f"{entry['name']}:indices"
            if entry["kind"] == "sparse" and key in tensors:
                entry["count"] = tensors[key].numel()
    blob = save_safetensors(tensors, metadata={"format": FORMAT})
    check(subject, subject.write(blob, config, rehash=True), "tensor-edits")


@FUZZ
@given(data=st.data())
def test_config_edits(subject, data):
    config = copy.deepcopy(subject.config)
    mode = data.draw(st.sampled_from(["top", "entry", "entry", "structure", "whole", "raw"]))
    if mode == "whole":
        subject.write(subject.tensors, json.dumps(data.draw(JSON_VALUES, label="config")), False)
        check(subject, subject.folder, "config-edits")
        return
    if mode == "raw":
        text = data.draw(
            st.binary(max_size=300)
            | st.integers(1, 200_000).map(lambda n: ("[" * n + "]" * n).encode())
            | st.integers(1, 5000).map(lambda n: b'{"format_version": 1' + b"0" * n + b"}"),
            label="raw",
        )
        check(subject, subject.write(subject.tensors, text, False), "config-edits")
        return
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        entries = config.get("tensors")
        if mode == "top" or not isinstance(entries, list) or not entries:
            key = data.draw(
                st.sampled_from(sorted(config) + ["extra"])
                if isinstance(config, dict)
                else st.just("extra"),
                label="key",
            )
            if data.draw(st.booleans(), label="delete"):
                config.pop(key, None)
            else:
                config[key] = data.draw(JSON_VALUES, label="value")
        elif mode == "entry":
            entry = entries[data.draw(st.integers(0, len(entries) - 1), label="entry")]
            if not isinstance(entry, dict):
                continue
            field = data.draw(
                st.sampled_from(["name", "kind", "count", "shape", "dtype", "base_sha256"])
            )
            plausible = {
                "name": st.sampled_from(sorted(subject.base)) | st.text(max_size=30),
                "kind": st.sampled_from(["sparse", "replace", "dense", "Sparse"]),
                "count": BIG_INTS,
                "shape": st.lists(BIG_INTS, max_size=4),
                "dtype": st.sampled_from(CONFIG_DTYPES),
                "base_sha256": st.text(alphabet="0123456789abcdef", min_size=0, max_size=64),
            }[field]
            choice = data.draw(st.sampled_from(["delete", "plausible", "plausible", "json"]))
            if choice == "delete":
                entry.pop(field, None)
            else:
                entry[field] = data.draw(plausible if choice == "plausible" else JSON_VALUES)
        else:
            action = data.draw(
                st.sampled_from(
                    ["duplicate", "drop", "swap-names", "reverse", "as-dict", "metadata"]
                )
            )
            i = data.draw(st.integers(0, len(entries) - 1), label="i")
            j = data.draw(st.integers(0, len(entries) - 1), label="j")
            if action == "duplicate":
                entries.append(copy.deepcopy(entries[i]))
            elif action == "drop":
                entries.pop(i)
            elif action == "swap-names" and all(isinstance(entries[k], dict) for k in (i, j)):
                entries[i]["name"], entries[j]["name"] = entries[j]["name"], entries[i]["name"]
            elif action == "reverse":
                entries.reverse()
            elif action == "as-dict":
                config["tensors"] = {str(k): e for k, e in enumerate(entries)}
            else:
                config["metadata"] = data.draw(JSON_VALUES, label="metadata")
    text = json.dumps(config, allow_nan=True)
    check(subject, subject.write(subject.tensors, text, False), "config-edits")
