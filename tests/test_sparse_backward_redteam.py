"""Red-team probes of `SelectiveOptimizer(..., sparse_backward=True)`.

Each test states the correct behaviour: the sparse backward's slot gradients / trained parameters
equal the same run with `sparse_backward=False` (to a stated tolerance), or a clear error, or the
model given back after `close()` / garbage collection. The comments above the regression tests
say what once failed.

`MAX_DENSITY` is raised to 1.0 (autouse fixture) so that the tiny models' tensors really take the
sparse path.
"""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batches, snapshot, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from torch.utils.checkpoint import checkpoint

from unmask import SelectiveOptimizer
from unmask.optimize import sparse_backward as sb


@pytest.fixture(autouse=True)
def every_tensor_sparse(monkeypatch):
    monkeypatch.setattr(sb, "MAX_DENSITY", 1.0)


# ---------------------------------------------------------------- helpers

VOCAB, D, HID = 20, 16, 24


class TinyLM(nn.Module):
    """Embedding -> Linear -> tanh -> Linear (+ residual) -> head; every kind of sparse module.

    `ckpt`: None, or run fc1/fc2 under torch.utils.checkpoint (use_reentrant=ckpt).
    `tie`: the head shares the embedding's weight. `padding_idx`: the embedding's.
    """

    def __init__(self, bias=True, tie=False, padding_idx=None, ckpt=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, D, padding_idx=padding_idx)
        self.fc1 = nn.Linear(D, HID, bias=bias)
        self.fc2 = nn.Linear(HID, D, bias=bias)
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tie:
            self.head.weight = self.emb.weight
        self.ckpt = ckpt

    def block(self, h):
        return self.fc2(torch.tanh(self.fc1(h))) + h

    def forward(self, ids):
        h = self.emb(ids)
        if self.ckpt is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.ckpt)
        return self.head(h)


def lm_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


def token_batches(count, batch=3, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=g) for _ in range(count)]


def pair(make, method="random", budget="10%", **kwargs):
    """(dense model, dense optimizer, sparse model, sparse optimizer): same weights, options."""
    base = make()
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    args = {"method": method, "budget": budget, "lr": 1e-2, **kwargs}
    opts = [
        SelectiveOptimizer(m, sparse_backward=s, **args)
        for m, s in zip(models, (False, True), strict=True)
    ]
    assert opts[1].sparse_names, "the sparse backward is not installed"
    return models[0], opts[0], models[1], opts[1]


def slot_grads(opt):
    """The gradients step() would use (dense-path ones gathered from .grad)."""
    opt._slots.gather_grads()
    return opt._slots.delta.grad[: opt._slots.n].clone()


