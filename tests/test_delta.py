"""`unmask.delta.SparseDelta` end to end: train tiny models; save, load, apply, remove, add;
refuse bad input."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import assert_clear, bits, sparse_delta, tiny_bert, train_id3
from safetensors.torch import save_file
from torch import nn

import unmask
import unmask.delta_format
import unmask.fingerprints
from unmask import DeltaError, SparseDelta

transformers = pytest.importorskip("transformers")

TENSORS = "delta.safetensors"
CONFIG = "delta_config.json"
STEPS = 5


# ---------------------------------------------------------------------------- tiny models


def make_bert(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)
    model.config._name_or_path = "tiny-random-bert"
    return model


def make_llama(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    model.config._name_or_path = "tiny-random-llama"
    return model


def batch(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (4, 12), generator=generator)
    if isinstance(model, transformers.LlamaForCausalLM):
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 2, (4,), generator=generator)}


def train(
    model: nn.Module, data_seed: int = 1, budget="1%", dense=None, **kwargs
) -> tuple[unmask.SelectiveOptimizer, SparseDelta]:
    """Train `model` in place for STEPS steps on random batches; return (optimizer, delta)."""
    opt = unmask.SelectiveOptimizer(
        model, method="id3", budget=budget, total_steps=STEPS, lr=1e-2, dense=dense, **kwargs
    )
    generator = torch.Generator().manual_seed(data_seed)
    for _ in range(STEPS):
        model(**batch(model, generator)).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt, opt.delta()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    for name, p in params.items():
        assert p.dtype == expected[name].dtype, name
        assert torch.equal(p.detach(), expected[name]), f"{name} changed"


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of the floating-point grid at |x| (one rounding step is at most this)."""
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, math.inf)) - a


def touched_mask(delta: SparseDelta, name: str, shape) -> torch.Tensor:
    mask = torch.zeros(math.prod(shape), dtype=torch.bool)
    if name in delta.sparse:
        mask[delta.sparse[name][0].long()] = True
    elif name in delta.replace:
        mask[:] = True
    return mask.view(shape)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rehash(folder: Path) -> None:
    """Make the config's tensors_sha256 match the (possibly tampered) tensors file."""
    config = json.loads((folder / CONFIG).read_text())
    config["tensors_sha256"] = sha256(folder / TENSORS)
    (folder / CONFIG).write_text(json.dumps(config))


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def last_sparse_name(delta: SparseDelta) -> str:
    return list(delta.sparse)[-1]


class Two(nn.Module):
    """A linear layer, then a conv layer (channels_last when asked), then another linear one."""

    def __init__(self, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 4).to(dtype)
        self.conv = nn.Conv2d(3, 4, 3).to(dtype)
        self.last = nn.Linear(4, 2).to(dtype)
        if channels_last:
            self.conv.to(memory_format=torch.channels_last)


def random_delta(model: nn.Module, seed: int, scale: float) -> SparseDelta:
    """A delta of every third weight of each tensor, with values of magnitude ~`scale`."""
    gen = torch.Generator().manual_seed(seed)
    sparse, base_values = {}, {}
    for name, p in model.named_parameters():
        index = torch.randperm(p.numel(), generator=gen)[: p.numel() // 3].sort().values
        values = torch.randn(index.numel(), generator=gen) * scale
        sparse[name] = (index.to(torch.int32), values)
        base_values[name] = p.detach().reshape(-1)[index].float()
    return SparseDelta.from_training(model, sparse, base_values, {}, {})


# ---------------------------------------------------------------------------- shared fixtures
# Fixture models are never modified: every test that writes to a model deep-copies it first.


@pytest.fixture(scope="module")
def bert_base():
    return make_bert(0)


@pytest.fixture(scope="module")
def bert_dense(bert_base):
    """BERT trained with a dense (replaced) classification head."""
    model = copy.deepcopy(bert_base)
    opt, delta = train(model, dense=["classifier"])
    return model, delta, opt


@pytest.fixture(scope="module")
def bert_sparse(bert_base):
    """BERT trained with every tensor a candidate: a delta without replaced tensors."""
    model = copy.deepcopy(bert_base)
    _, delta = train(model, dense=None)
    assert not delta.replace
    return model, delta


@pytest.fixture(scope="module")
def saved_dense(bert_dense, tmp_path_factory):
    folder = tmp_path_factory.mktemp("delta") / "dense"
    bert_dense[1].save_pretrained(folder)
    return folder


@pytest.fixture
def tampered(saved_dense, tmp_path):
    """A private copy of a good saved delta, for tests that corrupt it."""
    folder = tmp_path / "copy"
    shutil.copytree(saved_dense, folder)
    return folder


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    ("make", "dtype", "dense"),
    [
        (make_bert, torch.float32, ["classifier"]),
        (make_llama, torch.float32, None),
        (make_llama, torch.bfloat16, None),
    ],
    ids=["bert-dense-head", "llama-fp32", "llama-bf16"],
)
def test_save_load_apply_reproduces_trained_model_bit_for_bit(make, dtype, dense, tmp_path):
    base = make(0).to(dtype)
    base_params = snapshot(base)
    trained = copy.deepcopy(base)
    _, delta = train(trained, dense=dense)
    trained_params = snapshot(trained)
    assert any(not torch.equal(trained_params[n], base_params[n]) for n in base_params)

    delta.save_pretrained(tmp_path / "d")
    loaded = SparseDelta.from_pretrained(tmp_path / "d")
    assert loaded.sparse.keys() == delta.sparse.keys()
    assert loaded.replace.keys() == delta.replace.keys()
    for name, (indices, values) in delta.sparse.items():
        assert torch.equal(loaded.sparse[name][0], indices)
        assert torch.equal(loaded.sparse[name][1], values)
    assert loaded.num_weights == delta.num_weights

    fresh = copy.deepcopy(base)
    assert loaded.apply_(fresh) is fresh
    assert_params_equal(fresh, trained_params)

    # Only what the delta names differs from the base, and the budget held.
    for name, p in base_params.items():
        changed = trained_params[name] != p
        assert not (changed & ~touched_mask(delta, name, p.shape)).any(), name
    pool = sum(p.numel() for p in base.parameters())
    assert delta.num_weights <= unmask.resolve_budget("1%", pool)


