"""The training run behind `unmask train`: the loop, its resumable checkpoints and its step log.

Read `run` top to bottom: load model and task, build the SelectiveOptimizer, train with a
progress bar, evaluate on a fixed split, write the delta, the step log and a run report.
SIGINT/SIGTERM end the run after the current step with a checkpoint that `--resume` continues
from. What a run accepts is `TrainConfig` (`unmask.app.train_config`).
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from unmask.app.models import load_model, new_head_patterns, resolve_model
from unmask.app.tasks import Task
from unmask.app.tasks.batches import batch_order, encode
from unmask.app.tasks.evaluation import evaluate
from unmask.app.train_config import (
    MAX_STEPS,
    TrainConfig,
    check_config,
    check_max_length,
    load_task_for,
)
from unmask.choose.methods import METHODS
from unmask.optimize.optimizer import SelectiveOptimizer
from unmask.store.delta import saved_bytes
from unmask.store.files import atomic_write, atomic_write_text


def run(config: TrainConfig) -> dict[str, Any]:
    """Train, evaluate and write `config.output`/{delta/, train_log.jsonl, report.json}."""
    check_config(config)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    task = load_task_for(config)
    if not task.train:
        raise ValueError(f"task {config.task!r} has no training examples")
    _check_labels(task)
    model, tokenizer = load_model(config.model, task)
    config = check_max_length(config, model)
    model.train()
    per_epoch = math.ceil(len(task.train) / config.batch_size)
    total = config.steps if config.steps is not None else max(1, round(config.epochs * per_epoch))
    if total > MAX_STEPS:
        raise ValueError(
            f"--epochs {config.epochs} makes {total:,} steps; at most {MAX_STEPS:,} are allowed: "
            "give fewer --epochs or --steps"
        )
    budget = config.budget if METHODS[config.method].takes_budget else None
    opt = SelectiveOptimizer(
        model,
        method=config.method,
        budget=budget,
        total_steps=total,
        lr=config.lr,
        weight_decay=config.weight_decay,
        dense=new_head_patterns(model) or None,
        score_eps=config.score_eps,
        score_exp=config.score_exp,
        adam_step=config.adam_step,
        schedule=config.schedule,
        seed=config.seed,
    )
    order = batch_order(len(task.train), config.batch_size, total, config.seed)
    if opt.method.needs_calibration:
        opt.calibrate(
            encode(tokenizer, task, [task.train[i] for i in idx], config.max_length)
            for idx in order[:8]
        )
    log_path = output / "train_log.jsonl"
    checkpoint = output / CHECKPOINT_FILE
    settings = _run_settings(config, total, opt)
    first = _resume(checkpoint, model, opt, log_path, settings) if config.resume else 0
    started = time.perf_counter()
    mode = "a" if first else "w"
    with (
        open(log_path, mode, encoding="utf-8") as log,
        _progress(total, config.progress, first) as bar,
        _StopOnSignal() as stop,
    ):
        for step in range(first, total):
            idx = order[step]
            batch = encode(tokenizer, task, [task.train[i] for i in idx], config.max_length)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            record = {
                "step": step,
                "loss": round(loss.item(), 5),
                "num_selected": opt.num_selected,
                # only a growing mask follows the schedule; the others hold their weights
                # from the first step
                "scheduled": opt.schedule.cumulative(step, opt.budget, total)
                if opt.method.grows_mask
                else opt.num_selected,
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}", selected=opt.num_selected)
            bar.update(1)
            done = step + 1
            if stop.signal is not None or (config.save_every and done % config.save_every == 0):
                _save_checkpoint(checkpoint, model, opt, done, settings)
            if stop.signal is not None and done < total:
                raise Interrupted(
                    f"stopped by {stop.signal} after step {done} of {total}; checkpoint "
                    f"written to {checkpoint}; continue with the same command plus --resume"
                )
    train_seconds = time.perf_counter() - started
    split = task.test if config.eval_split == "test" else task.validation
    metric = evaluate(
        model,
        tokenizer,
        task,
        split,
        config.batch_size * 4,
        config.max_length,
        config.max_new_tokens,
    )
    delta = opt.delta()
    delta.metadata.update(
        {
            "task": task.name,
            "label_names": task.label_names,
            "base_model": resolve_model(config.model),
        }
    )
    delta.save_pretrained(output / "delta")
    report = {
        "config": asdict(config),
        "task": {
            "name": task.name,
            "kind": task.kind,
            "train": len(task.train),
            "eval_split": config.eval_split,
            "eval": len(split),
        },
        task.metric: metric,
        "weights_changed": opt.num_changed,
        "weights_total": sum(p.numel() for p in model.parameters()),
        "delta_bytes": saved_bytes(output / "delta"),
        "steps": total,
        "train_seconds": round(train_seconds, 1),
        "optimizer_state_bytes": opt.state_bytes(),
    }
    atomic_write_text(output / "report.json", json.dumps(report, indent=1))
    return report


CHECKPOINT_FILE = "checkpoint.pt"


def _check_labels(task: Task) -> None:
    """A classifier needs examples of at least 2 labels to train on (1 would make a 1-output
    regression head that scores every prediction as correct)."""
    if task.kind != "classification":
        return
    seen = sorted({e["label"] for e in task.train})
    if len(seen) < 2:
        names = [task.label_names[i] if task.label_names else i for i in seen]
        raise ValueError(
            f"the training split of task {task.name!r} has examples of only {len(seen)} label "
            f"{names}; a classifier needs at least 2 distinct labels: use more training "
            "examples (--train-size) or data with several labels"
        )


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a resumable checkpoint."""