def assert_same_params(got_model, want_model, rtol=1e-4, atol=1e-6):
    want, got = snapshot(want_model), snapshot(got_model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def same_grads_after(closure, make=TinyLM, rtol=1e-5, atol=1e-6, **kwargs):
    """Run `closure(model)` (forward + backward) on both paths; assert equal slot gradients."""
    dm, do, sm, so = pair(make, **kwargs)
    closure(dm)
    closure(sm)
    want, got = slot_grads(do), slot_grads(so)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return dm, do, sm, so


def train_both(dm, do, sm, so, steps_fn):
    for model, opt in ((dm, do), (sm, so)):
        steps_fn(model, opt)


HF = {
    "bert": lambda: tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "llama": tiny_llama,
    "gpt2": lambda: tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def hf_batch(kind, **kw):
    return make_batches("bert" if kind == "bert" else "llama", 1, **kw)[0]


# ---------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("kind", sorted(HF))
@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_gradient_checkpointing_matches_dense(kind, reentrant):
    def closure(model):
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        model(**hf_batch(kind)).loss.backward()

    same_grads_after(closure, make=HF[kind], budget="2%")


@pytest.mark.parametrize("reentrant", [True, False])
def test_torch_checkpoint_around_linears_matches_dense(reentrant):
    make = lambda: TinyLM(ckpt=reentrant)  # noqa: E731
    ids = token_batches(1)[0]
    same_grads_after(lambda m: lm_loss(m, ids).backward(), make=make)


def _idle_embedding_lm(ckpt):
    """PaFi picks the smallest |θ|: huge embedding weights are never picked (an idle candidate)."""
    model = TinyLM(ckpt=ckpt)
    with torch.no_grad():
        model.emb.weight.mul_(1e4)
    return model


def test_reentrant_checkpoint_after_an_idle_embedding_matches_dense_with_freeze_off():
    """By default the sparse backward freezes candidates holding no selected weight (as
    freeze_unselected does); a reentrant checkpoint fed only by such a frozen embedding then
    gets no input requiring grad (torch warns, the block's gradients are lost). With
    freeze_unselected=False the idle embedding keeps training and the block matches dense."""
    ids = token_batches(1)[0]
    dm, do, sm, so = pair(
        lambda: _idle_embedding_lm(True), method="pafi", budget="10%", freeze_unselected=False
    )
    assert "emb.weight" not in so.selected() and "fc1.weight" in so.selected()
    assert sm.emb.weight.requires_grad
    for m in (dm, sm):
        lm_loss(m, ids).backward()
    want, got = slot_grads(do), slot_grads(so)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_non_reentrant_checkpoint_after_an_idle_embedding_matches_dense():
    ids = token_batches(1)[0]
    dm, do, sm, so = pair(lambda: _idle_embedding_lm(False), method="pafi", budget="10%")
    for m in (dm, sm):
        lm_loss(m, ids).backward()
    torch.testing.assert_close(slot_grads(so), slot_grads(do), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["gpt2", "tinylm"])
def test_autocast_matches_dense(kind, dtype):
    make = HF["gpt2"] if kind == "gpt2" else TinyLM
    dm, do, sm, so = pair(make, budget="2%" if kind == "gpt2" else "10%")
    for m in (dm, sm):
        with torch.autocast("cpu", dtype=dtype):
            loss = m(**hf_batch("gpt2")).loss if kind == "gpt2" else lm_loss(m, token_batches(1)[0])
        loss.backward()
    got, want = slot_grads(so), slot_grads(do)
    assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize("kind", ["llama", "gpt2", "tinylm"])
def test_bf16_weights_match_dense(kind):
    make = {"llama": tiny_llama, "gpt2": HF["gpt2"], "tinylm": TinyLM}[kind]
    dm, do, sm, so = pair(
        lambda: make().to(torch.bfloat16), budget="2%" if kind != "tinylm" else "10%"
    )
    for m in (dm, sm):
        loss = lm_loss(m, token_batches(1)[0]) if kind == "tinylm" else m(**hf_batch("llama")).loss
        loss.backward()
    got, want = slot_grads(so), slot_grads(do)
    # The dense path rounds dW to bf16; the sparse one sums in float32.
    assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize("kind", ["llama", "gpt2", "tinylm"])
def test_float64_weights_match_dense_tightly(kind):
    make = {"llama": tiny_llama, "gpt2": HF["gpt2"], "tinylm": TinyLM}[kind]
    budget = "2%" if kind != "tinylm" else "10%"
    dm, do, sm, so = pair(lambda: make().double(), budget=budget)
    assert so._slots.delta.dtype == torch.float64

    def steps(model, opt):
        for ids in token_batches(3):
            if kind == "tinylm":
                lm_loss(model, ids).backward()
            else:
                model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

    train_both(dm, do, sm, so, steps)
    assert_same_params(sm, dm, rtol=1e-10, atol=1e-12)


def test_model_to_float64_while_installed_matches_dense():
    dm, do, sm, so = pair(TinyLM)
    batches = token_batches(4)

    def steps(model, opt):
        for i, ids in enumerate(batches):
            if i == 2:
                model.double()
            lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()

    train_both(dm, do, sm, so, steps)
    assert_same_params(sm, dm, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- how the graph is used


class FloatInputMLP(nn.Module):
    """The first op is a sparse Linear on a float input that does not require grad."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(D, HID), nn.Linear(HID, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_input_that_does_not_require_grad():
    x = torch.randn(5, D)
    y = torch.tensor([0, 1, 2, 0, 1])
    same_grads_after(lambda m: F.cross_entropy(m(x), y).backward(), make=FloatInputMLP)


def test_eval_forwards_under_no_grad_and_inference_mode_between_steps():
    dm, do, sm, so = pair(TinyLM)
    batches, probe = token_batches(4), token_batches(1, seed=9)[0]

    def steps(model, opt):
        for ids in batches:
            model.train()
            lm_loss(model, ids).backward()
            model.eval()
            with torch.no_grad():
                lm_loss(model, probe)
            with torch.inference_mode():
                lm_loss(model, probe)
            opt.step()
            opt.zero_grad()

    train_both(dm, do, sm, so, steps)
    assert_same_params(sm, dm)


def test_eval_forward_between_forward_and_backward():
    """A forward under no_grad after the training forward, before its backward (the Scratch's
    shared-input cache must not mix them up)."""
    ids, probe = token_batches(1)[0], token_batches(1, seed=9)[0]

    def closure(model):
        loss = lm_loss(model, ids)
        with torch.no_grad():
            lm_loss(model, probe)
        loss.backward()

    same_grads_after(closure)


def test_two_forwards_summed_into_one_loss():
    a, b = token_batches(2)
    same_grads_after(lambda m: (lm_loss(m, a) + 0.5 * lm_loss(m, b)).backward())


def test_a_forward_whose_output_is_not_used():
    a, b = token_batches(2)

    def closure(model):
        unused = lm_loss(model, b)  # noqa: F841 (built with grad, never backpropagated)
        lm_loss(model, a).backward()

    same_grads_after(closure)


def test_retain_graph_and_a_second_backward_accumulate():
    ids = token_batches(1)[0]

    def closure(model):
        loss = lm_loss(model, ids)
        loss.backward(retain_graph=True)
        loss.backward()

    same_grads_after(closure)


# torch.autograd.grad(loss, inputs) must not touch any gradient (input saliency, logging a
# norm); the sparse backward adds its entries only when the engine accumulates (SparseBackward
# .accumulates).
def test_autograd_grad_wrt_inputs_does_not_add_to_the_slots():
    ids = token_batches(1)[0]
    dm, do, sm, so = pair(TinyLM)
    for model in (dm, sm):
        h = model.emb(ids).detach().requires_grad_()
        logits = model.head(model.block(h))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1))
        (g,) = torch.autograd.grad(loss, h)
        assert g.abs().sum() > 0
    assert float(slot_grads(do).abs().sum()) == 0.0
    assert float(slot_grads(so).abs().sum()) == 0.0


def test_double_backward_is_refused():
    """A gradient penalty needs second-order terms through the selected weights, which the
    sparse backward does not record: create_graph=True raises, saying what to do."""
    ids = token_batches(1)[0]
    _, _, sm, _ = pair(TinyLM)
    h = sm.emb(ids)
    loss = F.cross_entropy(sm.head(sm.block(h)).reshape(-1, VOCAB), ids.reshape(-1))
    with pytest.raises(RuntimeError, match="double backward.*sparse_backward=False"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_autograd_grad_then_backward_counts_once():
    ids = token_batches(1)[0]

    def closure(model):
        h = model.emb(ids)
        logits = model.head(model.block(h))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1))
        torch.autograd.grad(loss, h, retain_graph=True)
        loss.backward()

    same_grads_after(closure)


def test_step_with_a_closure():
    dm, do, sm, so = pair(TinyLM)

    def steps(model, opt):
        for ids in token_batches(3):

            def closure(ids=ids):
                opt.zero_grad()
                loss = lm_loss(model, ids)
                loss.backward()
                return loss

            opt.step(closure)

    train_both(dm, do, sm, so, steps)
    assert_same_params(sm, dm)


# ---------------------------------------------------------------- sharing and functional use


def test_tied_embedding_and_head_match_dense():
    ids = token_batches(1)[0]
    dm, do, sm, so = same_grads_after(
        lambda m: lm_loss(m, ids).backward(), make=lambda: TinyLM(tie=True)
    )
    assert "emb.weight" in so.sparse_names


class SharedLinear(nn.Module):
    """Two Linear modules sharing one weight, and one Linear applied twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, D)
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
        self.b.weight = self.a.weight
        self.twice = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.a(h)) + torch.tanh(self.b(h * 0.5))
        h = self.twice(torch.tanh(self.twice(h)))
        return self.head(h)


def test_shared_weight_and_a_linear_applied_twice():
    ids = token_batches(1)[0]
    dm, do, sm, so = same_grads_after(lambda m: lm_loss(m, ids).backward(), make=SharedLinear)
    assert {"a.weight", "twice.weight"} <= set(so.sparse_names)


class FunctionalReuse(TinyLM):
    """A hand-written model that also uses fc1's weight outside fc1's forward."""

    def forward(self, ids):
        h = self.emb(ids)
        h = self.fc2(torch.tanh(self.fc1(h))) + h
        h = h + 0.1 * F.linear(h, self.fc1.weight)[..., :D]
        return self.head(h)


def test_weight_also_used_functionally_is_not_trained_there():
    """Documented limitation (docs/sparse_backward.md): a sparse weight used outside its module
    (F.linear(h, fc1.weight)) gets no gradient from that use, since it does not require one."""
    ids = token_batches(1)[0]
    _, _, sm, so = pair(FunctionalReuse)
    assert "fc1.weight" in so.sparse_names and not sm.fc1.weight.requires_grad
    lm_loss(sm, ids).backward()
    assert sm.fc1.weight.grad is None


def test_embedding_padding_idx_entries_get_zero_like_dense():
    ids = token_batches(1)[0]
    ids[:, 0] = 0  # the padding token is in the batch
    dm, do, sm, so = same_grads_after(
        lambda m: lm_loss(m, ids).backward(), make=lambda: TinyLM(padding_idx=0), budget="30%"
    )
    picked = so.selected()["emb.weight"]
    assert bool((picked // D == 0).any()), "no entry in the padding row was drawn"


def test_int32_token_ids_match_dense():
    ids = token_batches(1)[0]
    same_grads_after(
        lambda m: F.cross_entropy(m(ids.int()).reshape(-1, VOCAB), ids.reshape(-1)).backward()
    )


# ---------------------------------------------------------------- input shapes and layouts


class AnyShapeMLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(D, HID, bias=bias), nn.Linear(HID, 4, bias=bias)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize(
    "shape", [(2, 3, 4, D), (1, D), (D,), (1, 1, D), (3, D)], ids=lambda s: "x".join(map(str, s))
)
def test_inputs_of_any_rank_and_batch_of_one(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    same_grads_after(lambda m: m(x).square().mean().backward(), make=AnyShapeMLP)


def test_non_contiguous_inputs():
    base = torch.randn(D, 5, 3, generator=torch.Generator().manual_seed(0))
    x = base.permute(2, 1, 0)  # (3, 5, D), not contiguous
    assert not x.is_contiguous()
    same_grads_after(lambda m: m(x).square().mean().backward(), make=AnyShapeMLP)


def test_loss_is_a_plain_sum_expanded_output_gradient():
    """y.sum(): autograd hands over an expanded dY (stride 0)."""
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0))
    same_grads_after(lambda m: m.fc1(x).sum().backward(), make=AnyShapeMLP)


def test_linear_without_bias():
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0))
    same_grads_after(
        lambda m: m(x).square().mean().backward(), make=lambda: AnyShapeMLP(bias=False)
    )


