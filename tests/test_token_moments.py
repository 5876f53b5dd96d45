"""Per-token gradient second moments (token_moments.py) and the id3-snr score built on them."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.conftest import make_batches, tiny_bert, tiny_llama
from unmask import SelectiveOptimizer
from unmask.choose.methods import ID3SNR
from unmask.choose.token_moments import TokenMoments


class _RMSNorm(nn.Module):
    """Shaped like Hugging Face's LlamaRMSNorm (found by its class name, not by its type)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _tokenwise_model() -> nn.Module:
    # Every module works token by token, so one token's output has its own gradient.
    torch.manual_seed(0)
    conv = Conv1D(5, 4)
    nn.init.normal_(conv.bias)
    return nn.Sequential(
        nn.Embedding(10, 4),
        nn.Linear(4, 4),
        nn.LayerNorm(4),
        conv,
        _RMSNorm(5),
        nn.RMSNorm(5),
        nn.Linear(5, 3, bias=False),
    )


def test_moments_equal_brute_force_per_token_gradients():
    model = _tokenwise_model()
    moments = TokenMoments(model, list(model.parameters()))
    assert moments.covered == {id(p) for p in model.parameters()}
    ids = torch.tensor([[1, 2, 2, 7], [0, 1, 9, 2]])  # repeated tokens share embedding rows
    weights = torch.randn(2, 4, 3)
    (model(ids) * weights).sum().backward()
    brute = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    moments.active = False
    for b, t in itertools.product(range(2), range(4)):
        model.zero_grad()
        (model(ids)[b, t] * weights[b, t]).sum().backward()
        for n, p in model.named_parameters():
            brute[n] += p.grad.square()
    for n, p in model.named_parameters():
        torch.testing.assert_close(moments.moments(p), brute[n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_every_transformer_parameter_is_covered_and_bounded(make):
    model = make()
    kind = "bert" if make is tiny_bert else "llama"
    moments = TokenMoments(model, list(model.parameters()))
    assert moments.covered == {id(p) for p in model.parameters()}
    batch = make_batches(kind, 1)[0]
    model(**batch).loss.backward()
    tokens = batch["input_ids"].numel()
    for name, p in model.named_parameters():
        second = moments.moments(p)
        assert second is not None and second.shape == p.shape, name
        # Cauchy-Schwarz: (Σ_t g_t)² <= tokens · Σ_t g_t², so the key is at most sqrt(tokens).
        assert (p.grad.square() <= tokens * second * (1 + 1e-4) + 1e-12).all(), name


def test_snr_key_ignores_the_scale_of_an_input_feature():
    # Scaling input feature c by s scales g[:, c] by s and Σ_t g_t²[:, c] by s²: same keys.
    torch.manual_seed(0)
    x, target = torch.randn(32, 6), torch.randn(32, 3)
    keys = []
    for scale in (1.0, 50.0):
        torch.manual_seed(1)
        layer = nn.Linear(6, 3)
        with torch.no_grad():
            layer.weight[:, 2] /= scale
        xs = x.clone()
        xs[:, 2] *= scale
        method = ID3SNR()
        method.attach(layer)
        method.bind(layer, list(layer.parameters()))
        ((layer(xs) - target) ** 2).sum().backward()
        out = torch.empty(18)
        keys.append(method.keys("weight", layer.weight, layer.weight.grad, out).clone())
    assert keys[0].gt(0).all()
    torch.testing.assert_close(keys[0], keys[1], rtol=1e-4, atol=1e-6)


def test_id3_snr_keeps_the_budget_and_stops_collecting_when_final():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, method="id3-snr", budget=120, total_steps=3, lr=1e-2)
    for step, batch in enumerate(make_batches("bert", 5)):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        assert opt.num_selected == min(120, 40 * (step + 1))
    assert opt.method._moments._handles == []  # hooks removed once the budget was spent


def test_parameters_outside_supported_modules_are_not_candidates():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.linear(x) * self.scale

    model = Scaled()
    opt = SelectiveOptimizer(model, method="id3-snr", budget=4, total_steps=1)
    assert set(opt._names) == {"linear.weight", "linear.bias"}
    with pytest.raises(ValueError, match="id3-snr ranks the parameters of nn.Linear"):
        SelectiveOptimizer(model, method="id3-snr", budget=4, total_steps=1, include="scale")


def test_proportional_allocation_follows_tensor_sizes_and_keeps_the_budget():
    def spread(allocation: str) -> float:
        model = tiny_bert()
        method = ID3SNR(allocation=allocation)
        opt = SelectiveOptimizer(model, method=method, budget=1000, total_steps=4, lr=1e-2)
        for step, batch in enumerate(make_batches("bert", 4)):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            assert opt.num_selected == 250 * (step + 1)
        held, total = opt.allocation(), sum(p.numel() for p in opt._params)
        # Weights away from each tensor's size share, as a fraction of the budget.
        return (
            sum(
                abs(held.get(n, 0) - 1000 * p.numel() / total)
                for n, p in zip(opt._names, opt._params, strict=True)
            )
            / 1000
        )

    assert spread("proportional") < 0.05 < 0.5 < spread("global")


def test_proportional_allocation_is_refused_in_low_memory_mode():
    with pytest.raises(ValueError, match="allocation='proportional'"):
        SelectiveOptimizer(
            tiny_bert(), method=ID3SNR(allocation="proportional"), budget=10, total_steps=2,
            low_memory=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="allocation must be"):
        ID3SNR(allocation="rows")


def test_tiny_gradients_keep_their_bound():
    # Per-token squares of a gradient near 1e-14 underflow float32 if squared unscaled; the
    # key then exceeded sqrt(tokens) and ranked first. Scaling first keeps it right.
    torch.manual_seed(0)
    tokens = 1001
    layer = nn.Linear(3, 2)
    method = ID3SNR()
    method.attach(layer)
    method.bind(layer, list(layer.parameters()))
    x = torch.randn(tokens, 3)
    (layer(x) * torch.full((tokens, 2), 1e-14) * torch.randn(tokens, 1)).sum().backward()
    keys = method.keys("weight", layer.weight, layer.weight.grad, torch.empty(6))
    assert layer.weight.grad.abs().max() > 0
    assert torch.isfinite(keys).all() and keys.gt(0).all()
    assert keys.max() <= tokens**0.5 * (1 + 1e-4)


def test_a_method_object_serves_one_optimizer_and_a_dropped_one_stops_collecting():
    import gc

    model = tiny_bert()
    method = ID3SNR()
    opt = SelectiveOptimizer(model, method=method, budget=50, total_steps=5)
    with pytest.raises(ValueError, match="already used by an optimizer"):
        SelectiveOptimizer(model, method=method, budget=50, total_steps=5)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks > 0
    del opt, method
    gc.collect()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_only_candidates_are_hooked_and_multihead_attention_is_left_out():
    model = tiny_bert()
    opt = SelectiveOptimizer(
        model, method="id3-snr", budget=50, total_steps=5, exclude=["embeddings"]
    )
    model(**make_batches("bert", 1)[0]).loss.backward()
    for name, p in model.named_parameters():
        has = opt.method._moments.moments(p) is not None
        assert has == (name in opt._names), name

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.att(x, x, x)[0])

    opt = SelectiveOptimizer(WithMHA(), method="id3-snr", budget=3, total_steps=1)
    assert opt._names == ["head.weight", "head.bias"]


