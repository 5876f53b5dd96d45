"""`unmask.optimizer.SelectiveOptimizer`'s input checking: bad arguments are refused with a
ValueError whose message says what was wrong and how to fix it (`assert_clear`).

What the optimizer does with good input is in `tests/test_optimizer.py`.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import assert_clear, tiny_bert, tiny_llama

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