@pytest.mark.parametrize("row_block", [4096, 3])
def test_sequence_length_and_batch_change_between_steps(monkeypatch, row_block):
    """The Scratch buffers are reused and grown; shorter batches after longer ones (and with
    ROW_BLOCK = 3, several row blocks per weight reuse one buffer)."""
    from unmask.optimize import entry_grads

    monkeypatch.setattr(entry_grads, "ROW_BLOCK", row_block)
    dm, do, sm, so = pair(TinyLM)
    shapes = [(3, 7), (1, 30), (4, 2), (1, 1), (2, 40), (3, 5)]
    batches = [token_batches(1, batch=b, length=t, seed=i)[0] for i, (b, t) in enumerate(shapes)]

    def steps(model, opt):
        for ids in batches:
            lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()

    train_both(dm, do, sm, so, steps)
    assert_same_params(sm, dm)


# An empty batch (0 tokens) gives zero gradients, as on the dense path (the embedding's sums
# over the batch's distinct tokens once indexed an empty tensor).
def test_empty_batch():
    ids = torch.zeros(0, 7, dtype=torch.long)

    def closure(model):
        (
            model(ids).sum() + sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)
        ).backward()

    dm, do, sm, so = pair(TinyLM)
    for m in (dm, sm):
        closure(m)
    assert float(slot_grads(so).abs().sum()) == 0.0 == float(slot_grads(do).abs().sum())


