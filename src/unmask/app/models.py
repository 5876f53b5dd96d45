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
    """(model, tokenizer) for `task`: a sequence classifier or a causal LM, in fp32.

    A classifier's config names the task's labels (id2label / label2id), so a merged model
    predicts label names.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task.kind == "classification":
        model = load_classifier(path, task.num_labels, task.label_names)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_classifier(path: str, num_labels: int, label_names: list[str] | None) -> Any:
    """A sequence classifier of `num_labels` outputs from `path`, in fp32, its labels named."""
    from transformers import AutoModelForSequenceClassification

    names = {}
    if label_names and len(label_names) == num_labels:
        names = {
            "id2label": dict(enumerate(label_names)),
            "label2id": {label: i for i, label in enumerate(label_names)},
        }
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, dtype=torch.float32, **names
    )


def add_lora(model: torch.nn.Module, kind: str, r: int, seed: int) -> torch.nn.Module:
    """`model` wrapped in a peft LoRA adapter of rank `r` on every linear layer.

    The adapter's random initialisation is drawn from `seed` alone, so the same base, rank and
    seed rebuild the same adapter (an ID3+LoRA delta applies to it). A classifier's head is a
    peft ``modules_to_save`` copy, trained whole.
    """
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as err:
        raise ValueError("--lora-r and --method lora need peft: pip install peft") from err
    task_type = TaskType.SEQ_CLS if kind == "classification" else TaskType.CAUSAL_LM
    config = LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", task_type=task_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def new_head_patterns(model: torch.nn.Module) -> list[str]:
    """Parameters that from_pretrained initialised at random: trained dense, saved whole."""
    names = [n for n, _ in model.named_parameters()]
    return [
        rf"^{head}\."
        for head in ("classifier", "score")
        if any(n.startswith(head + ".") for n in names)
    ]
