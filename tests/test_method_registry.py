"""Adding a method is one class plus one registry line: the test matrix picks it up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
from conftest import tiny_bert
from method_matrix import assert_changes_only_selected, method_kwargs, method_names
from torch import Tensor

from unmask import METHODS, SelectiveOptimizer
from unmask.choose import scores
from unmask.choose.methods import Kind, Method


@dataclass
class LargestFirst(Method):
    """A throwaway static method: the B pretrained weights of largest magnitude."""

    name: ClassVar[str] = "largest-first"
    kind: ClassVar[Kind] = "static"

    def keys(self, name: str, param: Tensor, signal: Tensor | None, out: Tensor) -> Tensor:
        return scores.small_magnitude(param, out).neg_()


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, LargestFirst.name, LargestFirst)
    return LargestFirst.name


def test_a_registered_method_is_in_the_matrix(registered):
    assert registered in method_names()
    assert registered in method_names(low_memory=True)  # the default capability
    assert method_kwargs(registered, 4) == {"budget": "2%"}  # static: no total_steps


@pytest.mark.parametrize("model_kind", ["bert", "llama"])
def test_a_registered_method_passes_the_budget_and_frozen_weights_invariant(registered, model_kind):
    assert_changes_only_selected(registered, model_kind)


def test_capability_fields_are_what_the_optimizer_reads(registered, monkeypatch):
    monkeypatch.setattr(LargestFirst, "supports_low_memory", False)
    assert registered in method_names(low_memory=False)
    with pytest.raises(ValueError, match="low_memory"):
        SelectiveOptimizer(tiny_bert(), method=registered, budget=10, low_memory=True)
