"""Sparse backward (`sparse_backward=True`): only the selected weights' gradients are computed.

Checked against the dense path on tiny BERT and Llama (tied embeddings) models: the entry-wise
kernels equal the dense gradient gathered at the selected entries; the slots' gradients after a
backward equal the dense path's; a run selects the same weights and reaches the same parameters
(static methods from the first step, increment methods switching at their last unmask); frozen
weights stay bit-identical and the budget holds after every step; resume, gradient accumulation,
clipping, low-memory mode and bf16 autocast; the model is given back unchanged; refusals.
"""

from __future__ import annotations

import copy
import gc
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import (
    MODELS,
    assert_clear,
    bits,
    launch_torchrun,
    make_batches,
    snapshot,
    tiny_gpt2,
)
from method_matrix import method_kwargs, method_names, prepare
from torch.nn.parallel import DistributedDataParallel as DDP

from unmask import METHODS, SelectiveOptimizer
from unmask.optimize import entry_grads as eg
from unmask.optimize import sparse_backward as sb

STEPS = 6
# Methods whose mask is final at some step: static ones from the first, increment ones after T.
FINAL_MASK = [n for n in method_names() if not METHODS[n].reselects and not METHODS[n].trains_dense]


@pytest.fixture(autouse=True)
def every_tensor_sparse(monkeypatch):
    """Tiny models at a 2% budget lie above the crossover; test the sparse path on all."""
    monkeypatch.setattr(sb, "MAX_DENSITY", 1.0)


def _loss(model, batch):
    return model(**batch).loss


SHAPES = {**MODELS, "gpt2": tiny_gpt2}


def _pair(kind: str, method: str, total_steps: int = 3, **kwargs):
    """(dense model, its optimizer, sparse model, its optimizer), the same weights and options."""
    base = SHAPES[kind]()
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    args = {**method_kwargs(method, total_steps), "lr": 1e-2, **kwargs}
    opts = [
        SelectiveOptimizer(m, method=method, sparse_backward=s, **args)
        for m, s in zip(models, (False, True), strict=True)
    ]
    return models[0], opts[0], models[1], opts[1]


def _slot_grads(opt: SelectiveOptimizer) -> torch.Tensor:
    """The gradients step() would use: delta.grad after gathering the dense-path ones."""
    opt._slots.gather_grads()
    return opt._slots.delta.grad[: opt._slots.n].clone()