# ---------------------------------------------------------------------------- remove_


@pytest.mark.parametrize("make", [make_bert, make_llama], ids=["bert", "llama"])
def test_remove_restores_the_base(make, tmp_path):
    base = make(0)
    base_params = snapshot(base)
    trained = copy.deepcopy(base)
    _, delta = train(trained, dense=None)
    assert not delta.replace
    trained_params = snapshot(trained)
    delta.save_pretrained(tmp_path / "d")
    delta = SparseDelta.from_pretrained(tmp_path / "d")

    assert delta.remove_(trained) is trained
    moved_far = 0
    for name, p in trained.named_parameters():
        restored, orig, before = p.detach(), base_params[name], trained_params[name]
        mask = touched_mask(delta, name, orig.shape)
        # Weights the delta does not name: bit-identical.
        assert torch.equal(restored[~mask], orig[~mask]), name
        # Named weights: s = fl(a + d), r = fl(s - d). |s - (a + d)| <= ulp(s)/2 and
        # |r - (s - d)| <= ulp(r)/2, so |r - a| <= max(ulp(s), ulp(r)): one rounding step.
        r, a, s = restored[mask], orig[mask], before[mask]
        bound = torch.maximum(ulp(s), ulp(r))
        assert ((r - a).abs() <= bound).all(), name
        moved_far += int(((s - a).abs() > bound).sum())
    # Otherwise a remove_ that did nothing would pass.
    assert moved_far > 0


def test_remove_of_a_delta_with_replaced_tensors_is_refused(bert_dense):
    trained, delta, _ = bert_dense
    assert "classifier.weight" in delta.replace
    model = copy.deepcopy(trained)
    before = snapshot(model)
    with pytest.raises(DeltaError, match=r"replaces whole tensors"):
        delta.remove_(model)
    assert_params_equal(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_remove_refuses_a_model_that_never_had_the_delta(dtype):
    model = Two(dtype)
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(20, generator=generator) * 1e-2
    delta = sparse_delta(
        model,
        {
            "first.weight": (list(range(0, 16, 2)), values[:8]),
            "conv.weight": ([1, 9], values[8:10]),
        },
    )
    before = bits(model)
    with pytest.raises(DeltaError) as err:  # the old code subtracted silently
        delta.remove_(model)
    assert_clear(str(err.value), r"does not hold base \+ delta", r"reload the base model")
    assert bits(model) == before
    # A model that has it: removed, back to the base's values.
    delta.apply_(model)
    applied = bits(model)
    assert applied != before
    delta.remove_(model)
    for (name, a), b in zip(model.named_parameters(), Two(dtype).parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-2, atol=0), name
    # A model to which another delta was applied is refused as well.
    model = Two(dtype)
    other = sparse_delta(model, {"conv.weight": ([0, 1], values[10:12])})
    other.apply_(model)
    changed = bits(model)
    with pytest.raises(DeltaError, match=r"does not hold base \+ delta"):
        delta.remove_(model)
    assert bits(model) == changed


def test_remove_of_a_trained_delta_works_and_refuses_the_base():
    base = tiny_bert(0)
    trained = copy.deepcopy(base)
    delta = train_id3(trained).delta()
    before = bits(base)
    with pytest.raises(DeltaError, match=r"was not applied"):
        delta.remove_(base)
    assert bits(base) == before
    delta.remove_(trained)
    for (name, a), b in zip(trained.named_parameters(), base.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-3, 1.0], ids=["small", "large"])
def test_apply_remove_apply_swaps_deltas_bit_exactly(dtype, scale, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4)).to(dtype)
    base_state = {n: p.detach().clone() for n, p in base.named_parameters()}
    a, b = random_delta(base, 1, scale), random_delta(base, 2, scale)
    b.save_pretrained(tmp_path / "b")
    b = SparseDelta.from_pretrained(tmp_path / "b")
    expected = b.apply_(copy.deepcopy(base))
    model = copy.deepcopy(base)
    a.apply_(model)
    a.remove_(model)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.uint8), base_state[name].view(torch.uint8)), name
    b.apply_(model)  # the base hash matches again
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(p.detach().view(torch.uint8), q.detach().view(torch.uint8)), name
    b.remove_(model)
    a.apply_(model)  # and back


