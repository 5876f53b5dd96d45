"""SelectiveOptimizer: budget, frozen weights, selection rules, optimizers, resume."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import MODELS, make_batches, snapshot, tiny_bert, tiny_llama
from method_matrix import (
    assert_changes_only_selected,
    can_run_on,
    method_kwargs,
    method_names,
    prepare,
)
from reference_id3 import run_reference

import unmask
from unmask import SelectiveOptimizer, UniformSchedule, update_count

T = 6


def _train(model, opt, batches):
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def _changed(model, base) -> dict[str, torch.Tensor]:
    return {
        n: (p.detach() != base[n]).flatten().nonzero().flatten()
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("method", method_names())
def test_every_method_changes_only_what_it_selected(method, model_kind):
    if not can_run_on(method, model_kind):
        pytest.skip(f"the {model_kind} model has no candidates for {method}")
    assert_changes_only_selected(method, model_kind, steps=T)


def test_update_count_matches_schedule_formula():
    model = tiny_bert()
    total = 20
    opt = SelectiveOptimizer(model, method="id3", budget=300, total_steps=total, lr=1e-3)
    _train(model, opt, make_batches("bert", total))
    assert opt.num_selected == 300
    assert opt.num_updates == update_count(UniformSchedule(), 300, total)
    assert opt.num_updates == sum(300 * (t + 1) // total for t in range(total))
    ratio = opt.num_updates / (total * 300)
    assert math.isclose(ratio, (total + 1) / (2 * total), rel_tol=0.01)


@pytest.mark.parametrize("adam_step", ["global", "per-weight"])
@pytest.mark.parametrize("score_exp", [0.0, 1.0, 2.0])
def test_matches_dense_reference(adam_step, score_exp):
    """Same weights selected at every step and same parameters as the dense oracle."""
    steps, lr, wd = 5, 1e-2, 0.05
    batches = make_batches("bert", steps)
    reference = tiny_bert()
    budget = 400
    history = run_reference(reference, batches, budget, steps, lr, wd, 1e-3, score_exp, adam_step)

    model = tiny_bert()
    opt = SelectiveOptimizer(
        model,
        method="id3",
        budget=budget,
        total_steps=steps,
        lr=lr,
        weight_decay=wd,
        score_eps=1e-3,
        score_exp=score_exp,
        adam_step=adam_step,
    )
    names = [n for n, _ in model.named_parameters()]
    for t, batch in enumerate(batches):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        selected = opt.selected()
        for name, mask in zip(names, history[t], strict=True):
            expected = mask.flatten().nonzero().flatten()
            got = selected.get(name, torch.zeros(0, dtype=torch.long))
            assert torch.equal(got, expected), f"step {t}: {name} selection differs"
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_exp0_selects_largest_gradients():
    model = tiny_bert()
    batch = make_batches("bert", 1)[0]
    model(**batch).loss.backward()
    grads = torch.cat([p.grad.flatten().abs() for p in model.parameters()])
    k = 50
    opt = SelectiveOptimizer(model, method="id3", budget=k, total_steps=1, score_exp=0.0)
    opt.step()
    chosen = torch.cat(
        [
            offset + opt.selected().get(n, torch.zeros(0, dtype=torch.long))
            for n, offset in zip(*_offsets(model), strict=True)
        ]
    )
    assert torch.equal(chosen.sort().values, grads.topk(k).indices.sort().values)


def _offsets(model):
    names, offsets, start = [], [], 0
    for n, p in model.named_parameters():
        names.append(n)
        offsets.append(start)
        start += p.numel()
    return names, offsets


def test_large_exp_converges_to_pafi():
    """exp → ∞ ranks by smallest |θ| first, i.e. PaFi (among weights with a gradient)."""
    include = [r"encoder\.layer\.\d\.(attention|intermediate|output).*weight"]
    budget = 200
    pafi_model = tiny_bert()
    pafi = SelectiveOptimizer(pafi_model, method="pafi", budget=budget, include=include)
    model = tiny_bert()
    model(**make_batches("bert", 1)[0]).loss.backward()
    opt = SelectiveOptimizer(
        model, method="id3", budget=budget, total_steps=1, include=include, score_exp=1e4
    )
    opt.step()
    overlap = sum(
        len(set(opt.selected().get(n, torch.zeros(0)).tolist()) & set(i.tolist()))
        for n, i in pafi.selected().items()
    )
    assert overlap == budget
    small = SelectiveOptimizer(
        tiny_bert(), method="id3", budget=budget, total_steps=1, include=include, score_exp=1.0
    )
    small.model(**make_batches("bert", 1)[0]).loss.backward()
    small.step()
    overlap_exp1 = sum(
        len(set(small.selected().get(n, torch.zeros(0)).tolist()) & set(i.tolist()))
        for n, i in pafi.selected().items()
    )
    assert overlap_exp1 < budget  # the limit is reached because exp is large, not trivially


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)


def _set_grads(model, a=None, b=None):
    model.a.weight.grad = a
    model.b.weight.grad = b
    model.a.bias.grad = None
    model.b.bias.grad = None


def test_budget_below_steps_and_steps_past_total():
    torch.manual_seed(0)
    model = TwoLayer()
    opt = SelectiveOptimizer(model, method="id3", budget=3, total_steps=10, lr=1e-2)
    counts = []
    for _ in range(25):
        _set_grads(model, torch.randn(8, 8), torch.randn(8, 8))
        opt.step()
        counts.append(opt.num_selected)
    assert counts[:10] == [3 * (t + 1) // 10 for t in range(10)]
    assert counts[10:] == [3] * 15


def test_missing_and_zero_gradients_and_nonfinite_scores():
    torch.manual_seed(0)
    model = TwoLayer()
    opt = SelectiveOptimizer(model, method="id3", budget=8, total_steps=4, lr=1e-2)
    # Step 0: only `a` has a gradient, and it is zero: nothing is eligible, quota carries over.
    _set_grads(model, torch.zeros(8, 8), None)
    opt.step()
    assert opt.num_selected == 0
    # Step 1: `b` has no gradient; `a` has NaN/inf entries that must never be chosen.
    grad = torch.randn(8, 8)
    grad[0, :4] = float("nan")
    grad[1, :4] = float("inf")
    _set_grads(model, grad, None)
    opt.step()
    assert opt.num_selected == 4  # cumulative(1) = 8 * 2 // 4, including the carried quota
    chosen = opt.selected()
    assert set(chosen) == {"a.weight"}
    bad = {0, 1, 2, 3, 8, 9, 10, 11}
    assert not bad & set(chosen["a.weight"].tolist())
    assert torch.isfinite(model.a.weight).all()


def test_ties_break_by_lowest_index():
    model = TwoLayer()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    opt = SelectiveOptimizer(model, method="id3", budget=10, total_steps=1)
    _set_grads(model, torch.ones(8, 8), torch.ones(8, 8))
    opt.step()
    assert list(opt.selected()) == ["a.weight"]
    assert torch.equal(opt.selected()["a.weight"], torch.arange(10))


@pytest.mark.parametrize("method", method_names())
def test_resume_equals_uninterrupted(method, tmp_path):
    steps, cut = 8, 3
    batches = make_batches("bert", steps)
    kwargs = dict(method=method, lr=1e-2, weight_decay=0.01, **method_kwargs(method, steps))

    def start():
        model = tiny_bert()
        opt = SelectiveOptimizer(model, dense=["classifier"], **kwargs)
        prepare(opt, batches[:2])
        return model, opt

    model, opt = start()
    _train(model, opt, batches)

    model_a, opt_a = start()
    _train(model_a, opt_a, batches[:cut])
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model_b = tiny_bert(seed=123)  # different init: everything must come from the checkpoint
    model_b.load_state_dict(checkpoint["model"])
    opt_b = SelectiveOptimizer(model_b, dense=["classifier"], **kwargs)
    opt_b.load_state_dict(checkpoint["opt"])
    _train(model_b, opt_b, batches[cut:])

    for (name, p), q in zip(model.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert {n: i.tolist() for n, i in opt.selected().items()} == {
        n: i.tolist() for n, i in opt_b.selected().items()
    }
    assert opt.num_updates == opt_b.num_updates


def test_load_state_dict_writes_selected_weights_into_a_fresh_base():
    batches = make_batches("bert", 4)
    model = tiny_bert()
    opt = SelectiveOptimizer(model, method="id3", budget=200, total_steps=4, lr=1e-2)
    _train(model, opt, batches)
    fresh = tiny_bert()
    opt2 = SelectiveOptimizer(fresh, method="id3", budget=200, total_steps=4, lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_state_dict_refuses_other_settings():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, method="id3", budget=200, total_steps=4)
    other = SelectiveOptimizer(tiny_bert(), method="id3", budget=300, total_steps=4)
    with pytest.raises(ValueError, match="budget=200.*budget=300"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "optimizer,kwargs",
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
        (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.01}),
        (torch.optim.RMSprop, {"lr": 1e-3}),
        (torch.optim.Adagrad, {"lr": 1e-2}),
    ],
)
def test_other_torch_optimizers(optimizer, kwargs):
    model = tiny_llama()
    base = snapshot(model)
    opt = SelectiveOptimizer(
        model, method="id3", budget=300, total_steps=4, optimizer=optimizer, **kwargs
    )
    _train(model, opt, make_batches("llama", 6))
    changed = sum(int(w.numel()) for w in _changed(model, base).values())
    assert 0 < changed <= 300
    assert opt.num_selected == 300


@torch.no_grad()
def test_weight_decay_pulls_selected_weights_towards_pretrained():
    model = TwoLayer()
    base = snapshot(model)
    opt = SelectiveOptimizer(
        model,
        method="id3",
        budget=10,
        total_steps=1,
        lr=0.1,
        weight_decay=1.0,
        optimizer=torch.optim.SGD,
    )
    _set_grads(model, torch.randn(8, 8), torch.randn(8, 8))
    opt.step()
    distances = []
    for _ in range(5):
        _set_grads(model, torch.zeros(8, 8), torch.zeros(8, 8))
        opt.step()
        distances.append(
            float(
                (model.a.weight - base["a.weight"]).abs().sum()
                + (model.b.weight - base["b.weight"]).abs().sum()
            )
        )
    # SGD's L2 term acts on the delta: each step shrinks it by the factor 1 - lr * wd.
    for before, after in zip(distances, distances[1:], strict=False):
        assert math.isclose(after, 0.9 * before, rel_tol=1e-4)
    assert distances[0] > 0


def test_per_weight_bias_correction_first_update_is_lr():
    """A weight unmasked late moves by ~lr on its first update with per-weight correction."""
    lr = 1e-3
    moves = {}
    for adam_step in ("per-weight", "global"):
        torch.manual_seed(0)
        model = TwoLayer()
        opt = SelectiveOptimizer(
            model,
            method="id3",
            budget=40,
            total_steps=20,
            lr=lr,
            weight_decay=0.0,
            adam_step=adam_step,
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            _set_grads(model, torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g))
            opt.step()
        before = snapshot(model)
        old = {n: set(i.tolist()) for n, i in opt.selected().items()}
        _set_grads(model, torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g))
        opt.step()
        new_moves = []
        for name, idx in opt.selected().items():
            for i in set(idx.tolist()) - old.get(name, set()):
                new_moves.append(
                    float(
                        (
                            dict(model.named_parameters())[name].flatten()[i]
                            - before[name].flatten()[i]
                        ).abs()
                    )
                )
        moves[adam_step] = new_moves
    assert moves["per-weight"] and all(
        math.isclose(m, lr, rel_tol=1e-2) for m in moves["per-weight"]
    )
    # torch's single step count t = 11: the first update is lr * m_hat / sqrt(v_hat) with the
    # moments of one gradient, bias-corrected as if they had seen 11.
    t, (b1, b2) = 11, (0.9, 0.999)
    expected = lr * ((1 - b1) / (1 - b1**t)) / math.sqrt((1 - b2) / (1 - b2**t))
    assert moves["global"] and all(math.isclose(m, expected, rel_tol=1e-2) for m in moves["global"])


def test_per_weight_equals_torch_adamw_when_all_start_together():
    results = []
    for adam_step in ("per-weight", "global"):
        model = tiny_bert()
        opt = SelectiveOptimizer(model, method="pafi", budget=500, lr=1e-2, adam_step=adam_step)
        _train(model, opt, make_batches("bert", 4))
        results.append(snapshot(model))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def test_state_scales_with_budget_not_model_size():
    small = tiny_bert()
    large = torch.nn.Sequential(small, torch.nn.Linear(512, 512))
    sizes = []
    for model in (small, large):
        opt = SelectiveOptimizer(model, method="id3", budget=1000, total_steps=4)
        sizes.append(opt.state_bytes())
    assert sizes[0] == sizes[1]
    model = tiny_bert()
    opt = SelectiveOptimizer(model, method="id3", budget=1000, total_steps=4)
    model(**make_batches("bert", 1)[0]).loss.backward()
    opt.step()
    assert opt.state_bytes() <= 40 * 1000  # bytes per slot: index 8, base/delta/grad/m/v/step 4


def test_lr_scheduler_drives_inner_learning_rate():
    model = tiny_bert()
    opt = SelectiveOptimizer(
        model, method="id3", budget=100, total_steps=4, lr=1.0, dense=["classifier"]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    _train(model, opt, make_batches("bert", 1))
    scheduler.step()
    assert [g["lr"] for g in opt._sparse.param_groups] == [0.5]
    assert [g["lr"] for g in opt._dense.param_groups] == [0.5]
    opt.load_state_dict(opt.state_dict())
    scheduler.step()
    assert [g["lr"] for g in opt._sparse.param_groups] == [0.25]


def test_dense_head_counts_against_budget():
    model = tiny_bert()
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier"))
    opt = SelectiveOptimizer(model, method="id3", budget=500, total_steps=2, dense=["classifier"])
    assert opt.budget == 500 - head
    opt2 = SelectiveOptimizer(
        tiny_bert(),
        method="id3",
        budget=500,
        total_steps=2,
        dense=["classifier"],
        dense_in_budget=False,
    )
    assert opt2.budget == 500
    _train(model, opt, make_batches("bert", 2))
    assert opt.num_changed == 500
    assert opt.allocation()["classifier.weight"] == head - 2


def test_repeat_overspends_but_keeps_b_active():
    model = tiny_bert()
    base = snapshot(model)
    opt = SelectiveOptimizer(model, method="id3-repeat", budget=100, total_steps=8, lr=1e-2)
    _train(model, opt, make_batches("bert", 8))
    assert opt.num_selected == 100
    changed = sum(int(w.numel()) for w in _changed(model, base).values())
    assert changed > 100
    assert opt.delta().num_weights == opt.num_changed >= changed


def test_bitfit_without_biases_fails():
    with pytest.raises(ValueError, match="bias"):
        SelectiveOptimizer(tiny_llama(), method="bitfit")


def test_bitfit_selects_only_bias_terms():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, method="bitfit")
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert set(opt.selected()) == biases
    assert opt.num_selected == sum(p.numel() for n, p in model.named_parameters() if n in biases)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="lora"), ValueError, "valid methods: id3"),
        (dict(method="id3", budget=10), ValueError, "total_steps"),
        (dict(method="id3", total_steps=3), ValueError, "needs a budget"),
        (dict(method="id3", budget=10, total_steps=0), ValueError, "positive integer"),
        (dict(method="id3", budget=10, total_steps=3, score_eps=0.0), ValueError, "score_eps"),
        (
            dict(method="id3", budget=10, total_steps=3, score_exp=float("inf")),
            ValueError,
            "score_exp",
        ),
        (
            dict(method="id3", budget=10, total_steps=3, include="nothing_like_this"),
            ValueError,
            "matches no trainable parameter",
        ),
        (dict(method="id3", budget=10, total_steps=3, adam_step="local"), ValueError, "adam_step"),
        (dict(method="id3", budget=10, total_steps=3, schedule="cosine"), ValueError, "uniform"),
        (dict(method="full", budget=10), ValueError, "budget=None"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SelectiveOptimizer(tiny_bert(), **kwargs)


def test_fish_needs_calibration():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, method="fish", budget=100)
    model(**make_batches("bert", 1)[0]).loss.backward()
    with pytest.raises(RuntimeError, match="calibrate"):
        opt.step()


def test_delta_applies_to_base_exactly(model_kind):
    model = MODELS[model_kind]()
    base = copy.deepcopy(model)
    opt = SelectiveOptimizer(model, method="id3", budget="1%", total_steps=4, lr=1e-2)
    _train(model, opt, make_batches(model_kind, 4))
    opt.delta().apply_(base)
    for p, q in zip(model.parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q)


def test_low_precision_model_keeps_fp32_deltas():
    model = tiny_llama().to(torch.bfloat16)
    base = copy.deepcopy(model)
    opt = SelectiveOptimizer(model, method="id3", budget=200, total_steps=3, lr=1e-2)
    _train(model, opt, make_batches("llama", 3))
    delta = opt.delta()
    assert all(v.dtype == torch.float32 for _, v in delta.sparse.values())
    delta.apply_(base)
    for p, q in zip(model.parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q)


def test_public_api_names():
    assert {
        "id3",
        "id3-snr",
        "id3-repeat",
        "increment-pafi",
        "pafi",
        "random",
        "fish",
        "bitfit",
        "full",
    } == set(unmask.METHODS)


@pytest.mark.parametrize("score_exp", [0.0, 1.0, 2.0, -1.0])
def test_step_leaves_gradients_untouched(score_exp):
    model = tiny_bert()
    opt = SelectiveOptimizer(model, method="id3", budget=100, total_steps=3, score_exp=score_exp)
    model(**make_batches("bert", 1)[0]).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def test_nonfinite_gradients_skip_the_step_then_stop():
    torch.manual_seed(0)
    model = TwoLayer()
    opt = SelectiveOptimizer(
        model, method="id3", budget=20, total_steps=4, lr=1e-2, max_nonfinite_steps=2
    )
    _set_grads(model, torch.randn(8, 8), torch.randn(8, 8))
    opt.step()
    before = snapshot(model)
    state_before = opt.state_dict()
    grad = torch.randn(8, 8)
    grad.view(-1)[opt.selected()["a.weight"][0]] = float("nan")
    for attempt in (1, 2):
        _set_grads(model, grad, torch.randn(8, 8))
        with pytest.warns(RuntimeWarning, match=f"skipped \\({attempt} in a row"):
            opt.step()
        assert opt.steps_done == 1 and opt.num_skipped_steps == attempt
        for name, value in snapshot(model).items():
            assert torch.equal(value, before[name])
        assert torch.equal(opt.state_dict()["delta"], state_before["delta"])
    with pytest.raises(FloatingPointError, match="max_nonfinite_steps=2"):
        _set_grads(model, grad, torch.randn(8, 8))
        opt.step()
    # Finite gradients again: training continues and nothing non-finite was stored.
    opt.consecutive_skips = 0
    _set_grads(model, torch.randn(8, 8), torch.randn(8, 8))
    opt.step()
    assert opt.steps_done == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = opt._sparse.state[opt._slots.delta]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(torch.isfinite(v).all() for _, v in opt.delta().sparse.values())


def test_nonfinite_dense_gradient_is_skipped():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, method="id3", budget=200, total_steps=3, dense=["classifier"])
    model(**make_batches("bert", 1)[0]).loss.backward()
    model.classifier.weight.grad[0, 0] = float("inf")
    head = model.classifier.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(model.classifier.weight, head) and opt.num_selected == 0


@pytest.mark.parametrize("method", ["pafi", "id3"])
def test_freeze_unselected_skips_gradients_without_changing_results(method):
    steps, batches = 5, make_batches("bert", 7)
    results = []
    for freeze in (False, True):
        model = tiny_bert()
        opt = SelectiveOptimizer(
            model, method=method, budget=60, total_steps=steps, lr=1e-2, freeze_unselected=freeze
        )
        _train(model, opt, batches)
        holding = set(opt.selected())
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        if freeze:
            assert frozen and frozen == {n for n, _ in model.named_parameters()} - holding
            assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
        else:
            assert not frozen
        results.append(snapshot(model))
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name


def test_random_masks_differ_between_seeds_and_repeat_within_one():
    masks = []
    for seed in (0, 1, 2, 1):
        opt = SelectiveOptimizer(tiny_bert(), method="random", budget=200, seed=seed)
        masks.append({n: set(v.tolist()) for n, v in opt.selected().items()})
    assert masks[1] == masks[3]
    assert masks[0] != masks[1] and masks[1] != masks[2] and masks[0] != masks[2]