# ---------------------------------------------------------------- the entry-wise kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", ["few rows and columns", "most rows and columns"])
@pytest.mark.parametrize("scratch", [False, True])
def test_linear_entry_grads_equal_the_dense_gradient_gathered(monkeypatch, dtype, spread, scratch):
    monkeypatch.setattr(eg, "ROW_BLOCK", 5)  # several blocks of gathered rows
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(13, 23, generator=g), torch.randn(13, 17, generator=g)
    flat = torch.randperm(23 * 17, generator=g)[:90].sort().values
    if spread == "few rows and columns":  # compacted: 6 of 23 rows, 5 of 17 columns
        flat = flat[(flat // 17 % 4 == 0) & (flat % 17 % 4 == 0)]
    else:  # more than half hold entries: every row and column is gathered
        flat = flat[(flat // 17 < 5) | (flat // 17 >= 10)]  # rows 5..9 hold none
        flat = flat[flat % 17 % 4 != 1]  # nor do columns 1, 5, 9, 13
    rows, cols = flat // 17, flat % 17
    pattern = eg.entry_pattern(rows, cols, (23, 17), dtype)
    compacted = spread == "few rows and columns"
    assert (pattern.all_rows, pattern.all_cols) == (not compacted, not compacted)
    used_rows = sorted(set(rows.tolist())) if compacted else list(range(23))
    used_cols = sorted(set(cols.tolist())) if compacted else list(range(17))
    assert pattern.used_rows.tolist() == used_rows
    assert pattern.used_cols.tolist() == used_cols
    # Blocks of rows holding no entry are left out.
    assert len(pattern.blocks) == len({used_rows.index(r) // 5 for r in rows.tolist()})
    buffers = eg.Scratch() if scratch else None
    want = (dy.bfloat16().to(dtype).t() @ x.to(dtype)).reshape(-1)[flat]
    for _ in range(2):  # the second call reuses the scratch's buffers and shared input
        got = eg.linear_entry_grads(dy.bfloat16(), x, pattern, dtype, buffers)
        torch.testing.assert_close(got, want)
    empty = eg.entry_pattern(rows[:0], cols[:0], (23, 17), dtype)
    assert eg.linear_entry_grads(dy, x, empty, dtype).numel() == 0


def test_scratch_transposes_a_shared_input_once_and_sees_in_place_changes():
    scratch, x = eg.Scratch(), torch.randn(7, 4)
    first = scratch.transposed_input(x, torch.float32)
    assert scratch.transposed_input(x, torch.float32) is first  # q/k/v share one transpose
    torch.testing.assert_close(first, x.t())
    x.mul_(2)  # an in-place change bumps x's version: transposed again
    torch.testing.assert_close(scratch.transposed_input(x, torch.float32), x.t())
    scratch.forget()
    y = torch.randn(7, 4)
    torch.testing.assert_close(scratch.transposed_input(y, torch.float32), y.t())
    # A longer batch grows the buffers.
    z = torch.randn(30, 4)
    torch.testing.assert_close(scratch.transposed_input(z, torch.float32), z.t())


def test_embedding_entry_grads_equal_the_dense_gradient_gathered():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(30, 6, requires_grad=True)
    ids = torch.randint(0, 12, (40,), generator=g)  # rows 12.. never looked up
    dout = torch.randn(40, 6, generator=g)
    torch.nn.functional.embedding(ids, weight, padding_idx=3).backward(dout)
    flat = torch.randperm(30 * 6, generator=g)[:70].sort().values
    got = eg.embedding_entry_grads(dout, ids, flat // 6, flat % 6, 3, torch.float32)
    torch.testing.assert_close(got, weight.grad.reshape(-1)[flat])
    assert bool((got[(flat // 6) >= 12] == 0).all()) and got.abs().sum() > 0


# ---------------------------------------------------------------- one backward


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method", ["random", "pafi"])
def test_slot_gradients_equal_the_dense_path(kind, method):
    dense_model, dense, sparse_model, sparse = _pair(kind, method)
    assert sparse.selected().keys() == dense.selected().keys()
    for name, index in dense.selected().items():
        assert torch.equal(sparse.selected()[name], index)
    batch = make_batches(kind, 1)[0]
    _loss(dense_model, batch).backward()
    _loss(sparse_model, batch).backward()
    torch.testing.assert_close(_slot_grads(sparse), _slot_grads(dense), rtol=1e-5, atol=1e-7)
    # Linear and Embedding tensors are computed sparsely, and no weight gradient is formed.
    linear = {n for n, m in sparse_model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = set(sparse.sparse_names)
    assert any(n.endswith("embeddings.weight") or "embed_tokens" in n for n in names)
    assert all(n.rsplit(".", 1)[0] in linear or "embed" in n for n in names)
    params = dict(sparse_model.named_parameters())
    assert all(params[n].grad is None and not params[n].requires_grad for n in names)
    assert sparse.sparse_entries_computed > 0


@pytest.mark.parametrize("method", ["random", "pafi"])
def test_conv1d_slot_gradients_equal_the_dense_path(method):
    """GPT-2's Conv1D weights (in x out) and biases, and its tied wte / lm_head, go sparse."""
    from transformers.pytorch_utils import Conv1D

    dense_model, dense, sparse_model, sparse = _pair("gpt2", method)
    batch = make_batches("gpt2", 1)[0]
    _loss(dense_model, batch).backward()
    _loss(sparse_model, batch).backward()
    torch.testing.assert_close(_slot_grads(sparse), _slot_grads(dense), rtol=1e-5, atol=1e-7)
    conv = {n for n, m in sparse_model.named_modules() if isinstance(m, Conv1D)}
    held = {n for n, index in sparse.selected().items() if index.numel()}
    in_conv = {n for n in held if n.rsplit(".", 1)[0] in conv}
    # (random draws Conv1D weights and biases; PaFi, smallest |θ|, GPT-2's zero-initialised biases)
    assert any(n.endswith(".bias") for n in in_conv)
    assert method != "random" or any(n.endswith(".weight") for n in in_conv)
    assert method != "random" or "transformer.wte.weight" in held
    assert in_conv | ({"transformer.wte.weight"} & held) <= set(sparse.sparse_names)
    assert sparse_model.lm_head.weight is sparse_model.transformer.wte.weight


def test_gpt2_run_matches_the_dense_path():
    dense_model, dense, sparse_model, sparse = _pair("gpt2", "random")
    batches = make_batches("gpt2", STEPS)
    _train(dense_model, dense, batches)
    _train(sparse_model, sparse, batches)
    _assert_same_parameters(sparse_model, dense_model)
    sparse.close()
    assert not any("forward" in vars(m) for m in sparse_model.modules())


def test_tied_lm_head_gets_both_contributions():
    """Llama's tied embedding: the lookup and the LM head both reach the same slots."""
    dense_model, dense, sparse_model, sparse = _pair("llama", "random")
    model = sparse_model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "forward" in vars(model.lm_head) and "forward" in vars(model.model.embed_tokens)
    batch = make_batches("llama", 1)[0]
    _loss(dense_model, batch).backward()
    _loss(sparse_model, batch).backward()
    name = "model.embed_tokens.weight"
    index = dense.selected()[name]
    want = dense_model.model.embed_tokens.weight.grad.reshape(-1)[index]
    slots = sparse._slots
    layout = {sparse._names[i]: s for i, s, _ in slots.layout}
    torch.testing.assert_close(slots.delta.grad[layout[name]], want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- whole runs


def _assert_same_parameters(got_model, want_model):
    """Every parameter of the sparse-backward run equals the dense run's (fp32 rounding apart)."""
    want, got = snapshot(want_model), snapshot(got_model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def _train(model, opt, batches, check=None):
    for batch in batches:
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        if check is not None:
            check()


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method", FINAL_MASK)
def test_a_run_matches_the_dense_path(kind, method):
    base = MODELS[kind]()
    try:
        dense_model, dense, sparse_model, sparse = _pair(kind, method)
    except ValueError as err:  # the tiny Llama has no biases (bitfit)
        assert "no parameter is a candidate" in str(err)
        return
    batches = make_batches(kind, STEPS)
    prepare(dense, batches)
    prepare(sparse, batches)
    frozen = bits(base)

    def invariants():
        assert sparse.num_changed <= sparse.total_budget
        changed = {n for n, idx in sparse.selected().items() if idx.numel()}
        now = bits(sparse_model)
        assert all(now[n] == frozen[n] for n in frozen if n not in changed)

    _train(dense_model, dense, batches)
    _train(sparse_model, sparse, batches, invariants)
    assert sparse.sparse_names, "the sparse backward was never installed"
    for name, index in dense.selected().items():
        assert torch.equal(sparse.selected()[name], index)
    _assert_same_parameters(sparse_model, dense_model)


def test_increment_method_switches_at_its_last_unmask():
    dense_model, dense, sparse_model, sparse = _pair("bert", "id3", total_steps=3)
    batches = make_batches("bert", 5)
    for step, batch in enumerate(batches):
        _loss(sparse_model, batch).backward()
        sparse.step()
        sparse.zero_grad()
        assert bool(sparse.sparse_names) == (step >= 2), step
    assert sparse.num_selected == sparse.budget


def test_gradient_accumulation_sums_micro_batches():
    _, _, model, opt = _pair("bert", "random")
    batch = make_batches("bert", 1, batch=4)[0]
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    for half in halves:
        (_loss(model, half) / 2).backward()
    accumulated = _slot_grads(opt)
    opt.zero_grad()
    assert opt._slots.delta.grad.abs().sum() == 0
    _loss(model, batch).backward()
    torch.testing.assert_close(accumulated, _slot_grads(opt), rtol=1e-5, atol=1e-7)


def test_resume_is_identical_to_the_uninterrupted_run():
    base = MODELS["llama"]()
    batches = make_batches("llama", 4)
    args = {"method": "random", "budget": "2%", "lr": 1e-2, "sparse_backward": True}
    model = copy.deepcopy(base)
    opt = SelectiveOptimizer(model, **args)
    _train(model, opt, batches)
    resumed = copy.deepcopy(base)
    first = SelectiveOptimizer(resumed, **args)
    _train(resumed, first, batches[:2])
    state = first.state_dict()
    first.close()
    second = SelectiveOptimizer(resumed, **args)
    second.load_state_dict(state)
    _train(resumed, second, batches[2:])
    assert bits(resumed) == bits(model)


def test_resume_with_another_unmask_every_is_refused():
    model = MODELS["bert"]()
    args = {"method": "id3", "budget": "2%", "total_steps": 4, "lr": 1e-2}
    opt = SelectiveOptimizer(model, unmask_every=2, **args)
    _train(model, opt, make_batches("bert", 1))
    state = opt.state_dict()
    opt.close()
    other = SelectiveOptimizer(model, unmask_every=1, **args)
    with pytest.raises(ValueError, match=r"unmask_every=2, this optimizer has unmask_every=1"):
        other.load_state_dict(state)
    # a checkpoint from before unmask_every existed used the paper's schedule
    del state["unmask"]["unmask_every"]
    other.load_state_dict(state)


def test_clipping_uses_the_selected_gradients():
    dense_model, dense, model, opt = _pair("bert", "random")
    batch = make_batches("bert", 1)[0]
    _loss(model, batch).backward()
    _loss(dense_model, batch).backward()
    selected = _slot_grads(dense)
    norm = opt.clip_grad_norm_(1e-3)
    torch.testing.assert_close(norm.float(), selected.norm(), rtol=1e-5, atol=0)
    clipped = _slot_grads(opt)  # gathering again reads the clipped dense-path gradients
    torch.testing.assert_close(clipped, selected * (1e-3 / (float(norm) + 1e-6)))


def test_low_memory_mode_gives_the_standard_result():
    base = MODELS["bert"]()
    batches = make_batches("bert", 4)
    results = []
    for low in (False, True):
        model = copy.deepcopy(base)
        opt = SelectiveOptimizer(
            model, "id3", budget="2%", total_steps=2, lr=1e-2, sparse_backward=True,
            low_memory=low,
        )  # fmt: skip
        for batch in batches:
            _loss(model, batch).backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        assert opt.sparse_names
        results.append(snapshot(model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_bf16_autocast_matches_the_dense_path(kind):
    dense_model, dense, sparse_model, sparse = _pair(kind, "random")
    batch = make_batches(kind, 1)[0]
    for model in (dense_model, sparse_model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, batch)
        loss.backward()
    got, want = _slot_grads(sparse), _slot_grads(dense)
    # The dense path rounds dW to bf16; the sparse one sums in float32.
    assert float((got - want).norm() / want.norm()) < 2e-2


# ---------------------------------------------------------------- the model given back


def test_close_and_garbage_collection_give_the_model_back():
    base = MODELS["llama"]()
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    keys = list(base.state_dict())
    for drop in ("close", "gc"):
        model = copy.deepcopy(base)
        opt = SelectiveOptimizer(model, "random", budget="2%", sparse_backward=True)
        assert any("forward" in vars(m) for m in model.modules())
        if drop == "close":
            opt.close()
        else:
            del opt
            gc.collect()
        assert not any("forward" in vars(m) for m in model.modules())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert list(model.state_dict()) == keys
        batch = make_batches("llama", 1)[0]
        _loss(model, batch).backward()  # dense gradients again
        assert model.model.embed_tokens.weight.grad is not None


def test_off_by_default_changes_nothing():
    model = MODELS["bert"]()
    opt = SelectiveOptimizer(model, "random", budget="2%")
    assert not any("forward" in vars(m) for m in model.modules())
    assert opt.sparse_names == [] and opt.sparse_entries_computed == 0


def test_crossover_keeps_dense_tensors_dense(monkeypatch):
    monkeypatch.setattr(sb, "MAX_DENSITY", 0.0)
    _, _, model, opt = _pair("bert", "random")
    assert opt.sparse_names == []
    assert not any("forward" in vars(m) for m in model.modules())


def test_refused_on_fsdp_shards(monkeypatch):
    from unmask.optimize import configuration

    with pytest.raises(ValueError) as err:
        configuration._refuse_under_fsdp(METHODS["random"](), None, False, True)
    assert_clear(str(err.value), "not available on FSDP", "sparse_backward=False")


@pytest.mark.parametrize("method", [n for n in method_names() if n not in FINAL_MASK])
def test_refused_where_every_gradient_is_needed(method):
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(
            MODELS["bert"](), method=method, sparse_backward=True, **method_kwargs(method, 3)
        )
    assert_clear(str(err.value), "sparse_backward=True is not available", "sparse_backward=False")


# ---------------------------------------------------------------- unmask_every


@pytest.mark.parametrize("method", [n for n in FINAL_MASK if METHODS[n].grows_mask])
def test_unmask_every_k_keeps_the_schedule_and_matches_the_dense_path(method):
    k, total = 3, 8
    dense_model, dense, model, opt = _pair(
        "bert", method, total_steps=total, unmask_every=k, budget=300
    )
    batches = make_batches("bert", total + 1)
    base = snapshot(dense_model)
    chosen = []
    for step, batch in enumerate(batches):
        for m, o in ((dense_model, dense), (model, opt)):
            _loss(m, batch).backward()
            o.step()
            o.zero_grad()
        n = opt.num_changed
        chosen.append(n)
        bound = opt.schedule.cumulative(min(step + k - 1, total - 1), opt.budget, total)
        assert n <= bound, (step, n, bound)
        if step % k:
            assert n == chosen[step - 1], "weights were unmasked between every k-th step"
        # The coming step runs the sparse backward unless it ranks every weight.
        upcoming_ranks = (step + 1) % k == 0 and n < opt.budget
        assert bool(opt.sparse_names) != upcoming_ranks, step
        for name, p in model.named_parameters():
            held = opt.selected().get(name)
            untouched = torch.ones(p.numel(), dtype=torch.bool)
            if held is not None:
                untouched[held] = False
            assert torch.equal(p.detach().reshape(-1)[untouched], base[name].reshape(-1)[untouched])
    assert opt.num_changed == opt.budget
    for name, index in dense.selected().items():
        assert torch.equal(opt.selected()[name], index)
    _assert_same_parameters(model, dense_model)


def test_unmask_every_one_is_the_paper_schedule():
    """k = 1 unmasks exactly what the default does, at every step."""
    runs = []
    for extra in ({}, {"unmask_every": 1}):
        model = MODELS["bert"]()
        opt = SelectiveOptimizer(model, "id3", budget=200, total_steps=4, lr=1e-2, **extra)
        counts = []
        for batch in make_batches("bert", 4):
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
            counts.append(opt.num_changed)
        runs.append((counts, opt.selected()))
    assert runs[0][0] == runs[1][0] == [50, 100, 150, 200]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_unmask_every_must_be_a_positive_int(bad):
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(MODELS["bert"](), "id3", budget=100, total_steps=4, unmask_every=bad)
    assert_clear(str(err.value), "unmask_every must be an int >= 1", "got")


def test_unmask_every_is_refused_for_a_static_mask():
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(MODELS["bert"](), "random", budget=100, unmask_every=2)
    assert_clear(str(err.value), "does not", "leave unmask_every=1")


# ---------------------------------------------------------------- DDP (two gloo processes)

# name -> (method, its options, sparse_backward)
DDP_SCENARIOS = {
    "random": ("random", {"budget": "2%"}, True),
    "id3": ("id3", {"budget": 300, "total_steps": 2}, True),
    "id3-dense": ("id3", {"budget": 300, "total_steps": 2}, False),
}


def _ddp_train(scenario: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """4 steps with clipping; under DDP on this rank's half of every batch (the tiny BERT is in
    eval mode: the halves' mean loss is the whole batch's)."""
    method, options, sparse = DDP_SCENARIOS[scenario]
    model = MODELS["bert"]()
    module = DDP(model, find_unused_parameters=True) if world > 1 else model
    opt = SelectiveOptimizer(model, method, lr=1e-2, sparse_backward=sparse, **options)
    for batch in make_batches("bert", 4):
        size = batch["input_ids"].shape[0] // world
        half = {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}
        module(**half).loss.backward()
        opt.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad()
    assert bool(opt.sparse_names) == sparse
    return snapshot(model)


def _ddp_worker(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    results = {m: _ddp_train(m, rank, dist.get_world_size()) for m in DDP_SCENARIOS}
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)
def test_ddp_averages_the_slot_gradients(tmp_path):
    launch_torchrun(Path(__file__), tmp_path, 2, 150)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for method in DDP_SCENARIOS:
        single = _ddp_train(method, 0, 1)
        for name, value in single.items():
            assert torch.equal(ranks[0][method][name], ranks[1][method][name]), name
            torch.testing.assert_close(ranks[0][method][name], value, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
