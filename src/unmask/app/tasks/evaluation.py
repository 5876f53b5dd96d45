"""A model's score on a task's examples: accuracy, or exact match of the greedy continuation."""

from __future__ import annotations

from typing import Any

import torch

from unmask.app.tasks.batches import encode
from unmask.app.tasks.task import Task


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: list[dict],
    batch_size: int,
    max_length: int,
    max_new_tokens: int = 8,
) -> float:
    """Accuracy (classification) or exact match of the greedy continuation (generation), on the
    model's device; the model is left in the mode (train or eval) it was in."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if task.kind == "classification":
            batch = {k: v.to(device) for k, v in encode(tokenizer, task, chunk, max_length).items()}
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
            continue
        tokenizer.padding_side = "left"
        enc = tokenizer(
            [e["prompt"] for e in chunk],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        correct += sum(t.strip() == e["answer"].strip() for t, e in zip(texts, chunk, strict=True))
    model.train(was_training)
    return correct / max(len(examples), 1)
