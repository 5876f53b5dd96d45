"""Issue 16 (root causes, part 3): writes into a model are checked whole before the first one.

A. values are checked after the cast to the parameter's dtype (what would be written), for sparse
   values and replaced tensors; B. `apply_` handles non-contiguous (channels_last) parameters and
   `SelectiveOptimizer.load_state_dict` validates shapes, index ranges and values before writing;
   C. `merge` checks the delta's label metadata before building a model; D. `remove_` refuses a
   model that never had the delta. Every refusal leaves the model bit-identical.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers
from conftest import tiny_bert
from torch import nn

from unmask import SelectiveOptimizer, SparseDelta
from unmask.cli import EXIT_USAGE, main
from unmask.delta import DeltaError, tensor_hash


def bits(model: nn.Module) -> dict[str, str]:
    """Per parameter: a hash of dtype, shape and bytes (so -0.0 and 0.0 differ)."""
    return {n: tensor_hash(p) for n, p in model.named_parameters()}


def assert_clear(message: str, what: str, fix: str) -> None:
    assert re.search(what, message), f"does not say what was wrong ({what!r}): {message!r}"
    assert re.search(fix, message), f"does not say what to do ({fix!r}): {message!r}"


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


def sparse_delta(model: nn.Module, changes: dict[str, tuple[list[int], torch.Tensor]], **replace):
    """A delta of `model` (its current values are the base) with the given flat changes."""
    params = dict(model.named_parameters())
    names = [*changes, *replace]
    return SparseDelta(
        sparse={n: (torch.tensor(i, dtype=torch.int32), v) for n, (i, v) in changes.items()},
        replace=dict(replace),
        shapes={n: tuple(params[n].shape) for n in names},
        dtypes={n: str(params[n].dtype).removeprefix("torch.") for n in names},
        base_hashes={n: tensor_hash(params[n]) for n in changes},
    )


# ------------------------------------------------- A. checked after the cast to the model's dtype


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        (torch.float32, torch.tensor([1e300], dtype=torch.float64)),
        (torch.float16, torch.tensor([1e5], dtype=torch.float32)),
        (torch.bfloat16, torch.tensor([1e300], dtype=torch.float64)),
    ],
    ids=["fp64-1e300-into-fp32", "fp32-1e5-into-fp16", "fp64-1e300-into-bf16"],
)
def test_apply_refuses_finite_values_that_overflow_the_parameters_dtype(dtype, values):
    model = Two(dtype)
    fine = torch.full((3,), 0.5, dtype=values.dtype)
    delta = sparse_delta(model, {"first.weight": ([0, 1, 2], fine), "last.bias": ([1], values)})
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


# ------------------------------------------------- B. every write into a model is checked first


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


def test_refused_apply_on_a_channels_last_model_leaves_it_bit_identical():
    model = Two(channels_last=True)
    delta = sparse_delta(
        model,
        {
            "first.weight": ([0], torch.ones(1)),
            "conv.weight": ([3], torch.ones(1)),
            "last.bias": ([0], torch.tensor([1e300], dtype=torch.float64)),
        },
    )
    before = bits(model)
    with pytest.raises(DeltaError, match=r"overflow"):
        delta.apply_(model)
    assert bits(model) == before


def trained_state(**shapes: int) -> dict:
    model = tiny_bert(0, **shapes)
    opt = SelectiveOptimizer(model, method="id3", budget=400, total_steps=3, lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(5, 20, (4, 8), generator=generator)
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt.state_dict()


def fresh_optimizer() -> tuple[nn.Module, SelectiveOptimizer]:
    model = tiny_bert(0)
    return model, SelectiveOptimizer(model, method="id3", budget=400, total_steps=3, lr=1e-2)


def test_load_state_dict_from_a_model_with_other_shapes_changes_nothing():
    state = trained_state(intermediate_size=96)  # same parameter names, other shapes
    model, opt = fresh_optimizer()
    before = bits(model)
    with pytest.raises(ValueError) as err:  # the old code: IndexError after writing 3 tensors
        opt.load_state_dict(state)
    assert_clear(str(err.value), r"outside their tensors", r"model it was saved from")
    assert bits(model) == before
    assert opt.num_selected == 0 and opt.steps_done == 0


@pytest.mark.parametrize("where", ["delta", "base"])
def test_load_state_dict_refuses_nonfinite_slot_values(where):
    state = trained_state()
    state[where] = state[where].clone()
    state[where][-1] = float("inf")
    model, opt = fresh_optimizer()
    before = bits(model)
    with pytest.raises(ValueError, match=r"NaN or overflow"):
        opt.load_state_dict(state)
    assert bits(model) == before and opt.num_selected == 0


def test_load_state_dict_refuses_optimizer_state_of_other_shapes():
    state = trained_state()
    inner = state["sparse_optimizer"]["state"]
    key = next(iter(inner))
    inner[key]["exp_avg"] = inner[key]["exp_avg"][:-1].clone()
    model, opt = fresh_optimizer()
    before = bits(model)
    with pytest.raises(ValueError, match=r"optimizer state 'exp_avg' has shape"):
        opt.load_state_dict(state)
    assert bits(model) == before and opt.num_selected == 0


def test_load_state_dict_of_a_good_state_still_restores_the_weights():
    state = trained_state()
    model, opt = fresh_optimizer()
    opt.load_state_dict(state)
    assert opt.num_selected > 0 and opt.steps_done == 3


# ------------------------------------------------- C. label metadata checked before building


@pytest.fixture
def head_delta(tiny_model_dir, tmp_path):
    """A delta of the tiny BERT with a replaced 2-label head, saved to a folder per test."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=2
    )
    delta = sparse_delta(
        model,
        {"bert.encoder.layer.0.output.dense.weight": ([3], torch.tensor([0.1]))},
        **{n: p.detach().clone() for n, p in model.named_parameters() if "classifier" in n},
    )
    delta.metadata["base_model"] = str(tiny_model_dir)
    return delta


