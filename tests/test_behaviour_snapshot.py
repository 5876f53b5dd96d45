"""Every method still selects and trains exactly what the recorded 0.1 run did (see
behaviour_snapshot.py), and a checkpoint written by 0.1 still loads and resumes to the end of
the run it was cut from."""

from __future__ import annotations

import json

import pytest
import torch
from behaviour_snapshot import GOLDEN, _changed, _configs, deviation, run
from conftest import make_batches, snapshot, tiny_bert

from unmask import SelectiveOptimizer

RECORDED = json.loads((GOLDEN / "behaviour.json").read_text())
# Where another float path rounds differently, `deviation` (a share of the most the weights can
# move) may be at most this. A projection's own size is no scale: it can cancel to near zero.
# Measured on an AVX2 CPU against the AVX-512 recording (`python tests/behaviour_snapshot.py
# compare`): 401 tensors differ in bits, at most 3.0e-4 for BERT's key bias under full
# fine-tuning (its gradient is zero in exact arithmetic, softmax ignores it, so it trains on
# rounding noise), 3.3e-5 for every other tensor. A changed update rule moves weights by a share
# of LR at every step, far above it; selections are compared exactly.
ROUNDING = 1e-3


def _assert_same_changes(got: dict, expected: dict, what: str) -> None:
    assert sorted(got) == sorted(expected), f"{what}: other tensors changed"
    for name, want in expected.items():
        have = got[name]
        assert have["indices"] == want["indices"], f"{what}: {name} changed other weights"
        if have["sha256"] != want["sha256"]:  # another float path: compare to a tolerance
            share = deviation(have, want)
            assert share <= ROUNDING, f"{what}: {name} values ({share:.1e} of what they can move)"


def test_every_recorded_configuration_is_still_generated():
    assert sorted(RECORDED) == sorted(
        f"{m}/{k}/{'low' if low else 'std'}" for m, k, low in _configs()
    )


@pytest.mark.parametrize("config", _configs(), ids=lambda c: c if isinstance(c, str) else None)
def test_same_selection_and_weights_as_recorded(config):
    method, kind, low_memory = config
    key = f"{method}/{kind}/{'low' if low_memory else 'std'}"
    got = json.loads(json.dumps(run(method, kind, low_memory)))
    want = RECORDED[key]
    assert got["selected"] == want["selected"], f"{key}: selection differs"
    _assert_same_changes(got["changed"], want["changed"], key)


def test_checkpoint_written_by_0_1_resumes():
    saved = torch.load(GOLDEN / "checkpoint_v0_1.pt", weights_only=True)
    model = tiny_bert()
    base = snapshot(model)
    with torch.no_grad():  # the weights at the checkpoint (they are not the optimizer's state)
        params = dict(model.named_parameters())
        for name, (where, values) in saved["weights"].items():
            params[name].view(-1)[where] = values
    resumed = SelectiveOptimizer(model, method="id3", budget=300, total_steps=4, lr=1e-2)
    resumed.load_state_dict(saved["optimizer"])
    for batch in make_batches("bert", 4)[2:]:
        model(**batch).loss.backward()
        resumed.step()
        resumed.zero_grad()
    final = json.loads(json.dumps(_changed(model, base)))
    _assert_same_changes(final, json.loads(json.dumps(saved["final"])), "resumed from 0.1")
