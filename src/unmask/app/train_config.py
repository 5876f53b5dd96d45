"""What `unmask train` accepts (TrainConfig) and the one place its values are checked."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from unmask.app.tasks import Task, load_task


@dataclass
class TrainConfig:
    """Everything `unmask train` accepts; the defaults are the default job."""

    model: str = "minilm"
    task: str = "polarity"
    method: str = "random"
    budget: str | None = "0.1%"
    epochs: float = 1.0
    steps: int | None = None
    lr: float = 3e-2
    weight_decay: float = 0.0
    batch_size: int = 16
    max_length: int = 64
    seed: int = 0
    output: str = "runs/default"
    eval_split: str = "test"
    train_size: int | None = None
    eval_size: int | None = None
    score_eps: float = 1e-3
    score_exp: float = 1.0
    adam_step: str = "per-weight"
    schedule: str = "uniform"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    max_new_tokens: int = 8
    progress: bool = True
    save_every: int = 0
    resume: bool = False


MAX_STEPS = 2**31 - 1
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


def check_config(config: TrainConfig) -> None:
    """Refuse (ValueError naming the option and what it allows) any option of the wrong type or
    out of range, before anything is loaded; the one place where TrainConfig values are checked,
    whether they come from flags or a TOML/YAML config file."""
    _check_types(config)
    if config.steps is not None and not 1 <= config.steps <= MAX_STEPS:
        raise ValueError(
            f"--steps must be a positive integer of at most {MAX_STEPS:,}, got {config.steps}"
        )
    if not (math.isfinite(config.epochs) and config.epochs > 0):
        raise ValueError(f"--epochs must be a positive finite number, got {config.epochs}")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {config.batch_size}")
    for flag, value in (("--lr", config.lr), ("--weight-decay", config.weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} must be a finite number >= 0, got {value!r}")
    if config.max_length < 1:
        raise ValueError(
            f"--max-length must be a positive integer (tokens per example), got {config.max_length}"
        )
    if not SEED_RANGE[0] <= config.seed <= SEED_RANGE[1]:
        raise ValueError(f"--seed must be an integer from -2**63 to 2**64 - 1, got {config.seed}")
    if config.save_every < 0:
        raise ValueError(
            f"--save-every must be an integer >= 0 (steps between checkpoints; 0: only on "
            f"SIGINT/SIGTERM), got {config.save_every}"
        )


def _check_types(config: TrainConfig) -> None:
    """Each option must have its type: a config file's `lr: 1e-2` (a string in YAML),
    `steps = "5"` or `batch_size = 2.5` are refused, naming the option."""
    for f in fields(config):
        value = getattr(config, f.name)
        kinds = _ALLOWED_TYPES[f.name]
        ok = any(
            value is None
            if kind is None
            else type(value) is kind or (kind is float and type(value) is int)
            for kind in kinds
        )
        if not ok:
            allowed = " or ".join(_TYPE_WORDS[kind] for kind in kinds)
            flag = "--" + f.name.replace("_", "-")
            hint = (
                " (YAML reads 1e-2 as a string: write 1.0e-2)"
                if isinstance(value, str) and float in kinds
                else ""
            )
            raise ValueError(
                f"option {f.name} ({flag}) must be {allowed}, got {value!r} "
                f"({type(value).__name__}){hint}"
            )


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_TYPE_WORDS[None] = "unset"
_ALLOWED_TYPES: dict[str, tuple] = {
    f.name: {
        "str": (str,),
        "float": (float,),
        "int": (int,),
        "bool": (bool,),
        "int | None": (int, None),
        "str | None": (str, int, float, None),  # budget: "0.1%", 50000 or 0.001
    }[f.type]
    for f in fields(TrainConfig)
}


def check_max_length(config: TrainConfig, model) -> TrainConfig:
    """Refuse a --max-length above the model's positions; the default (64) is lowered to them."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(positions, int) or config.max_length <= positions:
        return config
    if config.max_length == TrainConfig.max_length:
        return replace(config, max_length=positions)
    raise ValueError(
        f"--max-length {config.max_length} is more than the model's {positions} positions "
        f"(max_position_embeddings); give --max-length {positions} or less"
    )


def load_task_for(options: Any) -> Task:
    """`load_task` with the task, seed, column and size options of a TrainConfig or CLI args."""
    return load_task(
        options.task,
        seed=options.seed,
        text_column=options.text_column,
        label_column=options.label_column,
        prompt_column=options.prompt_column,
        answer_column=options.answer_column,
        train_size=getattr(options, "train_size", None),
        eval_size=options.eval_size,
    )