# ---------------------------------------------------------------- module variants


def test_entries_in_biases_only():
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0))
    dm, do, sm, so = same_grads_after(
        lambda m: m(x).square().mean().backward(), make=AnyShapeMLP, include="bias", budget="50%"
    )
    assert set(so.sparse_names) == {"fc1.bias", "fc2.bias"}


def test_weight_on_dense_path_and_bias_sparse_in_one_module(monkeypatch):
    """MAX_DENSITY between the fractions: fc1's weight dense path and its bias sparse, fc2's
    weight sparse and its bias dense path (both under bf16 autocast)."""
    monkeypatch.setattr(sb, "MAX_DENSITY", 0.17)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0))

    def closure(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()

    dm, do, sm, so = pair(AnyShapeMLP, budget=80)
    assert set(so.sparse_names) == {"fc1.bias", "fc2.weight"}
    assert set(so.selected()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    for m in (dm, sm):
        closure(m)
    got, want = slot_grads(so), slot_grads(do)
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_module_hooks_still_run():
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0))

    def closure(model):
        model.fc1.register_forward_hook(lambda mod, inp, out: out * 2.0)
        model.fc2.register_full_backward_hook(lambda mod, gin, gout: None)
        model(x).square().mean().backward()

    same_grads_after(closure, make=AnyShapeMLP)