# What makes one training run: `--resume` refuses a checkpoint saved under other values.
RUN_SETTINGS = (
    "model", "task", "method", "budget", "seed", "lr", "weight_decay", "batch_size", "steps",
    "max_length", "train_size", "schedule", "adam_step", "score_eps", "score_exp",
)  # fmt: skip


def _run_settings(config: TrainConfig, total: int, opt: SelectiveOptimizer) -> dict[str, Any]:
    """The run's RUN_SETTINGS as JSON-able values, with paths resolved and steps counted.

    "budget_weights" is the resolved budget: "5%" and its count in weights are the same run.
    """
    settings = {name: getattr(config, name) for name in RUN_SETTINGS}
    settings["model"] = _resolved_path(resolve_model(config.model))
    settings["task"] = _resolved_path(config.task)
    settings["steps"] = total
    settings["budget_weights"] = opt.total_budget
    return settings


def _resolved_path(name: str) -> str:
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def _check_same_run(path: Path, saved: dict[str, Any], settings: dict[str, Any]) -> None:
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


def _save_checkpoint(
    path: Path, model, opt: SelectiveOptimizer, done: int, settings: dict[str, Any] | None = None
) -> None:
    """Optimizer state, dense parameters, RNG, step count and the run's settings; atomic.

    Sparse weights are restored by the optimizer state; dense ones (a new head) are stored.
    """
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if n in opt.dense_names}
    state = {
        "step": done,
        "optimizer": opt.state_dict(),
        "dense": dense,
        "torch_rng": torch.get_rng_state(),
    }
    if settings is not None:
        state["run"] = settings
    # torch.save reports a full disk as RuntimeError: atomic_write makes it an OSError.
    atomic_write(path, lambda tmp: torch.save(state, tmp), io_errors=(RuntimeError,))


def _resume(
    path: Path, model, opt: SelectiveOptimizer, log_path: Path, settings: dict[str, Any]
) -> int:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume")
    state = _read_checkpoint(path, model)
    if "run" in state:  # checkpoints written before the settings were recorded have none
        _check_same_run(path, state["run"], settings)
    opt.load_state_dict(state["optimizer"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["dense"].items():
            params[name].copy_(value)
    torch.set_rng_state(state["torch_rng"])
    done = int(state["step"])
    if log_path.is_file():
        records, torn = _read_log_lines(log_path)
        if torn:
            warnings.warn(
                f"{log_path}: dropped its last line, cut short by the interrupted run",
                RuntimeWarning,
                stacklevel=2,
            )
        # Also truncates the file to its last complete line: steps from `done` on are redone.
        kept = [line + "\n" for line, row in records if row["step"] < done]
        atomic_write_text(log_path, "".join(kept))
    return done


def _read_checkpoint(path: Path, model) -> dict[str, Any]:
    """The checkpoint's state, checked to be complete before anything is restored from it."""

    def damaged(why: str) -> ValueError:
        return ValueError(
            f"--resume: checkpoint {path} {why}: it is damaged or was not written by "
            "unmask train; delete it and run without --resume"
        )

    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several types for torn or foreign files
        raise damaged(f"cannot be read ({type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(state, dict):
        raise damaged("does not hold a dict of training state")
    missing = [k for k in ("step", "optimizer", "dense", "torch_rng") if k not in state]
    if missing:
        raise damaged(f"lacks {missing}")
    if type(state["step"]) is not int or state["step"] < 0:
        raise damaged(f"has step {state['step']!r}, not an integer >= 0")
    rng = state["torch_rng"]
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.dim() == 1):
        raise damaged("has a torch_rng that is not a 1-D uint8 tensor")
    if not isinstance(state["optimizer"], dict):
        raise damaged("has optimizer state that is not a dict")
    if "run" in state and not isinstance(state["run"], dict):
        raise damaged("has run settings that are not a dict")
    params = dict(model.named_parameters())
    dense = state["dense"]
    if not isinstance(dense, dict):
        raise damaged("has dense parameters that are not a dict")
    for name, value in dense.items():
        ok = (
            name in params
            and isinstance(value, torch.Tensor)
            and value.shape == params[name].shape
            and value.dtype == params[name].dtype
            and bool(torch.isfinite(value).all())
        )
        if not ok:
            raise damaged(f"has a dense parameter {str(name)[:100]!r} that does not fit this model")
    return state


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


class _StopOnSignal:
    """Turns SIGINT/SIGTERM into a flag checked after each step, so a step is never cut short."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not enabled,
    )
