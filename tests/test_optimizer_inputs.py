"""`unmask.SelectiveOptimizer`'s input checking: bad constructor arguments and bad
checkpoints given to `load_state_dict` are refused with a ValueError, and a model changed after
the optimizer was built with a RuntimeError, whose message says what was wrong and how to fix
it (`assert_clear`), before anything changes.

What the optimizer does with good input is in `tests/test_optimizer.py`.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import assert_clear, bits, tiny_bert, tiny_llama, train_id3
from torch import nn

from unmask import METHODS, SelectiveOptimizer


def num_weights(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- constructor arguments


@pytest.mark.parametrize(
    ("budget", "what", "fix"),
    [
        (0, r"got 0\b", r"at least 1 weight"),
        (-5, r"got -5\b", r"at least 1 weight"),
        (0.0, r"got 0\.0", r"positive finite number"),
        (-0.5, r"got -0\.5", r"positive finite number"),
        ("0", r"'0'", r"whole number of weights >= 1"),
        ("0%", r"'0%'", r"percentage must be in \(0, 100\]"),
    ],
    ids=["int-0", "int-negative", "float-0", "float-negative", "str-0", "percent-0"],
)
def test_budget_not_positive(budget, what, fix):
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_bert(), method="id3", budget=budget, total_steps=3)
    assert_clear(str(err.value), what, fix)


def test_budget_larger_than_the_candidates():
    model = tiny_bert()
    pool = num_weights(model)
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(model, method="id3", budget=pool + 1, total_steps=3)
    assert_clear(
        str(err.value),
        rf"{pool + 1:,} weights, but only {pool:,} weights are candidates",
        r"lower the budget or widen the candidates",
    )


def test_budget_larger_than_the_candidates_narrowed_by_include():
    model = tiny_bert()
    head = model.classifier.weight.numel() + model.classifier.bias.numel()
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(model, method="id3", budget="1K", total_steps=3, include="classifier")
    assert_clear(
        str(err.value),
        rf"1,000 weights, but only {head} weights are candidates",
        r"include/exclude",
    )


# What each message says to pass instead.
IN_RANGE = {
    "total_steps": r"positive integer",
    "score_eps": r"positive finite number",
    "score_exp": r"finite number",
}


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("total_steps", 0),
        ("total_steps", -1),
        ("score_eps", 0.0),
        ("score_eps", -1e-3),
        ("score_exp", math.nan),
        ("score_exp", math.inf),
        ("score_exp", -math.inf),
    ],
)
def test_a_number_out_of_its_range_is_refused(option, value):
    options = {"budget": 10, "total_steps": 3, option: value}
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_bert(), method="id3", **options)
    assert_clear(str(err.value), rf"{option} .*got {value}", IN_RANGE[option])


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("optimizer", "adam_step", "options", "name"),
    [
        (torch.optim.AdamW, "per-weight", {"lr": INF}, "lr"),
        (torch.optim.AdamW, "per-weight", {"lr": NAN}, "lr"),
        (torch.optim.AdamW, "global", {"lr": INF}, "lr"),
        (torch.optim.Adam, "per-weight", {"weight_decay": NAN}, "weight_decay"),
        (torch.optim.AdamW, "per-weight", {"eps": NAN}, "eps"),
        (torch.optim.AdamW, "global", {"betas": (0.9, INF)}, "betas"),
        (torch.optim.AdamW, "per-weight", {"lr": torch.tensor(INF)}, "lr"),
        (torch.optim.SGD, "per-weight", {"lr": INF}, "lr"),
        (torch.optim.SGD, "per-weight", {"lr": 0.1, "momentum": NAN}, "momentum"),
        (torch.optim.RMSprop, "global", {"alpha": INF}, "alpha"),
    ],
    ids=lambda v: getattr(v, "__name__", None) or (v if isinstance(v, str) else None),
)
def test_selective_optimizer_refuses_nonfinite_optimizer_options(
    optimizer, adam_step, options, name
):
    model = tiny_bert()
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(
            model, "id3", budget=100, total_steps=5, optimizer=optimizer, adam_step=adam_step,
            dense=[r"^classifier\."], **options,
        )  # fmt: skip
    assert_clear(
        str(err.value),
        rf"{optimizer.__name__} option {name}=.* is not finite",
        rf"pass a finite number for {name}",
    )


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_bert(), method="lora", budget=10, total_steps=3)
    message = str(err.value)
    assert_clear(message, r"unknown method 'lora'", r"valid methods: ")
    for name in METHODS:
        assert re.search(rf"\b{re.escape(name)}\b", message), name


@pytest.mark.parametrize("role", ["include", "exclude", "dense"])
def test_pattern_matching_no_weight(role):
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(
            tiny_bert(), method="id3", budget=10, total_steps=3, **{role: "no_such_layer"}
        )
    assert_clear(
        str(err.value),
        rf"{role} pattern 'no_such_layer' matches no trainable parameter",
        r"names look like: bert\.embeddings\.word_embeddings\.weight",
    )


def test_bitfit_on_a_model_without_biases():
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_llama(), method="bitfit")
    assert_clear(
        str(err.value), r"bias terms .* this model has none", r"another method, e\.g\. .*'id3'"
    )


def test_no_trainable_parameter():
    model = tiny_bert()
    model.requires_grad_(False)
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(model, method="id3", budget=10, total_steps=3)
    assert_clear(
        str(err.value), r"no parameter with requires_grad=True", r"nothing can be fine-tuned"
    )


def test_no_sparse_candidate_left():
    """Only the head is trainable and it is trained densely: no weight competes for the budget."""
    model = tiny_bert()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(model, method="id3", budget=10, total_steps=3, dense="classifier")
    assert_clear(
        str(err.value),
        r"no parameter is a candidate for method 'id3'",
        r"check the include/exclude/dense patterns and that parameters require grad",
    )


# ---------------------------------------------------------------- a module replaced


def one_step(model, opt) -> None:
    ids = torch.randint(0, 30, (4, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    opt.step()
    opt.zero_grad()


REPLACED = r"parameter classifier\.(weight|bias) of the model was replaced by a new tensor"
REBUILD = r"build a new SelectiveOptimizer after changing the model"


@pytest.mark.parametrize("dense", [["classifier"], None], ids=["dense-head", "sparse-head"])
def test_a_module_replaced_after_building_the_optimizer_is_refused(dense):
    torch.manual_seed(0)
    model = tiny_bert()
    opt = SelectiveOptimizer(model, "id3", budget="5%", total_steps=4, lr=1e-2, dense=dense)
    one_step(model, opt)
    old = model.classifier
    model.classifier = nn.Linear(old.in_features, old.out_features)
    ids = torch.randint(0, 30, (4, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert_clear(str(err.value), REPLACED, REBUILD)
    with pytest.raises(RuntimeError) as err:
        opt.delta()
    assert_clear(str(err.value), REPLACED, REBUILD)


def test_a_module_removed_after_building_the_optimizer_is_refused():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, "id3", budget="5%", total_steps=4, dense=["classifier"])
    del model.classifier
    model.classifier = nn.Identity()
    with pytest.raises(RuntimeError) as err:
        opt.delta()
    assert_clear(str(err.value), r"parameter classifier\.weight of the model is gone", REBUILD)


def test_an_unchanged_model_still_trains_and_saves():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, "id3", budget="5%", total_steps=2, dense=["classifier"])
    for _ in range(2):
        one_step(model, opt)
    model.to(torch.float32)  # keeps the parameter objects
    assert opt.delta().num_weights > 0


# ---------------------------------------------------------------- load_state_dict
# The whole checkpoint is checked before the optimizer changes or a weight is written.


def trained_state(**shapes: int) -> dict:
    """The state_dict of ID3 after 3 steps on a tiny BERT (`shapes` override its config)."""
    return train_id3(tiny_bert(0, **shapes)).state_dict()


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


def nonfinite_slot(where: str):
    """A damage: the last slot's value in state[`where`] set to inf."""

    def damage(state: dict) -> None:
        state[where] = state[where].clone()
        state[where][-1] = float("inf")

    return damage


def shorter_exp_avg(state: dict) -> None:
    """A damage: the wrapped optimizer's exp_avg one slot short."""
    inner = state["sparse_optimizer"]["state"]
    key = next(iter(inner))
    inner[key]["exp_avg"] = inner[key]["exp_avg"][:-1].clone()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(nonfinite_slot("delta"), r"NaN or overflow", id="nonfinite-delta"),
        pytest.param(nonfinite_slot("base"), r"NaN or overflow", id="nonfinite-base"),
        pytest.param(
            shorter_exp_avg, r"optimizer state 'exp_avg' has shape", id="optimizer-state-shape"
        ),
    ],
)
def test_load_state_dict_refuses_a_damaged_state(damage, message):
    state = trained_state()
    damage(state)
    model, opt = fresh_optimizer()
    before = bits(model)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert bits(model) == before and opt.num_selected == 0


def test_load_state_dict_of_a_good_state_still_restores_the_weights():
    state = trained_state()
    model, opt = fresh_optimizer()
    opt.load_state_dict(state)
    assert opt.num_selected > 0 and opt.steps_done == 3
