"""What `unmask train` accepts (TrainConfig) and the one place its values are checked."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from unmask.app.tasks import Task, load_task
from unmask.choose.methods import METHODS

# `--method lora`: plain peft LoRA (AdamW on the adapter weights), for comparison.
LORA = "lora"
DEVICES = ("auto", "cpu", "cuda", "mps")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
REPORT_TO = ("none", "tensorboard", "wandb")


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
    # The Trainer's options (TrainingArguments' names). The defaults are what the default job
    # was validated with: a constant learning rate, no warm-up, no clipping, fp32.
    device: str = "auto"
    bf16: bool = False
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0
    eval_steps: int | None = None
    report_to: str = "none"
    # Which weights compete (SelectiveOptimizer's options); regex patterns on parameter names.
    low_memory: bool = False
    # Only the selected weights' gradients in backward, once the mask is final
    # (docs/sparse_backward.md); None: the method's default (`resolve_defaults`).
    # unmask_every: a growing mask unmasks every k-th step.
    sparse_backward: bool | None = None
    unmask_every: int = 1
    include: list[str] | None = None
    exclude: list[str] | None = None
    dense: list[str] | None = None
    dense_in_budget: bool = True
    # LoRA rank: with a selective method the candidates are the LoRA weights (ID3+LoRA);
    # with method "lora", plain LoRA. None: no adapter.
    lora_r: int | None = None


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
    _check_choices(config)
    if config.gradient_accumulation_steps < 1:
        raise ValueError(
            "--gradient-accumulation-steps must be a positive integer (batches per optimizer "
            f"step), got {config.gradient_accumulation_steps}"
        )
    if not (math.isfinite(config.warmup_ratio) and 0 <= config.warmup_ratio < 1):
        raise ValueError(
            f"--warmup-ratio must be a number from 0 to below 1 (a share of the steps), got "
            f"{config.warmup_ratio!r}"
        )
    if not (math.isfinite(config.max_grad_norm) and config.max_grad_norm >= 0):
        raise ValueError(
            f"--max-grad-norm must be a finite number >= 0 (0: no clipping), got "
            f"{config.max_grad_norm!r}"
        )
    for flag, value in (
        ("--eval-steps", config.eval_steps),
        ("--lora-r", config.lora_r),
        ("--unmask-every", config.unmask_every),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if config.method == LORA and config.lora_r is None:
        raise ValueError("--method lora needs --lora-r R (the adapter's rank), e.g. --lora-r 8")
    for name in ("include", "exclude", "dense"):
        for pattern in getattr(config, name) or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"--{name} {pattern!r} is not a valid regular expression ({err}); patterns "
                    "are Python regexes searched in parameter names, e.g. 'classifier' or "
                    r"'layer\.1\.'"
                ) from None
    if config.save_every < 0:
        raise ValueError(
            f"--save-every must be an integer >= 0 (steps between checkpoints; 0: only on "
            f"SIGINT/SIGTERM), got {config.save_every}"
        )


CHOICES: dict[str, tuple[str, ...]] = {
    "method": (*METHODS, LORA),
    "device": DEVICES,
    "lr_scheduler_type": LR_SCHEDULERS,
    "report_to": REPORT_TO,
    "eval_split": ("test", "validation"),
    "adam_step": ("per-weight", "global"),
    "schedule": ("uniform", "linear-decay"),
}


def _check_choices(config: TrainConfig) -> None:
    """Options with a fixed set of values (a config file can hold any string)."""
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(
                f"option {name} (--{name.replace('_', '-')}) must be one of "
                f"{', '.join(allowed)}, got {value!r}"
            )


def unused_options(method: str, given: set[str]) -> list[str]:
    """The options among `given` (set explicitly, by a flag or a config file) that `method`
    does not use, read from its capability fields; each with the reason."""
    if method == LORA:
        unused = {
            "budget": "plain LoRA trains every adapter weight",
            "schedule": "plain LoRA has no mask",
            "score_eps": "plain LoRA ranks no weights",
            "score_exp": "plain LoRA ranks no weights",
            "adam_step": "plain LoRA steps torch's AdamW",
            "low_memory": "plain LoRA has no mask",
            "sparse_backward": "plain LoRA has no mask",
            "unmask_every": "plain LoRA has no mask",
            "include": "plain LoRA has no candidates",
            "exclude": "plain LoRA has no candidates",
            "dense": "plain LoRA has no candidates",
            "dense_in_budget": "plain LoRA has no budget",
        }
        return [f"--{k.replace('_', '-')} ({why})" for k, why in unused.items() if k in given]
    cls = METHODS[method]
    fields_of_method = {f.name for f in dataclasses.fields(cls)}
    unused = {
        "budget": not cls.takes_budget,
        "schedule": not cls.grows_mask,
        "score_eps": "score_eps" not in fields_of_method,
        "score_exp": "score_exp" not in fields_of_method,
        "low_memory": not cls.supports_low_memory,
        "sparse_backward": cls.reselects or cls.trains_dense,
        "unmask_every": not cls.grows_mask,
    }
    why = {
        "budget": "it trains a fixed set of weights",
        "schedule": "its mask does not grow step by step",
        "score_eps": "it has no D3 score",
        "score_exp": "it has no D3 score",
        "low_memory": "it needs every weight's gradient at once",
        "sparse_backward": "it needs every weight's gradient every step",
        "unmask_every": "its mask does not grow step by step",
    }
    return [
        f"--{k.replace('_', '-')} ({why[k]})" for k, skip in unused.items() if skip and k in given
    ]


def resolve_defaults(config: TrainConfig) -> TrainConfig:
    """`config` with the options left to the method (None) decided.

    `sparse_backward` is on for a method whose mask is chosen before training
    (`Method.chooses_once`: random, pafi, bitfit, fish), where the benchmark measured the
    sparse step faster than the dense one in every cell; off for growing masks (measured once
    slower), the other methods and LoRA (docs/sparse_backward.md, "Defaults"). The library's
    own default stays off; the CLI owns its training loop, which clips through the optimizer.
    """
    if config.sparse_backward is not None:
        return config
    method = METHODS.get(config.method)
    return replace(config, sparse_backward=method is not None and method.chooses_once)


def check_given_options(method: str, given: set[str]) -> None:
    """Refuse options set explicitly that `method` would silently ignore."""
    unused = unused_options(method, given)
    if unused:
        raise ValueError(
            f"method {method!r} does not use {'; '.join(unused)}: remove them, or choose a "
            "method that uses them"
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
        if ok and kinds == (list, None) and value is not None:
            ok = all(type(item) is str for item in value)
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


_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list of strings",
}
_TYPE_WORDS[None] = "unset"
_ALLOWED_TYPES: dict[str, tuple] = {
    f.name: {
        "str": (str,),
        "float": (float,),
        "int": (int,),
        "bool": (bool,),
        "bool | None": (bool, None),
        "int | None": (int, None),
        "str | None": (str, int, float, None),  # budget: "0.1%", 50000 or 0.001
        "list[str] | None": (list, None),
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