# ---------------------------------------------------------------------------- file size


def test_file_size_is_8_bytes_per_weight_plus_a_constant_per_tensor(tmp_path):
    """fp32: int32 index + fp32 value per weight; the rest is the safetensors header.

    The header holds, per sparse tensor, two JSON entries whose keys contain the parameter name
    ("name:indices", "name:values"), so we model
        size = 8 n + 2 * sum(len(name)) + c * k + c0
    (k tensors), fit c and c0 on two budgets and check a third against the fit.
    """
    measurements = []
    for budget in ("0.5%", "6%", "20%"):
        model = make_bert(0)
        _, delta = train(model, budget=budget, dense=None)
        folder = tmp_path / budget
        delta.save_pretrained(folder)
        path = folder / TENSORS
        size = path.stat().st_size
        n = delta.num_weights
        # The data section alone is exactly 8 bytes per changed weight.
        assert size - 8 - header_length(path) == 8 * n
        for indices, values in delta.sparse.values():
            assert indices.dtype == torch.int32 and values.dtype == torch.float32
        names = 2 * sum(len(name) for name in delta.shapes)
        measurements.append((n, len(delta.shapes), size - 8 * n - names))

    (n1, k1, r1), (n2, k2, r2), (n3, k3, r3) = measurements
    assert n1 < n2 < n3
    assert k1 != k2, "the fit needs two budgets touching different numbers of tensors"
    c = (r2 - r1) / (k2 - k1)
    c0 = r1 - c * k1
    # A safetensors entry is {"dtype":"I32","shape":[n],"data_offsets":[a,b]} plus a
    # separator: about 65 bytes each, two per tensor, plus the 8-byte length and metadata.
    assert 0 < c <= 200, c
    assert abs(c0) <= 200, c0
    # The third budget: offsets and counts gain digits as n grows (<= 8 bytes per tensor),
    # and the header is padded to a multiple of 8.
    assert r3 <= c * k3 + c0 + 8 * k3 + 8, (r3, c, c0, k3)


# ---------------------------------------------------------------------------- files and config


def test_folder_holds_only_safetensors_and_json_without_pickle(bert_dense, tmp_path, monkeypatch):
    trained, delta, opt = bert_dense
    folder = tmp_path / "d"
    delta.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([TENSORS, CONFIG])

    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    assert config["tensors_sha256"] == sha256(folder / TENSORS)
    meta = config["metadata"]
    assert meta["method"] == "id3"
    assert meta["budget"] == opt.total_budget  # includes the dense head it charges
    assert meta["sparse_budget"] == opt.budget
    assert meta["budget"] - meta["sparse_budget"] == sum(v.numel() for v in delta.replace.values())
    assert meta["score_eps"] == 1e-3
    assert meta["score_exp"] == 1.0
    assert meta["total_steps"] == STEPS
    assert meta["base_model"] == "tiny-random-bert"

    params = dict(trained.named_parameters())
    entries = {e["name"]: e for e in config["tensors"]}
    assert entries.keys() == delta.shapes.keys()
    for name, entry in entries.items():
        assert entry["shape"] == list(params[name].shape)
        assert entry["dtype"] == "float32"
        assert entry["kind"] == ("replace" if name in delta.replace else "sparse")
        assert entry["count"] == delta.allocation()[name]
    assert entries["classifier.weight"]["kind"] == "replace"
    assert sum(e["count"] for e in entries.values()) == config["num_weights"] == delta.num_weights

    # safetensors header: plain JSON naming only our tensors.
    raw = (folder / TENSORS).read_bytes()
    header = json.loads(raw[8 : 8 + header_length(folder / TENSORS)])
    assert set(header) - {"__metadata__"} == {
        *(f"{n}:indices" for n in delta.sparse),
        *(f"{n}:values" for n in delta.sparse),
        *(f"{n}:replace" for n in delta.replace),
    }

    # Loading must not unpickle anything.
    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used while loading a delta")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = SparseDelta.from_pretrained(folder)
    assert loaded.metadata == meta


def test_metadata_records_score_settings(tmp_path):
    model = make_bert(0)
    _, delta = train(model, score_eps=0.1, score_exp=2.0)
    delta.save_pretrained(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / CONFIG).read_text())["metadata"]
    assert (meta["score_eps"], meta["score_exp"]) == (0.1, 2.0)


# ---------------------------------------------------------------------------- refused applies


def test_apply_to_a_different_base_is_refused(bert_dense):
    _, delta, _ = bert_dense
    other = make_bert(1)  # same config, another random init
    before = snapshot(other)
    with pytest.raises(DeltaError, match=r"differs from the base model"):
        delta.apply_(other)
    assert_params_equal(other, before)


