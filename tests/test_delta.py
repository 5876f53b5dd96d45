"""`unmask.SparseDelta` on trained tiny models: save, load and apply bit for bit, remove,
add, and refuse a model the delta does not fit, leaving it unchanged.

The file format and the refusal of damaged or hostile delta files are in
`tests/test_delta_format.py`."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from conftest import (
    assert_clear,
    bits,
    make_bert,
    sparse_delta,
    tiny_bert,
    train_delta,
    train_id3,
)
from torch import nn

import unmask
from unmask import DeltaError, SparseDelta

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------- tiny models


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
    _, delta = train_delta(trained, dense=dense)
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
    _, delta = train_delta(trained, dense=None)
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
    _, d1 = train_delta(m1, data_seed=11, budget="5%")
    _, d2 = train_delta(m2, data_seed=22, budget="5%")
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
    _, d_other = train_delta(other, budget="5%")
    shared = d_same.sparse.keys() & d_other.sparse.keys()
    assert shared, "the check needs a tensor both deltas change"
    with pytest.raises(DeltaError, match=r"different base models"):
        _ = d_same + d_other


def test_adding_deltas_that_both_replace_a_tensor_is_refused(bert_dense):
    _, delta, _ = bert_dense
    with pytest.raises(DeltaError, match=r"replaced tensor"):
        _ = delta + delta