# ---------------------------------------------------------------- optimizer usage


def test_accumulation_with_zero_grad_set_to_none_false():
    dm, do, sm, so = pair(TinyLM)
    batches = token_batches(6)

    def steps(model, opt):
        for i in range(0, 6, 3):
            for ids in batches[i : i + 3]:
                (lm_loss(model, ids) / 3).backward()
            opt.clip_grad_norm_(1e6)  # a no-op clip on both paths
            opt.step()
            opt.zero_grad(set_to_none=False)

    train_both(dm, do, sm, so, steps)
    assert_same_params(sm, dm)


def test_low_memory_with_checkpointing_matches_dense():
    base = tiny_llama()
    batches = make_batches("llama", 3)
    results = []
    for low, sparse in ((False, False), (True, True)):
        model = copy.deepcopy(base)
        opt = SelectiveOptimizer(
            model, "random", budget="2%", lr=1e-2, sparse_backward=sparse, low_memory=low
        )
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        for batch in batches:
            model(**batch).loss.backward()
            opt.clip_grad_norm_(1e6)
            opt.step()
            opt.zero_grad()
        results.append(model)
    assert_same_params(results[1], results[0])


def test_opt_zero_grad_discards_a_backward():
    """The selected gradients live in the optimizer (documented: model.zero_grad() does not
    clear them); opt.zero_grad() discards a backward as the dense path's zero_grad does."""
    dm, do, sm, so = pair(TinyLM)
    a, b = token_batches(2)

    def steps(model, opt):
        lm_loss(model, a).backward()
        opt.zero_grad()
        lm_loss(model, b).backward()
        opt.step()
        opt.zero_grad()

    train_both(dm, do, sm, so, steps)
    assert_same_params(sm, dm)


def test_state_dict_rollback_on_the_same_optimizer():
    """Save at step 2, train on, load the step-2 state back into the same optimizer (and the
    model's state_dict), then train: equals continuing from step 2 directly."""
    batches = token_batches(4)
    model = TinyLM()
    opt = SelectiveOptimizer(model, "random", budget="10%", lr=1e-2, sparse_backward=True)
    for ids in batches[:2]:
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    for ids in token_batches(3, seed=5):  # a detour
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    for ids in batches[2:]:
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()

    ref = TinyLM()
    ref_opt = SelectiveOptimizer(ref, "random", budget="10%", lr=1e-2, sparse_backward=True)
    for ids in batches:
        lm_loss(ref, ids).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert_same_params(model, ref, rtol=0, atol=0)


def test_resume_a_sparse_checkpoint_on_the_dense_path_and_back():
    batches = token_batches(4)

    def run(first_sparse, second_sparse):
        model = TinyLM()
        args = {"method": "random", "budget": "10%", "lr": 1e-2}
        opt = SelectiveOptimizer(model, sparse_backward=first_sparse, **args)
        for ids in batches[:2]:
            lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()
        state = opt.state_dict()
        opt.close()
        opt = SelectiveOptimizer(model, sparse_backward=second_sparse, **args)
        opt.load_state_dict(state)
        for ids in batches[2:]:
            lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()
        return model

    want = run(False, False)
    assert_same_params(run(True, False), want)
    assert_same_params(run(False, True), want)