def test_apply_refuses_one_changed_weight_in_the_last_tensor(bert_base, bert_dense):
    _, delta, _ = bert_dense
    model = copy.deepcopy(bert_base)
    name = last_sparse_name(delta)
    with torch.no_grad():
        flat = dict(model.named_parameters())[name].view(-1)
        flat[-1] = torch.nextafter(flat[-1], torch.tensor(math.inf))
    before = snapshot(model)
    with pytest.raises(DeltaError, match=rf"tensor {name} of this model differs"):
        delta.apply_(model)
    # All or nothing: the tensors checked before the bad one were not written either.
    assert_params_equal(model, before)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


@pytest.mark.parametrize("which", ["sparse", "replace"])
def test_apply_to_a_model_missing_a_parameter_is_refused(bert_base, bert_dense, which):
    _, delta, _ = bert_dense
    name = last_sparse_name(delta) if which == "sparse" else list(delta.replace)[-1]
    model = copy.deepcopy(bert_base)
    module, attr = _owner(model, name)
    delattr(module, attr)
    before = snapshot(model)
    with pytest.raises(DeltaError, match=rf"the model has no parameter {name}"):
        delta.apply_(model)
    assert_params_equal(model, before)


@pytest.mark.parametrize("which", ["sparse", "replace"])
def test_apply_to_a_model_with_another_shape_is_refused(bert_base, bert_dense, which):
    _, delta, _ = bert_dense
    name = last_sparse_name(delta) if which == "sparse" else list(delta.replace)[-1]
    model = copy.deepcopy(bert_base)
    module, attr = _owner(model, name)
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(torch.zeros(old.numel() + 1)))
    before = snapshot(model)
    with pytest.raises(DeltaError, match=rf"parameter {name} has shape \({old.numel() + 1},\)"):
        delta.apply_(model)
    assert_params_equal(model, before)


def test_apply_to_a_model_in_another_dtype_is_refused(bert_base, bert_dense):
    _, delta, _ = bert_dense
    model = copy.deepcopy(bert_base).to(torch.float64)
    before = snapshot(model)
    with pytest.raises(DeltaError, match=r"is float64, the delta was trained in float32"):
        delta.apply_(model)
    assert_params_equal(model, before)


def test_remove_from_a_model_in_another_dtype_is_refused(bert_sparse):
    trained, delta = bert_sparse
    model = copy.deepcopy(trained).to(torch.float64)
    before = snapshot(model)
    with pytest.raises(DeltaError, match=r"is float64"):
        delta.remove_(model)
    assert_params_equal(model, before)


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Like `assert_params_equal`, skipping the parameters on the meta device (no values)."""
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        assert p.dtype == before[name].dtype and torch.equal(p.detach(), before[name]), name


@pytest.mark.parametrize(
    ("convert", "name", "got"),
    [
        (lambda m: m.half(), "bert.embeddings.word_embeddings.weight", "float16"),
        (lambda m: m.double(), "bert.embeddings.word_embeddings.weight", "float64"),
        (lambda m: m.classifier.double(), "classifier.weight", "float64"),
    ],
    ids=["model-fp16", "model-fp64", "head-only-fp64"],
)
def test_delta_applied_to_a_model_in_another_dtype(trained_delta, convert, name, got):
    base, delta = trained_delta
    model = copy.deepcopy(base)
    convert(model)
    before = snapshot(model)
    with pytest.raises(DeltaError) as err:
        delta.apply_(model)
    assert_clear(
        str(err.value),
        rf"parameter {re.escape(name)} is {got}, the delta was trained in float32",
        r"load the model with (torch_)?dtype=float32",
    )
    assert_unchanged(model, before)


# Only a CPU exists on the machines these tests run on, so "a parameter on another device" is
# simulated with torch's 'meta' device: a tensor with shape and dtype but no storage, which is
# what a model built under init_empty_weights / device_map="meta" holds until its weights are
# loaded. (On a real second device, e.g. cuda, apply_ moves the values to the parameter's device
# by design; that path is not exercised here.)


def test_delta_applied_to_a_model_on_the_meta_device(trained_delta):
    base, delta = trained_delta
    model = copy.deepcopy(base).to("meta")
    with pytest.raises(DeltaError) as err:
        delta.apply_(model)
    assert_clear(str(err.value), r"meta", r"load|materiali[sz]e|to\(")


def test_delta_applied_to_a_model_with_one_tensor_on_the_meta_device(trained_delta):
    base, delta = trained_delta
    model = copy.deepcopy(base)
    model.classifier.weight = torch.nn.Parameter(model.classifier.weight.detach().to("meta"))
    before = snapshot(model)
    with pytest.raises(DeltaError) as err:
        delta.apply_(model)
    assert_clear(str(err.value), r"classifier\.weight.*meta", r"load|materiali[sz]e|to\(")
    assert_unchanged(model, before)


# Every write into a model is computed and checked (after the cast to the parameter's dtype)
# before the first one; a refusal leaves the model bit-identical.


def overflowing(values: torch.Tensor) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Fine changes of first.weight, then `values` (too large for the model's dtype) in
    last.bias."""
    fine = torch.full((3,), 0.5, dtype=values.dtype)
    return {"first.weight": ([0, 1, 2], fine), "last.bias": ([1], values)}


