"""The models `unmask train` and `unmask eval` load: aliases, a model for a task, its new head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unmask.app import resources
from unmask.app.tasks import Task

MODEL_ALIASES = {"minilm": resources.minilm_path, "smollm2": resources.smollm2_path}


def resolve_model(name: str) -> str:
    """A model alias ("minilm", "smollm2") becomes its cached local folder; others pass through.

    A name that is clearly a path (absolute, or starting with . or ~) must exist.
    """
    if name in MODEL_ALIASES:
        return str(MODEL_ALIASES[name]())
    path = Path(name).expanduser()
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~"))):
        raise FileNotFoundError(
            f"model folder {name} not found; give a local folder, 'minilm', 'smollm2', or a "
            "Hugging Face hub name"
        )
    return name


def load_model(name: str, task: Task) -> tuple[Any, Any]:
    """(model, tokenizer) for `task`: a sequence classifier or a causal LM, in fp32."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task.kind == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=task.num_labels, dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def new_head_patterns(model: torch.nn.Module) -> list[str]:
    """Parameters that from_pretrained initialised at random: trained dense, saved whole."""
    names = [n for n, _ in model.named_parameters()]
    return [
        rf"^{head}\."
        for head in ("classifier", "score")
        if any(n.startswith(head + ".") for n in names)
    ]