def test_moments_under_activation_checkpointing_equal_plain_ones():
    from torch.utils.checkpoint import checkpoint

    results = []
    for mode in (None, False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        moments = TokenMoments(model, list(model.parameters()))
        x = torch.randn(3, 5, 4, requires_grad=True)
        y = model(x) if mode is None else checkpoint(model, x, use_reentrant=mode)
        y.square().sum().backward()
        results.append([moments.moments(p).clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b)


def test_a_module_called_with_its_input_by_name_is_counted():
    layer = nn.Linear(3, 2)
    moments = TokenMoments(layer, list(layer.parameters()))
    x = torch.randn(5, 3)
    layer(input=x).sum().backward()
    expected = torch.ones(5, 2).T @ x.square()  # dy = 1 for every token and output
    torch.testing.assert_close(moments.moments(layer.weight), expected)


def test_resuming_a_finished_mask_stops_collecting():
    model = tiny_bert()
    opt = SelectiveOptimizer(model, method="id3-snr", budget=40, total_steps=2, lr=1e-2)
    for batch in make_batches("bert", 2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    fresh = tiny_bert()
    resumed = SelectiveOptimizer(fresh, method="id3-snr", budget=40, total_steps=2, lr=1e-2)
    resumed.load_state_dict(state)
    assert sum(len(m._forward_hooks) for m in fresh.modules()) == 0