@pytest.mark.parametrize(
    ("labels", "what"),
    [
        ([str(i) for i in range(500_000)], r"list of 2 to 100,000 labels, got 500000"),
        (["a", "b", "c"], r"has 3 labels, but no tensor of the delta has that many rows"),
        ([0, 1], r"must be strings"),
        (["a", "a"], r"repeat a label"),
        ("ab", r"must be a list"),
        (["only"], r"list of 2 to"),
    ],
    ids=["half-a-million", "more-than-the-head", "not-strings", "repeated", "a-string", "one"],
)
def test_merge_checks_label_metadata_before_building_a_model(
    head_delta, labels, what, tmp_path, monkeypatch, capsys
):
    head_delta.metadata["label_names"] = labels
    head_delta.save_pretrained(tmp_path / "d")

    def never(*args, **kwargs):
        raise AssertionError("a model was built before the label metadata was checked")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", never)
    out = tmp_path / "merged"
    assert main(["merge", "--delta", str(tmp_path / "d"), "--output", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert_clear(err, what, r"corrupt")
    assert not out.exists()


def test_labels_of_a_good_delta_are_returned(head_delta):
    assert head_delta.labels() is None
    head_delta.metadata["label_names"] = ["neg", "pos"]
    assert head_delta.labels() == ["neg", "pos"]


# ------------------------------------------------- D. remove_ refuses a model without the delta


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
    opt = SelectiveOptimizer(trained, method="id3", budget=400, total_steps=3, lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(5, 20, (4, 8), generator=generator)
        trained(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    delta = opt.delta()
    before = bits(base)
    with pytest.raises(DeltaError, match=r"was not applied"):
        delta.remove_(base)
    assert bits(base) == before
    delta.remove_(trained)
    for (name, a), b in zip(trained.named_parameters(), base.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
