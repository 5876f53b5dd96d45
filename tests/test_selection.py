"""select_top: exact global top-k with lowest-index tie-breaking, against brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unmask.choose import selection
from unmask.choose.selection import KeySource, select_top, select_top_keys


def brute_force(tensors, k, floor):
    keys = torch.cat([t.flatten() for t in tensors])
    eligible = [i for i in range(keys.numel()) if torch.isfinite(keys[i]) and keys[i] > floor]
    eligible.sort(key=lambda i: (-keys[i].item(), i))
    return sorted(eligible[:k])


def sources_of(tensors):
    out, offset = [], 0
    for t in tensors:
        out.append(KeySource(offset, lambda t=t: t.clone()))
        offset += t.numel()
    return out


special = st.sampled_from([float("nan"), float("inf"), float("-inf")])
key_values = st.one_of(st.integers(-3, 3).map(float), special)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    data=st.data(),
    k=st.integers(0, 60),
    floor=st.sampled_from([0.0, float("-inf")]),
    block=st.sampled_from([2, 4, 8, 128]),
    prune_at=st.sampled_from([1, 4]),
)
def test_select_top_matches_brute_force(sizes, data, k, floor, block, prune_at):
    tensors = [torch.tensor(data.draw(st.lists(key_values, min_size=n, max_size=n))) for n in sizes]
    original = selection._BLOCK, selection._SMALL, selection.PRUNE_AT
    # Small blocks and no small-tensor shortcut exercise the block path on small tensors;
    # prune_at=1 cuts the candidate pool back after nearly every tensor.
    selection._BLOCK, selection._SMALL, selection.PRUNE_AT = block, 0, prune_at
    try:
        got = select_top(sources_of(tensors), k, floor).tolist()
        index, keys = select_top_keys(sources_of(tensors), k, floor)
    finally:
        selection._BLOCK, selection._SMALL, selection.PRUNE_AT = original
    assert got == brute_force(tensors, k, floor)
    # The keys come back with their indices (what FSDP ranks exchange).
    assert index.tolist() == got
    assert torch.equal(keys, torch.cat([t.flatten() for t in tensors])[index])


def test_select_top_block_path_with_many_ties(monkeypatch):
    monkeypatch.setattr(selection, "_BLOCK", 4)
    monkeypatch.setattr(selection, "_SMALL", 0)
    torch.manual_seed(0)
    tensors = [torch.randint(0, 3, (200,)).float(), torch.randint(0, 3, (37,)).float()]
    for k in (1, 5, 50, 150, 300):
        assert select_top(sources_of(tensors), k, 0.0).tolist() == brute_force(tensors, k, 0.0)
    monkeypatch.setattr(selection, "PRUNE_AT", 1)  # pool cut back between the tensors
    for k in (1, 5, 50, 150):
        assert select_top(sources_of(tensors), k, 0.0).tolist() == brute_force(tensors, k, 0.0)


@pytest.mark.parametrize("k", [0, -1])
def test_select_top_nothing_to_choose(k):
    assert select_top(sources_of([torch.ones(3)]), k, 0.0).numel() == 0
