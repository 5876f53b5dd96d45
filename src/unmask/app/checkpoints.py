"""`unmask train`'s checkpoints and step log: which run wrote a checkpoint, whether it is whole,
and the step log cut back to it on `--resume`.

A checkpoint is the Trainer's folder ``OUTPUT/checkpoints/checkpoint-<step>/``: the delta
(``unmask_delta/``, or ``adapter_model.safetensors`` for plain LoRA), ``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth`` (``rng_state_<rank>.pth`` per process under torchrun),
``trainer_state.json``, plus ``unmask_run.json``: the settings of the run (`RUN_SETTINGS`),
which `--resume` must match.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from unmask.store.files import atomic_write_text

CHECKPOINTS = "checkpoints"
RUN_FILE = "unmask_run.json"

# What makes one training run: `--resume` refuses a checkpoint saved under other values.
RUN_SETTINGS = (
    "model", "task", "method", "budget", "seed", "lr", "weight_decay", "batch_size", "steps",
    "max_length", "train_size", "schedule", "adam_step", "score_eps", "score_exp",
    "lr_scheduler_type", "warmup_ratio", "gradient_accumulation_steps", "max_grad_norm", "bf16",
    "include", "exclude", "dense", "dense_in_budget", "lora_r", "low_memory",
    "sparse_backward", "unmask_every",
)  # fmt: skip


def last_checkpoint(output: Path) -> Path:
    """The checkpoint of the highest step under `output`; FileNotFoundError when there is none.

    A folder without trainer_state.json (which the Trainer writes last) is a save cut short by
    a kill or a full disk: the one before it is taken, while there is one.
    """
    folder = output / CHECKPOINTS
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            step = path.name.removeprefix("checkpoint-")
            if path.is_dir() and step.isdigit():
                found.append((int(step), path))
    if not found:
        raise FileNotFoundError(
            f"--resume: no checkpoint at {folder} (checkpoint-<step> folders); run without --resume"
        )
    complete = [(step, path) for step, path in found if (path / "trainer_state.json").is_file()]
    return max(complete or found)[1]


def check_same_run(path: Path, saved: dict[str, Any], settings: dict[str, Any]) -> None:
    """ValueError naming every setting in which `saved` (the checkpoint's run) differs."""
    differ = []
    for name in RUN_SETTINGS:
        if name not in saved:
            continue
        if name == "budget" and "budget_weights" in saved:
            if saved["budget_weights"] == settings["budget_weights"]:
                continue
            there = f"{saved['budget']!r} ({saved['budget_weights']:,} weights)"
            here = f"{settings['budget']!r} ({settings['budget_weights']:,} weights)"
        elif saved[name] == settings[name] and type(saved[name]) is type(settings[name]):
            continue
        else:
            there, here = repr(saved[name]), repr(settings[name])
        differ.append(f"--{name.replace('_', '-')} {there} in the checkpoint's run, {here} now")
    if differ:
        raise ValueError(
            f"--resume: checkpoint {path} was saved by a run with other settings: "
            + "; ".join(differ)
            + ". Resume with the settings of that run, or train anew into another --output"
        )


def read_checkpoint(path: Path) -> tuple[dict[str, Any], int]:
    """(the run's settings, the step) of checkpoint folder `path`, checked to be whole before
    the Trainer restores anything from it; ValueError saying what is missing or damaged."""

    def damaged(why: str) -> ValueError:
        return ValueError(
            f"--resume: checkpoint {path} {why}: it is damaged or was not written by "
            "unmask train; delete it and run without --resume"
        )

    # One RNG state per process: rng_state.pth, or rng_state_<rank>.pth under several
    rng_states = sorted(p.name for p in path.glob("rng_state*.pth") if p.is_file())
    missing = [
        name
        for name in (RUN_FILE, "trainer_state.json", "optimizer.pt")
        if not (path / name).is_file()
    ] + ([] if rng_states else ["rng_state.pth"])
    if not ((path / "unmask_delta").is_dir() or (path / "adapter_model.safetensors").is_file()):
        missing.append("unmask_delta/")
    if missing:
        raise damaged(f"lacks {missing}")
    values = {}
    for name in (RUN_FILE, "trainer_state.json"):
        try:
            values[name] = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise damaged(f"has a {name} that cannot be read ({err})") from None
        if not isinstance(values[name], dict):
            raise damaged(f"has a {name} that is not a JSON object")
    step = values["trainer_state.json"].get("global_step")
    if type(step) is not int or step < 0:
        raise damaged(f"has global_step {step!r}, not an integer >= 0")
    from transformers.trainer_pt_utils import safe_globals  # the numpy types of the RNG state

    for name in ("optimizer.pt", *rng_states):
        try:
            with safe_globals():
                state = torch.load(path / name, weights_only=True, map_location="cpu")
        except Exception as err:  # torch raises several types for torn or foreign files
            raise damaged(
                f"has a {name} that cannot be read ({type(err).__name__}: {str(err)[:200]})"
            ) from err
        if not isinstance(state, dict):
            raise damaged(f"has a {name} that does not hold a dict")
    return values[RUN_FILE], step


def cut_log(log_path: Path, done: int) -> None:
    """Keep the step log's records of the steps before `done` (0-based), which the resumed run
    does not redo; a torn last line (a write cut short) is dropped with a warning."""
    if not log_path.is_file():
        return
    records, torn = _read_log_lines(log_path)
    if torn:
        warnings.warn(
            f"{log_path}: dropped its last line, cut short by the interrupted run",
            RuntimeWarning,
            stacklevel=3,
        )
    kept = [line + "\n" for line, row in records if row["step"] < done]
    atomic_write_text(log_path, "".join(kept))


def read_train_log(path: Path) -> tuple[list[dict], bool]:
    """The records of a train_log.jsonl, and whether a torn last line was dropped.

    A last line without its newline that is not valid JSON is a write cut short by a crash or
    kill; it is dropped. Any other line that is not a JSON object with an integer "step"
    raises ValueError naming the file and line.
    """
    records, torn = _read_log_lines(path)
    return [row for _, row in records], torn


def _read_log_lines(path: Path) -> tuple[list[tuple[str, dict]], bool]:
    """(line, record) pairs of a train_log.jsonl and whether a torn last line was dropped."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    last = lines.pop()  # "" when the file ends with a newline
    torn = False
    if last.strip():
        try:
            json.loads(last)
        except (ValueError, RecursionError):
            torn = True
        else:
            lines.append(last)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise ValueError(
                f"{path} line {number} is not valid JSON ({err}); the step log is damaged: "
                "fix or delete that line, or delete the file to start a new log"
            ) from None
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise ValueError(
                f"{path} line {number} is not a step record (a JSON object with an integer "
                '"step"); fix or delete that line, or delete the file to start a new log'
            )
        records.append((line, row))
    return records, torn
