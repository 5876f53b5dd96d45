"""benchmarks/harness.py: the benchmarks' one training loop and their one LoRA builder."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from benchmarks.harness import train, with_lora


class _Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(loss=((self.linear(x) - y) ** 2).mean())


def test_train_steps_each_batch_in_order_and_times_them() -> None:
    torch.manual_seed(0)
    model = _Regression()
    reference = _Regression()
    reference.load_state_dict(model.state_dict())
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1)} for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    held = []

    def after_backward() -> None:  # gradients are there, not yet stepped or zeroed
        held.append(model.linear.weight.grad.clone())

    log = train(model, opt, iter(batches), after_backward=after_backward)

    # The same steps written out by hand give the same losses and weights.
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    losses = []
    for batch, grad in zip(batches, held, strict=True):
        loss = reference(**batch).loss
        loss.backward()
        assert torch.equal(reference.linear.weight.grad, grad)
        ref_opt.step()
        ref_opt.zero_grad()
        losses.append(loss.item())
    assert log.losses == losses
    assert torch.equal(model.linear.weight, reference.linear.weight)
    assert model.linear.weight.grad is None  # zero_grad ran after the last step
    assert len(log.step_seconds) == len(log.optimizer_seconds) == 3
    assert all(0 <= o <= s for o, s in zip(log.optimizer_seconds, log.step_seconds, strict=True))


def test_with_lora_adapts_the_targets_the_model_has() -> None:
    pytest.importorskip("peft")
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    model = with_lora(
        BertForSequenceClassification(config), ("query", "value", "q_proj"), classifier=True
    )
    lora_config = model.peft_config["default"]
    assert set(lora_config.target_modules) == {"query", "value"}
    assert (lora_config.r, lora_config.lora_alpha, lora_config.lora_dropout) == (8, 16, 0.0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("query.lora_A" in n for n in trained) and any("value.lora_B" in n for n in trained)
    assert any("classifier" in n for n in trained)  # SEQ_CLS: peft trains a copy of the head
