"""SelectiveOptimizer keeps torch.optim's contract where it can, and refuses out loud where not."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batches, tiny_bert

from unmask import SelectiveOptimizer


def _trained(**kwargs):
    model = tiny_bert()
    options = dict(method="id3", budget=200, total_steps=2, lr=1e-2, dense=["classifier"])
    opt = SelectiveOptimizer(model, **{**options, **kwargs})
    model(**make_batches("bert", 1)[0]).loss.backward()
    opt.step()
    return model, opt


def test_state_dict_has_torch_state_and_param_groups():
    _, opt = _trained()
    saved = opt.state_dict()
    groups = saved["param_groups"]
    assert len(groups) == len(opt.param_groups)
    ids = [i for g in groups for i in g["params"]]
    assert ids == list(range(sum(len(g["params"]) for g in opt.param_groups)))
    assert [g["lr"] for g in groups] == [g["lr"] for g in opt.param_groups]
    params = [p for g in opt.param_groups for p in g["params"]]
    assert set(saved["state"]) <= set(ids)
    for i, per_param in saved["state"].items():  # what torch's own state_dict would hold
        assert per_param is opt.state[params[i]]
        assert per_param["exp_avg"].shape == params[i].shape


def test_state_is_a_read_only_view_keyed_by_the_param_group_tensors():
    _, opt = _trained()
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(opt.state) == len(params) and set(opt.state) == set(params)
    with pytest.raises(TypeError):
        opt.state[params[0]] = {}


def test_add_param_group_is_refused():
    model, opt = _trained()
    with pytest.raises(ValueError, match="does not take new parameter groups.*build a new"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("option", ["foreach", "fused", "capturable"])
def test_per_weight_adam_refuses_options_it_cannot_honour(option):
    with pytest.raises(ValueError, match=f"does not support \\['{option}'\\].*adam_step='global'"):
        SelectiveOptimizer(tiny_bert(), method="id3", budget=10, total_steps=2, **{option: True})


def test_global_adam_passes_torch_options_through():
    _, opt = _trained(adam_step="global", foreach=True)
    assert all(g["foreach"] is True for g in opt.param_groups)


def test_distributed_checkpoint_state_dict_is_refused():
    # Documented in SelectiveOptimizer's docstring: torch.distributed.checkpoint keys optimizer
    # state by model parameter name, and the slot buffer is no model parameter.
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = _trained()
    with pytest.raises(KeyError):
        get_optimizer_state_dict(model, opt)
    assert "get_optimizer_state_dict" in SelectiveOptimizer.__doc__