@pytest.mark.parametrize(
    ("model", "changes"),
    [
        pytest.param(
            {"dtype": torch.float32},
            overflowing(torch.tensor([1e300], dtype=torch.float64)),
            id="fp64-1e300-into-fp32",
        ),
        pytest.param(
            {"dtype": torch.float16},
            overflowing(torch.tensor([1e5], dtype=torch.float32)),
            id="fp32-1e5-into-fp16",
        ),
        pytest.param(
            {"dtype": torch.bfloat16},
            overflowing(torch.tensor([1e300], dtype=torch.float64)),
            id="fp64-1e300-into-bf16",
        ),
        pytest.param(
            {"channels_last": True},
            {
                "first.weight": ([0], torch.ones(1)),
                "conv.weight": ([3], torch.ones(1)),
                "last.bias": ([0], torch.tensor([1e300], dtype=torch.float64)),
            },
            id="channels-last-model",
        ),
    ],
)
def test_apply_refuses_finite_values_that_overflow_the_parameters_dtype(model, changes):
    model = Two(**model)
    delta = sparse_delta(model, changes)
    before = bits(model)
    with pytest.raises(DeltaError) as err:
        delta.apply_(model)
    assert_clear(str(err.value), r"last\.bias.*overflow", r"another dtype")
    assert bits(model) == before  # first.weight, changed earlier in the old code, is untouched


def test_replaced_tensor_in_another_dtype_than_recorded_is_refused(tmp_path):
    model = Two()
    head = torch.full((2,), 1e300, dtype=torch.float64)  # finite, but inf as the fp32 parameter
    with pytest.raises(DeltaError, match=r"last\.bias is float64.*records.*float32"):
        sparse_delta(model, {}, **{"last.bias": head})
    # Through a file: a saved fp32 head rewritten as float64 is refused on load.
    good = sparse_delta(model, {}, **{"last.bias": torch.ones(2)})
    good.replace["last.bias"] = head
    good.save_pretrained(tmp_path / "d")
    with pytest.raises(DeltaError, match=r"records its parameter as float32"):
        SparseDelta.from_pretrained(tmp_path / "d")


def test_replaced_tensor_that_overflows_after_the_cast_is_refused():
    """Defence in depth: a delta edited after it was checked is checked again at apply_."""
    model = Two(torch.float16)
    delta = sparse_delta(
        model, {"first.weight": ([0], torch.ones(1))}, **{"last.bias": torch.ones(2).half()}
    )
    delta.replace["last.bias"] = torch.tensor([1.0, 1e300], dtype=torch.float64)
    before = bits(model)
    with pytest.raises(DeltaError, match=r"NaN or infinite value\(s\) into last\.bias"):
        delta.apply_(model)
    assert bits(model) == before


