"""The training run behind `unmask train`, on the Hugging Face Trainer.

Read `run` top to bottom: load model and task, build the SelectiveOptimizer (or a plain LoRA
adapter), train with `SelectiveRun` / `LoraRun` (`unmask.app.task_trainer`), evaluate on a
fixed split, write the delta, the step log and a run report. The Trainer places the model on
the device, runs bf16 autocast, the LR schedule, gradient accumulation, clipping, evaluation
and the loggers; SIGINT/SIGTERM end the run after the current step with a checkpoint that
`--resume` continues from (`unmask.app.checkpoints`). What a run accepts is `TrainConfig`
(`unmask.app.train_config`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from unmask.app.checkpoints import (
    CHECKPOINTS,
    RUN_SETTINGS,
    check_same_run,
    cut_log,
    last_checkpoint,
    read_checkpoint,
    read_train_log,
)
from unmask.app.models import add_lora, load_model, new_head_patterns, resolve_model
from unmask.app.task_trainer import (
    BEST,
    LoraRun,
    Progress,
    SelectiveRun,
    StepLog,
    StopOnSignal,
    check_batches_split,
)
from unmask.app.tasks import Task
from unmask.app.tasks.batches import batch_order
from unmask.app.train_config import (
    LORA,
    MAX_STEPS,
    TrainConfig,
    check_config,
    check_max_length,
    load_task_for,
    resolve_defaults,
)
from unmask.choose.methods import METHODS
from unmask.integrations.peft import peft_candidates
from unmask.integrations.trainer import make_optimizer
from unmask.store.delta import saved_bytes
from unmask.store.files import atomic_write_text

__all__ = ["Interrupted", "read_train_log", "run"]


def run(config: TrainConfig) -> dict[str, Any]:
    """Train, evaluate and write `config.output`/{delta/ (adapter/ for LoRA), train_log.jsonl,
    report.json}; with `eval_steps`, also best_delta/ (the best validation score's).

    Under torchrun every process runs this; process zero alone writes, and the report the
    others return has ``delta_bytes`` None."""
    check_config(config)
    config = resolve_defaults(config)  # the report and the resume check see what ran
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
    lora = config.method == LORA
    if config.lora_r is not None:
        model = add_lora(model, task.kind, config.lora_r, config.seed)
    accumulation = config.gradient_accumulation_steps
    per_epoch = math.ceil(len(task.train) / (config.batch_size * accumulation))
    total = config.steps if config.steps is not None else max(1, round(config.epochs * per_epoch))
    if total > MAX_STEPS:
        raise ValueError(
            f"--epochs {config.epochs} makes {total:,} steps; at most {MAX_STEPS:,} are allowed: "
            "give fewer --epochs or --steps"
        )
    args = training_arguments(config, total, output / CHECKPOINTS, task.kind)
    model.to(args.device)  # before the optimizer, whose slots live on the parameters' device
    # Under torchrun every process runs this function; process zero alone writes files (the
    # Trainer gates its own checkpoints the same way, with args.should_save).
    writes = args.process_index == 0
    batches = batch_order(len(task.train), config.batch_size, total * accumulation, config.seed)
    if args.world_size > 1:
        check_batches_split(batches, args.world_size, config.batch_size)
    opt = None if lora else _selective_optimizer(config, model, args, total)
    settings = _run_settings(config, total, opt.total_budget if opt else None)

    log_path = output / "train_log.jsonl"
    best_folder = output / BEST
    checkpoint = _prepare_resume(output, log_path, settings, writes) if config.resume else None
    if checkpoint is None and writes:  # a new run: nothing of an earlier one may mix in
        for stale in (output / CHECKPOINTS, best_folder):
            shutil.rmtree(stale, ignore_errors=True)
    metadata = _result_metadata(config, task)
    started = time.perf_counter()
    with (
        open(
            log_path if writes else os.devnull, "a" if checkpoint else "w", encoding="utf-8"
        ) as log,
        StopOnSignal() as stop,
    ):
        cls = LoraRun if lora else SelectiveRun
        extra = {} if lora else {"optimizers": (opt, None)}
        trainer = cls(
            model=model,
            args=args,
            train_dataset=task.train,
            eval_dataset=task.validation if config.eval_steps else None,
            callbacks=[StepLog(log, bool(opt and opt.method.grows_mask)), stop],
            task=task,
            tokenizer=tokenizer,
            batches=batches,
            max_length=config.max_length,
            max_new_tokens=config.max_new_tokens,
            eval_batch_size=config.batch_size * 4,
            run_settings=settings,
            result_metadata=metadata,
            best_folder=best_folder,
            best=_best_record(best_folder) if checkpoint else None,
            **extra,
        )
        _replace_progress(trainer, config.progress)
        _train(trainer, checkpoint, output / CHECKPOINTS)
    train_seconds = time.perf_counter() - started
    done = trainer.state.global_step
    if stop.signal is not None and done < total:
        raise Interrupted(
            f"stopped by {stop.signal} after step {done} of {total}; checkpoint written to "
            f"{last_checkpoint(output) if writes else output / CHECKPOINTS}; continue with "
            "the same command plus --resume"
        )
    split = task.test if config.eval_split == "test" else task.validation
    metric = trainer.score(split)
    result = output / ("adapter" if lora else "delta")
    if writes:
        trainer.save_result(result, {})
    trainable = [p for p in model.parameters() if p.requires_grad]
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
        "weights_changed": opt.num_changed if opt else sum(p.numel() for p in trainable),
        "weights_total": sum(p.numel() for p in model.parameters()),
        "delta_bytes": _result_bytes(result, bool(opt)) if writes else None,
        "steps": total,
        "train_seconds": round(train_seconds, 1),
        "optimizer_state_bytes": opt.state_bytes() if opt else None,
        "device": str(args.device),
        "processes": args.world_size,
    }
    if config.eval_steps:
        report["best"] = trainer.best
    if writes:
        atomic_write_text(output / "report.json", json.dumps(report, indent=1))
    return report


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a resumable checkpoint."""


def training_arguments(config: TrainConfig, total: int, folder: Path, kind: str):
    """The `TrainingArguments` of a run of a `kind` task: `total` optimizer steps, checkpoints
    in `folder`."""
    from transformers import TrainingArguments

    report_to = _report_to(config.report_to)
    return TrainingArguments(
        output_dir=str(folder),
        max_steps=total,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size * 4,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio if config.warmup_ratio else 0,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        seed=config.seed,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps" if config.save_every else "no",
        save_steps=config.save_every or 500,
        save_total_limit=1,
        eval_strategy="steps" if config.eval_steps else "no",
        eval_steps=config.eval_steps,
        report_to=report_to,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        # Under several processes the Trainer scales each one's loss by their number, as if the
        # model divided its summed loss by the tokens of all of them (`num_items_in_batch`):
        # causal LMs do, classification heads take their own batch's mean and would get twice
        # the gradient under 2 processes. Alone, a process is unaffected either way.
        average_tokens_across_devices=kind == "generation",
        **_device_options(config.device),
    )


def _device_options(device: str) -> dict[str, Any]:
    """`TrainingArguments` options for `--device`; refuses an accelerator that is not here."""
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if device == "cuda" and not cuda:
        raise ValueError(
            "--device cuda: no CUDA device is available here; use --device cpu or auto"
        )
    if device == "mps" and not mps:
        raise ValueError("--device mps: no Apple MPS device is available here; use --device cpu")
    if device == "cpu" or (device == "auto" and not (cuda or mps)):
        return {"use_cpu": True}
    return {}


def _report_to(name: str) -> str | list[str]:
    if name == "none":
        return "none"
    try:
        __import__(name)
    except ImportError:
        raise ValueError(
            f"--report-to {name} needs the {name} package: pip install {name}"
        ) from None
    return [name]


def _selective_optimizer(config: TrainConfig, model, args, total: int):
    """The SelectiveOptimizer of the run, its options from `config` and `args` (lr, decay)."""
    budget = config.budget if METHODS[config.method].takes_budget else None
    dense = list(config.dense or [])
    if config.lora_r is not None:
        dense += peft_candidates(model).get("dense", [])
    else:
        dense += new_head_patterns(model)
    return make_optimizer(
        model,
        args,
        total_steps=total,
        method=config.method,
        budget=budget,
        include=config.include,
        exclude=config.exclude,
        dense=dense or None,
        dense_in_budget=config.dense_in_budget,
        score_eps=config.score_eps,
        score_exp=config.score_exp,
        adam_step=config.adam_step,
        schedule=config.schedule,
        seed=config.seed,
        low_memory=config.low_memory,
        sparse_backward=config.sparse_backward,
        unmask_every=config.unmask_every,
    )


def _result_bytes(folder: Path, is_delta: bool) -> int:
    """The bytes on disk of the delta (its files) or of the adapter folder's files."""
    if is_delta:
        return saved_bytes(folder)
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _replace_progress(trainer, enabled: bool) -> None:
    """The Trainer's own progress and printer callbacks print every log line; use ours."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Progress(enabled))


def _train(trainer, checkpoint: Path | None, folder: Path) -> None:
    """`trainer.train()`, a full disk while checkpointing reported as an OSError that says so;
    a wandb run is finished after it, whatever the outcome."""
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except (OSError, RuntimeError) as err:
        full = getattr(err, "errno", None) == errno.ENOSPC or "write" in str(err).lower()
        if not full:
            raise
        raise OSError(
            f"could not write a checkpoint under {folder}: the disk may be full ({err}); free "
            "some space, then run the same command with --resume"
        ) from err
    finally:
        # The Trainer's WandbCallback starts a run and leaves it open. Left to the interpreter's
        # exit, the wandb service can stop before the run's closing handshake (seen here with
        # `python -m unmask.app.cli`: the run never marked finished), and a second `run` in the
        # same process would log into the first one's run.
        if "wandb" in trainer.args.report_to:
            import wandb

            wandb.finish()


def _prepare_resume(output: Path, log_path: Path, settings: dict[str, Any], writes: bool) -> Path:
    """The checkpoint to resume from, checked whole and against this run's settings; the step
    log is cut back to it when this process `writes`."""
    checkpoint = last_checkpoint(output)
    saved, done = read_checkpoint(checkpoint)
    check_same_run(checkpoint, saved, settings)
    if writes:
        cut_log(log_path, done)
    return checkpoint


def _best_record(folder: Path) -> dict[str, Any] | None:
    """{"best_step", "validation_<metric>"} of the best result saved before the run was
    interrupted, or None."""
    for name, key in (("delta_config.json", "metadata"), ("unmask_result.json", None)):
        path = folder / name
        if path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            record = record.get(key, {}) if key else record
            return {k: v for k, v in record.items() if k.startswith(("best_", "validation_"))}
    return None


def _result_metadata(config: TrainConfig, task: Task) -> dict[str, Any]:
    """What every delta of the run records: the task, its labels and the base model (an
    absolute path, or a hub id), and for ID3+LoRA the adapter that `unmask eval` rebuilds."""
    metadata: dict[str, Any] = {
        "task": task.name,
        "label_names": task.label_names,
        "base_model": _resolved_path(resolve_model(config.model)),
    }
    if config.lora_r is not None:
        metadata["lora"] = {"r": config.lora_r, "seed": config.seed, "task_kind": task.kind}
    return metadata


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


def _run_settings(config: TrainConfig, total: int, budget_weights: int | None) -> dict[str, Any]:
    """The run's RUN_SETTINGS as JSON-able values, with paths resolved and steps counted.

    "budget_weights" is the resolved budget: "5%" and its count in weights are the same run.
    """
    settings = {name: getattr(config, name) for name in RUN_SETTINGS}
    settings["model"] = _resolved_path(resolve_model(config.model))
    settings["task"] = _resolved_path(config.task)
    settings["steps"] = total
    settings["budget_weights"] = budget_weights
    return settings


def _resolved_path(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name
