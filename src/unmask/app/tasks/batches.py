"""A task's examples as model inputs: the tokenised batch, and which examples form each step's."""

from __future__ import annotations

import random
from typing import Any

import torch

from unmask.app.tasks.task import Task


def encode(
    tokenizer: Any, task: Task, examples: list[dict], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenised batch: classification labels, or LM labels masked to the answer tokens only."""
    if task.kind == "classification":
        enc = tokenizer(
            [e["text"] for e in examples],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([e["label"] for e in examples])
        return dict(enc)
    rows, labels = [], []
    for e in examples:
        prompt = tokenizer(e["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(e["answer"], add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        rows.append(ids)
        labels.append(([-100] * len(prompt) + answer)[:max_length])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    # Left padding keeps every prompt's last token at the end, as generation expects.
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    label_ids = torch.tensor(
        [[-100] * (width - len(r)) + lab for r, lab in zip(rows, labels, strict=True)]
    )
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of each of `steps` batches; the examples are reshuffled every epoch."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        order = list(range(n))
        rng.shuffle(order)
        out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return out[:steps]
