"""Low-memory mode: gradients consumed in backward hooks give the standard mode's results."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import MODELS, make_batches, snapshot, tiny_bert, tiny_llama
from method_matrix import can_run_on, method_kwargs, method_names, prepare

from unmask import SelectiveOptimizer
from unmask.optimize import gradient_tap

STEPS = 6


def _run(kind, method, low_memory, batches, *, micro=1, clip=None, autocast=False, **kwargs):
    """Train; returns (model, optimizer, selections after every step)."""
    model = MODELS[kind]()
    options = dict(method=method, lr=1e-2, weight_decay=0.01, low_memory=low_memory)
    options.update(method_kwargs(method, STEPS, budget="3%"))
    if kind == "bert":
        options["dense"] = ["classifier"]
    opt = SelectiveOptimizer(model, **options, **kwargs)
    prepare(opt, batches[:2])
    history = []
    for batch in batches:
        for part in _split(batch, micro):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**part).loss / micro
            loss.backward()
        if clip is not None:
            opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
        history.append({n: i.tolist() for n, i in opt.selected().items()})
    return model, opt, history


def _split(batch, parts):
    size = batch["input_ids"].shape[0] // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def _assert_same_model(a, b, exact=True):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", method_names(low_memory=True))
def test_same_selection_and_weights_as_standard_mode(method, model_kind):
    if not can_run_on(method, model_kind):
        pytest.skip(f"the {model_kind} model has no candidates for {method}")
    batches = make_batches(model_kind, STEPS)
    standard, _, chosen = _run(model_kind, method, False, batches)
    low, opt, chosen_low = _run(model_kind, method, True, batches)
    assert chosen_low == chosen  # the same weights at every step
    _assert_same_model(standard, low)
    assert opt.num_selected == sum(len(v) for v in chosen[-1].values())


def test_gradients_are_freed_during_backward_and_dense_ones_kept():
    model = tiny_bert()
    opt = SelectiveOptimizer(
        model,
        method="id3",
        budget=100,
        total_steps=4,
        lr=1e-2,
        dense=["classifier"],
        low_memory=True,
    )
    alive = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda _: alive.append(_live_grads(model)))
    model(**make_batches("bert", 1)[0]).loss.backward()
    # Hooks registered later run later: at each, at most the dense head and the one tensor
    # just finished hold a gradient (the optimizer's own hook already freed the others).
    assert max(alive) <= 3
    held = {n for n, p in model.named_parameters() if p.grad is not None}
    assert held == {"classifier.weight", "classifier.bias"}
    opt.step()
    assert opt.num_selected > 0


def _live_grads(model) -> int:
    return sum(p.grad is not None for p in model.parameters())


def test_static_methods_do_not_compute_unselected_gradients():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, method="pafi", budget=40, lr=1e-2, low_memory=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()} - set(opt.selected())


def test_gradient_accumulation_sums_selected_gradients_exactly():
    # Static mask: every gradient the update uses is a selected weight's, summed exactly as
    # the standard mode's .grad accumulation sums it.
    batches = make_batches("bert", 4, batch=4)
    standard, _, _ = _run("bert", "pafi", False, batches, micro=2)
    low, _, _ = _run("bert", "pafi", True, batches, micro=2)
    _assert_same_model(standard, low)


def test_gradient_accumulation_keeps_the_budget_and_schedule():
    batches = make_batches("llama", STEPS, batch=4)
    _, opt, history = _run("llama", "id3", True, batches, micro=2)
    counts = [sum(len(v) for v in h.values()) for h in history]
    budget = opt.budget
    assert counts == [min(budget, budget * (t + 1) // STEPS) for t in range(STEPS)]
    _, again, history_again = _run("llama", "id3", True, batches, micro=2)
    assert history_again == history  # deterministic


def test_clipping_matches_standard_mode():
    batches = make_batches("bert", STEPS)
    standard, opt_s, chosen = _run("bert", "id3", False, batches, clip=0.05)
    low, opt_l, chosen_low = _run("bert", "id3", True, batches, clip=0.05)
    assert chosen_low == chosen
    _assert_same_model(standard, low, exact=False)
    unclipped, _, _ = _run("bert", "id3", True, batches)
    pairs = zip(low.parameters(), unclipped.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in pairs)


def test_clip_grad_norm_returns_the_torch_norm():
    for low_memory in (False, True):
        model = tiny_bert()
        reference = tiny_bert()
        batch = make_batches("bert", 1)[0]
        reference(**batch).loss.backward()
        expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        opt = SelectiveOptimizer(
            model, method="id3", budget=50, total_steps=3, lr=1e-2, low_memory=low_memory
        )
        model(**batch).loss.backward()
        torch.testing.assert_close(opt.clip_grad_norm_(1e-3).float(), expected, rtol=1e-5, atol=0)


def test_bf16_autocast_matches_standard_mode():
    batches = make_batches("llama", STEPS)
    standard, _, chosen = _run("llama", "id3", False, batches, autocast=True)
    low, _, chosen_low = _run("llama", "id3", True, batches, autocast=True)
    assert chosen_low == chosen
    _assert_same_model(standard, low)


def test_resume_equals_uninterrupted():
    steps, cut = 8, 3
    batches = make_batches("bert", steps)
    options = dict(method="id3", budget=120, total_steps=steps, lr=1e-2, low_memory=True)

    def train(model, opt, part):
        for batch in part:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()

    model = tiny_bert()
    train(model, SelectiveOptimizer(model, **options), batches)
    first = tiny_bert()
    opt = SelectiveOptimizer(first, **options)
    train(first, opt, batches[:cut])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = tiny_bert()
    opt_b = SelectiveOptimizer(resumed, **options)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    train(resumed, opt_b, batches[cut:])
    _assert_same_model(model, resumed)


def test_nonfinite_gradient_skips_the_step():
    model = tiny_bert()
    base = snapshot(model)
    opt = SelectiveOptimizer(model, method="pafi", budget=40, lr=1e-2, low_memory=True)
    (model(**make_batches("bert", 1)[0]).loss * float("nan")).backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", method_names(low_memory=False))
def test_methods_that_need_every_gradient_are_refused(method):
    with pytest.raises(ValueError, match="low_memory"):
        SelectiveOptimizer(tiny_bert(), method=method, budget="5%", total_steps=3, low_memory=True)


@pytest.mark.parametrize("method", ["id3", "increment-pafi"])
def test_chunked_ranking_selects_what_the_standard_mode_selects(method, monkeypatch):
    # Real tensors are ranked in chunks of a million weights; the tiny models' tensors fit in
    # one chunk, so make chunks small enough to split every tensor (and not divide it evenly).
    monkeypatch.setattr(gradient_tap, "KEY_CHUNK", 37)
    batches = make_batches("bert", STEPS)
    standard, _, chosen = _run("bert", method, False, batches)
    low, _, chosen_low = _run("bert", method, True, batches)
    assert chosen_low == chosen
    _assert_same_model(standard, low)


@pytest.mark.parametrize("total_steps", [1, 2])
def test_candidate_pool_cut_back_keeps_the_exact_selection(total_steps):
    # With T = 1 or 2 each step unmasks half the budget or all of it, so the candidates of the
    # many tensors pile up far beyond 4k and the pool is cut back during backward.
    batches = make_batches("llama", total_steps)
    chosen = []
    for low_memory in (False, True):
        model = tiny_llama()
        opt = SelectiveOptimizer(
            model,
            method="id3",
            budget="20%",
            total_steps=total_steps,
            lr=1e-2,
            low_memory=low_memory,
        )
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        chosen.append({n: i.tolist() for n, i in opt.selected().items()})
    assert chosen[0] == chosen[1]


def test_increment_pafi_ranks_tensors_without_gradients_too():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.used = torch.nn.Linear(8, 8)
            self.unused = torch.nn.Linear(8, 8)
            with torch.no_grad():
                self.unused.weight.mul_(1e-3)  # the smallest weights, but no gradient

    chosen = []
    for low_memory in (False, True):
        model = Model()
        opt = SelectiveOptimizer(
            model,
            method="increment-pafi",
            budget=10,
            total_steps=2,
            lr=1e-2,
            low_memory=low_memory,
        )
        for _ in range(2):
            model.used(torch.ones(2, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        chosen.append({n: i.tolist() for n, i in opt.selected().items()})
    assert chosen[0] == chosen[1] and "unused.weight" in chosen[1]


def test_close_and_dropping_the_optimizer_release_the_model_gradients():
    import gc

    batch = make_batches("bert", 1)[0]
    model = tiny_bert()
    options = dict(
        method="id3", budget=50, total_steps=2, lr=1e-2, low_memory=True, freeze_unselected=False
    )
    opt = SelectiveOptimizer(model, **options)
    del opt
    gc.collect()
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # no stale hook consumed them
    model.zero_grad()
    SelectiveOptimizer(model, **options).close()
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_micro_batches_with_log_keys_follow_the_schedule():
    # score_exp=2 ranks by log keys; candidates from several micro-batches take their largest.
    batches = make_batches("llama", STEPS, batch=4)
    _, opt, history = _run("llama", "id3", True, batches, micro=2, score_exp=2.0)
    counts = [sum(len(v) for v in h.values()) for h in history]
    assert counts == [min(opt.budget, opt.budget * (t + 1) // STEPS) for t in range(STEPS)]