def test_apply_to_a_channels_last_conv_weight_writes_the_logical_positions():
    plain, strided = Two(), Two(channels_last=True)
    assert not strided.conv.weight.is_contiguous()
    changes = {
        "first.weight": ([0, 5], torch.tensor([0.25, -0.5])),
        "conv.weight": ([0, 7, 100, 107], torch.tensor([1.0, 2.0, 3.0, 4.0])),
    }
    delta = sparse_delta(plain, changes)
    delta.apply_(plain)
    delta.apply_(strided)  # the old code raised from .view(-1) after changing first.weight
    assert not strided.conv.weight.is_contiguous()
    for (name, a), b in zip(plain.named_parameters(), strided.parameters(), strict=True):
        assert torch.equal(a, b), name
    delta.remove_(strided)  # within one rounding step of the base (values > the weights here)
    for (name, a), b in zip(strided.named_parameters(), Two().parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name


def test_labels_of_a_good_delta_are_returned(head_delta):
    assert head_delta.labels() is None
    head_delta.metadata["label_names"] = ["neg", "pos"]
    assert head_delta.labels() == ["neg", "pos"]


# ---------------------------------------------------------------------------- adding deltas


def test_sum_of_two_deltas_equals_sequential_application(bert_base, tmp_path):
    m1, m2 = copy.deepcopy(bert_base), copy.deepcopy(bert_base)
    _, d1 = train(m1, data_seed=11, budget="5%")
    _, d2 = train(m2, data_seed=22, budget="5%")
    both = d1 + d2

    # Overlapping indices: the values add; elsewhere each delta's values are kept as they are.
    overlaps = 0
    for name in d1.sparse.keys() | d2.sparse.keys():
        numel = math.prod(both.shapes[name])
        dense = torch.zeros(2, numel)
        present = torch.zeros(2, numel, dtype=torch.bool)
        for row, d in enumerate((d1, d2)):
            if name in d.sparse:
                indices, values = d.sparse[name]
                dense[row, indices.long()] = values
                present[row, indices.long()] = True
        indices, values = both.sparse[name]
        assert indices.tolist() == present.any(0).nonzero().flatten().tolist(), name
        # Where only one delta has the weight, the sum is that value exactly (v + 0 = v).
        assert torch.equal(values, (dense[0] + dense[1])[indices.long()]), name
        overlaps += int(present.all(0).sum())
    assert overlaps > 0, "the two runs should share some selected weights"

    # Saved and reloaded, the sum still applies to the base.
    both.save_pretrained(tmp_path / "sum")
    both = SparseDelta.from_pretrained(tmp_path / "sum")
    combined = copy.deepcopy(bert_base)
    both.apply_(combined)

    # Sequential: d1 then d2, each with apply_'s own expression (apply_ itself refuses d2 on a
    # model d1 already changed, by design, so the second write is done by hand).
    sequential = copy.deepcopy(bert_base)
    d1.apply_(sequential)
    once = snapshot(sequential)
    with torch.no_grad():
        for name, (indices, values) in d2.sparse.items():
            flat = dict(sequential.named_parameters())[name].view(-1)
            flat[indices.long()] = flat[indices.long()] + values

    combined_p, sequential_p = snapshot(combined), snapshot(sequential)
    for name, base in snapshot(bert_base).items():
        in1, in2 = touched_mask(d1, name, base.shape), touched_mask(d2, name, base.shape)
        c, s = combined_p[name], sequential_p[name]
        overlap = in1 & in2
        # Touched by at most one delta: the very same expression, so bit-identical.
        assert torch.equal(c[~overlap], s[~overlap]), name
        assert torch.equal(c[~(in1 | in2)], base[~(in1 | in2)]), name
        if name not in both.sparse:
            continue
        # Touched by both. With w = fl(v1 + v2) and s1 = fl(a + v1):
        #   combined   C = fl(a + w):   |C - (a + v1 + v2)| <= ulp(C)/2 + ulp(w)/2
        #   sequential S = fl(s1 + v2): |S - (a + v1 + v2)| <= ulp(S)/2 + ulp(s1)/2
        w = torch.zeros(base.numel())
        indices, values = both.sparse[name]
        w[indices.long()] = values
        w = w.view(base.shape)[overlap]
        s1 = once[name][overlap]
        bound = (ulp(c[overlap]) + ulp(w) + ulp(s[overlap]) + ulp(s1)) / 2
        assert ((c[overlap] - s[overlap]).abs() <= bound).all(), name


def test_adding_deltas_of_different_bases_is_refused(bert_sparse):
    _, d_same = bert_sparse
    other = make_bert(7)
    _, d_other = train(other, budget="5%")
    shared = d_same.sparse.keys() & d_other.sparse.keys()
    assert shared, "the check needs a tensor both deltas change"
    with pytest.raises(DeltaError, match=r"different base models"):
        _ = d_same + d_other


def test_adding_deltas_that_both_replace_a_tensor_is_refused(bert_dense):
    _, delta, _ = bert_dense
    with pytest.raises(DeltaError, match=r"replaced tensor"):
        _ = delta + delta


# ---------------------------------------------------------------------------- corrupted files


def load(folder: Path) -> SparseDelta:
    """from_pretrained, failing the test on any exception other than DeltaError."""
    try:
        return SparseDelta.from_pretrained(folder)
    except DeltaError:
        raise
    except BaseException as err:  # every other type is a bug
        pytest.fail(f"from_pretrained raised {type(err).__name__}, not DeltaError: {err}")


def test_good_copy_loads(tampered, bert_dense):
    # Positive control for the corruption tests below.
    assert load(tampered).num_weights == bert_dense[1].num_weights


@pytest.mark.parametrize("keep", [0, 4, 8, 100, -100, -1])
@pytest.mark.parametrize("matching_sha", [False, True], ids=["old-sha", "new-sha"])
def test_truncated_tensors_file(tampered, keep, matching_sha):
    data = (tampered / TENSORS).read_bytes()
    (tampered / TENSORS).write_bytes(data[:keep])
    if matching_sha:
        rehash(tampered)
    with pytest.raises(DeltaError):
        load(tampered)


@pytest.mark.parametrize("where", [3, 20, 200, -9, -1])
def test_flipped_byte_fails_the_checksum(tampered, where):
    data = bytearray((tampered / TENSORS).read_bytes())
    data[where] ^= 0x01
    (tampered / TENSORS).write_bytes(bytes(data))
    with pytest.raises(DeltaError, match=r"sha256 differs"):
        load(tampered)


def test_flipped_bytes_with_matching_checksum_never_escape_as_other_errors(tampered):
    """The checksum cannot catch a tampered pair; validation must still hold for each byte."""
    data = (tampered / TENSORS).read_bytes()
    header_end = 8 + header_length(tampered / TENSORS)
    positions = [*range(0, header_end, 11), *range(header_end, len(data), 37)]
    refused = 0
    for pos in positions:
        for mask in (0x01, 0xFF):
            flipped = bytearray(data)
            flipped[pos] ^= mask
            (tampered / TENSORS).write_bytes(bytes(flipped))
            rehash(tampered)
            try:
                load(tampered)
            except DeltaError:
                refused += 1
    assert refused > len(positions) // 2


def test_config_sha_mismatch(tampered):
    config = json.loads((tampered / CONFIG).read_text())
    config["tensors_sha256"] = hashlib.sha256(b"something else").hexdigest()
    (tampered / CONFIG).write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"sha256 differs"):
        load(tampered)


@pytest.mark.parametrize(
    "field", ["format", "format_version", "tensors_sha256", "tensors", "metadata"]
)
def test_config_missing_top_level_field(tampered, field):
    config = json.loads((tampered / CONFIG).read_text())
    del config[field]
    (tampered / CONFIG).write_text(json.dumps(config))
    with pytest.raises(DeltaError):
        load(tampered)