# Rebinding `opt = SelectiveOptimizer(model, ...)` without close() (a notebook cell run twice):
# the first froze its sparse tensors, so the second would see other candidates; it is refused.
def test_building_a_second_optimizer_without_close_is_refused_or_equivalent():
    model = TinyLM()
    opt = SelectiveOptimizer(model, "random", budget="10%", lr=1e-2, sparse_backward=True)
    names = list(opt._names)
    try:
        opt = SelectiveOptimizer(model, "random", budget="10%", lr=1e-2, sparse_backward=True)
    except ValueError as err:
        assert "close()" in str(err)
        return
    gc.collect()
    assert opt._names == names, "the second optimizer silently has other candidates"
    assert opt.sparse_names


# After a training step, dropping the optimizer gives the model back: the shared-input cache
# holds x detached (with its autograd history it made a cycle through autograd nodes, which gc
# cannot free, so the finalizer never ran).
def test_dropping_the_optimizer_after_training_gives_the_model_back():
    model = TinyLM()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    opt = SelectiveOptimizer(model, "random", budget="10%", lr=1e-2, sparse_backward=True)
    backward = weakref.ref(opt._switch.backward)
    lm_loss(model, token_batches(1)[0]).backward()
    opt.step()
    opt.zero_grad()
    del opt
    gc.collect()
    assert not any("forward" in vars(m) for m in model.modules()), "sparse forward still installed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert backward() is None, "the SparseBackward (scratch buffers, cached activation) leaked"


# The same cycle kept a closed optimizer's SparseBackward (and its scratch buffers) alive.
def test_close_then_drop_frees_the_sparse_backward():
    model = TinyLM()
    opt = SelectiveOptimizer(model, "random", budget="10%", lr=1e-2, sparse_backward=True)
    backward = weakref.ref(opt._switch.backward)
    lm_loss(model, token_batches(1)[0]).backward()
    opt.step()
    opt.close()
    assert not any("forward" in vars(m) for m in model.modules())
    del opt
    gc.collect()
    assert backward() is None, "the SparseBackward leaked after close()"


# ... and leaked one SparseBackward per re-install with unmask_every > 1.
def test_unmask_every_does_not_accumulate_sparse_backwards():
    model = TinyLM()
    opt = SelectiveOptimizer(
        model, "id3", budget=60, total_steps=12, unmask_every=3, lr=1e-2, sparse_backward=True
    )
    for ids in token_batches(12):
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    gc.collect()
    mine = opt._slots
    live = [o for o in gc.get_objects() if isinstance(o, sb.SparseBackward) and o.slots is mine]
    assert len(live) <= 1, f"{len(live)} SparseBackward objects alive"


def test_deepcopy_of_the_model_while_installed_is_refused_then_works_after_close():
    model = TinyLM()
    opt = SelectiveOptimizer(model, "random", budget="10%", lr=1e-2, sparse_backward=True)
    with pytest.raises(TypeError, match="deepcopy.*close"):
        copy.deepcopy(model)
    opt.close()
    ids = token_batches(1)[0]
    clone = copy.deepcopy(model)
    with torch.no_grad():
        before = clone(ids).clone()
        for p in model.parameters():
            p.mul_(0.5)  # change only the original
        torch.testing.assert_close(clone(ids), before, rtol=0, atol=0)


def test_pickling_the_model_while_installed_is_refused():
    model = TinyLM()
    opt = SelectiveOptimizer(model, "random", budget="10%", lr=1e-2, sparse_backward=True)
    with pytest.raises(TypeError, match="pickle.*close"):
        torch.save(model, io.BytesIO())
    opt.close()
    torch.save(model, io.BytesIO())


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_matches_dense(backend):
    torch._dynamo.reset()
    ids = token_batches(1)[0]

    def closure(model):
        compiled = torch.compile(model, backend=backend)
        logits = compiled(ids)
        F.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1)).backward()

    dm, do, sm, so = same_grads_after(closure)
    assert so.sparse_entries_computed > 0