@pytest.mark.parametrize("field", ["name", "kind", "count", "shape", "dtype", "base_sha256"])
def test_config_entry_missing_field(tampered, field):
    config = json.loads((tampered / CONFIG).read_text())
    entry = next(e for e in config["tensors"] if e["kind"] == "sparse")
    del entry[field]
    (tampered / CONFIG).write_text(json.dumps(config))
    with pytest.raises(DeltaError):
        load(tampered)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "dense"),
        ("count", -1),
        ("count", 10**9),
        ("count", "3"),
        ("shape", [-1, 32]),
        ("shape", "32x32"),
        ("dtype", "int32"),
        ("base_sha256", None),
    ],
)
def test_config_entry_bad_value(tampered, field, value):
    config = json.loads((tampered / CONFIG).read_text())
    entry = next(e for e in config["tensors"] if e["kind"] == "sparse")
    entry[field] = value
    (tampered / CONFIG).write_text(json.dumps(config))
    with pytest.raises(DeltaError):
        load(tampered)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"{not json", r"not valid JSON"),
        (b"\xff\xfe\x00garbage", r"not valid JSON"),
        (b"[1, 2, 3]", r"not an unmask delta config"),
        (b'{"format": "unmask.SparseDelta", "format_version": 99}', r"format_version 99"),
    ],
)
def test_config_not_a_delta_config(tampered, text, message):
    (tampered / CONFIG).write_bytes(text)
    with pytest.raises(DeltaError, match=message):
        load(tampered)


def test_config_listing_a_tensor_twice(tampered):
    config = json.loads((tampered / CONFIG).read_text())
    config["tensors"].append(config["tensors"][0])
    (tampered / CONFIG).write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"listed twice"):
        load(tampered)


@pytest.mark.parametrize("missing", [TENSORS, CONFIG])
def test_missing_file(tampered, missing):
    (tampered / missing).unlink()
    with pytest.raises(DeltaError, match=r"not found"):
        load(tampered)


@pytest.mark.parametrize("case", ["deep-nesting", "huge-int", "dtype-list"])
def test_hostile_config_raises_delta_error(tampered, case):
    if case == "deep-nesting":
        (tampered / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    elif case == "huge-int":
        text = (tampered / CONFIG).read_text()
        (tampered / CONFIG).write_text(
            text.replace('"format_version": 1', '"format_version": 1' + "0" * 5000)
        )
    else:
        config = json.loads((tampered / CONFIG).read_text())
        config["tensors"][0]["dtype"] = ["float32"]
        (tampered / CONFIG).write_text(json.dumps(config))
    with pytest.raises(DeltaError):
        load(tampered)


# ---------------------------------------------------------------------------- crafted files

SHAPE = [4, 4]


def write_crafted(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    entries: list[dict] | None = None,
) -> Path:
    """A delta folder built by hand: safetensors file plus a config with the right sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / TENSORS), metadata={"format": "unmask.SparseDelta"})
    if entries is None:
        entries = [
            {
                "name": "w",
                "kind": "sparse",
                "count": int(tensors["w:indices"].numel()) if "w:indices" in tensors else 0,
                "shape": SHAPE,
                "dtype": "float32",
                "base_sha256": unmask.fingerprints.tensor_hash(torch.zeros(SHAPE)),
            }
        ]
    config = {
        "format": "unmask.SparseDelta",
        "format_version": 1,
        "tensors_sha256": sha256(folder / TENSORS),
        "num_weights": sum(e["count"] for e in entries),
        "tensors": entries,
        "metadata": {},
    }
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


def sparse_tensors(indices, values=None, index_dtype=torch.int32, value_dtype=torch.float32):
    indices = torch.tensor(indices, dtype=index_dtype)
    if values is None:
        values = [0.5] * indices.numel()
    return {"w:indices": indices, "w:values": torch.tensor(values, dtype=value_dtype)}


def test_crafted_good_delta_loads_and_applies(tmp_path):
    folder = write_crafted(tmp_path / "d", sparse_tensors([1, 5, 15], [0.5, -1.0, 2.0]))
    delta = load(folder)
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(SHAPE))
    delta.apply_(model)
    expected = torch.zeros(16)
    expected[[1, 5, 15]] = torch.tensor([0.5, -1.0, 2.0])
    assert torch.equal(model.w.detach().view(-1), expected)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (sparse_tensors([5, 1, 7]), r"not strictly ascending"),
        (sparse_tensors([1, 1, 7]), r"not strictly ascending"),
        (sparse_tensors([1, 5, 16]), r"out of range"),
        (sparse_tensors([-1, 2, 3]), r"out of range"),
        (sparse_tensors([1, 2, 3], index_dtype=torch.int16), r"int32/int64"),
        (sparse_tensors([1, 2, 3], index_dtype=torch.float32), r"int32/int64"),
        (sparse_tensors([1, 2, 3], value_dtype=torch.int32), r"floating point"),
        (sparse_tensors([1, 2, 3], [0.5, math.nan, 1.0]), r"NaN or infinity"),
        (sparse_tensors([1, 2, 3], [0.5, math.inf, 1.0]), r"NaN or infinity"),
        (
            {"w:indices": torch.tensor([1, 2, 3], dtype=torch.int32), "w:values": torch.ones(2)},
            r"3 indices but 2 values",
        ),
        (
            {"w:indices": torch.tensor([[1, 2]], dtype=torch.int32), "w:values": torch.ones(2)},
            r"1-D",
        ),
        ({"w:indices": torch.tensor([1, 2, 3], dtype=torch.int32)}, r"lacks tensor w:values"),
        ({**sparse_tensors([1, 2]), "extra": torch.ones(1)}, r"does not list"),
    ],
    ids=[
        "descending",
        "duplicate",
        "past-end",
        "negative",
        "int16-indices",
        "float-indices",
        "int-values",
        "nan",
        "inf",
        "length-mismatch",
        "2d-indices",
        "missing-values",
        "extra-tensor",
    ],
)
def test_crafted_bad_sparse_entry(tmp_path, tensors, message):
    folder = write_crafted(tmp_path / "d", tensors)
    with pytest.raises(DeltaError, match=message):
        load(folder)


def test_crafted_count_mismatch(tmp_path):
    entries = [
        {
            "name": "w",
            "kind": "sparse",
            "count": 4,
            "shape": SHAPE,
            "dtype": "float32",
            "base_sha256": "0" * 32,
        }
    ]
    folder = write_crafted(tmp_path / "d", sparse_tensors([1, 2, 3]), entries)
    with pytest.raises(DeltaError, match=r"config says 4 weights, file has 3"):
        load(folder)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.ones(3, 4), r"has shape \(3, 4\), expected \(4, 4\)"),
        (torch.ones(4, 4).int(), "dtype"),
    ],
)
def test_crafted_bad_replaced_tensor(tmp_path, tensor, message):
    entries = [{"name": "w", "kind": "replace", "count": 16, "shape": SHAPE, "dtype": "float32"}]
    folder = write_crafted(tmp_path / "d", {"w:replace": tensor}, entries)
    with pytest.raises(DeltaError, match=message):
        load(folder)


# ---------------------------------------------------------------------------- atomic save


def test_failed_save_keeps_the_previous_delta(bert_dense, bert_sparse, tmp_path, monkeypatch):
    folder = tmp_path / "d"
    _, first, _ = bert_dense
    first.save_pretrained(folder)
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}

    real_save_file = unmask.delta_format.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(unmask.delta_format, "save_file", half_then_fail)
    _, second = bert_sparse
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(folder)

    assert {p.name: p.read_bytes() for p in folder.iterdir()} == saved  # no temp files left
    loaded = load(folder)
    assert loaded.replace.keys() == first.replace.keys()
    for name, (indices, values) in first.sparse.items():
        assert torch.equal(loaded.sparse[name][0], indices)
        assert torch.equal(loaded.sparse[name][1], values)


def test_save_interrupted_between_the_two_renames_keeps_the_previous_delta(
    bert_dense, bert_sparse, tmp_path, monkeypatch
):
    folder = tmp_path / "d"
    bert_dense[1].save_pretrained(folder)

    def crash(path, text):
        raise OSError("power cut")

    monkeypatch.setattr(unmask.delta_format, "atomic_write_text", crash)
    with pytest.raises(OSError, match="power cut"):
        bert_sparse[1].save_pretrained(folder)
    # New tensors file, old config: the kept copy of the old tensors pairs with the old config.
    loaded = load(folder)
    assert loaded.num_weights == bert_dense[1].num_weights and loaded.replace
    # Without that copy the mismatch is refused rather than paired up.
    (folder / unmask.delta_format.PREVIOUS_TENSORS_FILE).unlink()
    with pytest.raises(DeltaError, match=r"sha256 differs"):
        load(folder)


def test_save_overwrites_an_existing_delta(bert_dense, bert_sparse, tmp_path):
    folder = tmp_path / "d"
    bert_dense[1].save_pretrained(folder)
    bert_sparse[1].save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([TENSORS, CONFIG])
    loaded = load(folder)
    assert not loaded.replace
    assert loaded.num_weights == bert_sparse[1].num_weights


_SAVE_LOOP = """
import sys, torch
from unmask import SparseDelta
def make(value):
    idx = torch.arange(0, 20000, 2, dtype=torch.int32)
    return SparseDelta(sparse={"w": (idx, torch.full((10000,), value))}, replace={},
                       shapes={"w": (20000,)}, dtypes={"w": "float32"}, base_hashes={"w": "0"},
                       metadata={"value": value})
deltas = [make(1.0), make(2.0)]
i = 0
while True:
    deltas[i % 2].save_pretrained(sys.argv[1])
    i += 1
    if i == 1:
        print("saved", flush=True)
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_killed_save_leaves_a_loadable_delta(tmp_path, delay):
    """SIGKILL a process that saves deltas in a loop: the folder always loads, old or new."""
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(folder)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"saved"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    loaded = SparseDelta.from_pretrained(folder)
    value = loaded.metadata["value"]
    assert value in (1.0, 2.0)
    assert torch.equal(loaded.sparse["w"][1], torch.full((10000,), value))
