"""The Trainer behind `unmask train`: a task's fixed batches, its own evaluation (accuracy, or
exact match of generated answers), and the callbacks that write the step log, draw the progress
bar and stop cleanly on SIGINT/SIGTERM.

`SelectiveRun` is an `UnmaskTrainer` (a SelectiveOptimizer, delta-only checkpoints); `LoraRun`
is a plain `Trainer` on a peft LoRA model (`unmask train --method lora`, for comparison).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback

from unmask.app.checkpoints import RUN_FILE
from unmask.app.tasks import Task
from unmask.app.tasks.batches import encode
from unmask.app.tasks.evaluation import evaluate
from unmask.integrations.trainer import UnmaskTrainer, unwrap_optimizer
from unmask.store.files import atomic_write_text

BEST = "best_delta"  # the delta (or adapter) of the best validation score, with --eval-steps


class FixedBatches(Sampler):
    """The example indices of every micro-batch of the run, in order (`batch_order`).

    The whole run is one pass over it, so the Trainer's epoch is the run, the order does not
    depend on the Trainer's sampler, and a resumed run skips exactly the batches it has done.
    """

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def process_share(batch: list[int], rank: int, world: int) -> list[int]:
    """Process `rank`'s examples of `batch` under `world` processes: every `world`-th one from
    position `rank`, so the shares differ in size by at most one and together are the batch.
    DDP averages the processes' losses: a classifier's is its share's mean, so the average is
    the batch's mean when the shares are of equal size; a causal LM's is averaged over the
    answer tokens of all processes (`average_tokens_across_devices`), exact for any split."""
    return batch[rank::world]


def check_batches_split(batches: list[list[int]], world: int, batch_size: int) -> None:
    """ValueError when a batch has fewer examples than there are processes (one would get
    none); only the last batch of an epoch can be smaller than `batch_size`."""
    small = min((len(b) for b in batches), default=world)
    if small < world:
        raise ValueError(
            f"under {world} processes every batch is split among them, but the run has a batch "
            f"of only {small} example(s) (--batch-size {batch_size}, or the last batch of an "
            f"epoch), which leaves a process without any: use a --batch-size that is a "
            f"multiple of {world}, and a training set whose size is a multiple of it "
            "(--train-size), or fewer processes"
        )


class _TaskRun:
    """What `SelectiveRun` and `LoraRun` add to their Trainer: the task's batches and metric.

    Keyword arguments: task, tokenizer, batches (`FixedBatches`' lists), max_length,
    max_new_tokens (generation), eval_batch_size, run_settings (written with every checkpoint
    as unmask_run.json), result_metadata (recorded with every delta or adapter saved),
    best_folder and best (the best validation result so far, when resumed:
    {"best_step", "validation_<metric>"}).
    """

    def __init__(
        self,
        *args: Any,
        task: Task,
        tokenizer: Any,
        batches: list[list[int]],
        max_length: int,
        max_new_tokens: int,
        eval_batch_size: int,
        run_settings: dict[str, Any],
        result_metadata: dict[str, Any],
        best_folder: Path,
        best: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.task, self.tokenizer, self.batches = task, tokenizer, batches
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.eval_batch_size = eval_batch_size
        self.run_settings = run_settings
        self.result_metadata = result_metadata
        self.best_folder, self.best = best_folder, best
        # The Trainer reseeds torch when it is built; a new run continues from the generator's
        # state before that instead (dropout masks follow from the run's seed and what was
        # drawn while loading the model, as they did before unmask train ran on the Trainer).
        self._rng_state = torch.get_rng_state()
        super().__init__(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any):
        if resume_from_checkpoint is None:
            torch.set_rng_state(self._rng_state)  # a resumed run gets the checkpoint's state
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        """The run's fixed batches; under several processes each takes its share of every
        batch (`process_share`), so a step's batch is the same whatever the process count."""
        world, rank = self.args.world_size, self.args.process_index
        batches = (
            self.batches if world == 1 else [process_share(b, rank, world) for b in self.batches]
        )
        # A generator of its own: iterating a DataLoader draws a seed for its workers, which
        # would otherwise come from the global generator and shift every dropout mask.
        loader = self.accelerator.prepare(
            DataLoader(
                self.task.train,
                batch_sampler=FixedBatches(batches),
                collate_fn=self._collate,
                generator=torch.Generator().manual_seed(self.args.seed),
            )
        )
        if world > 1:
            # The batches are this process's shares already: accelerate's shard wrapper
            # passes them through, as the Trainer makes it for its own rank-aware sampler.
            loader.batch_sampler.num_processes, loader.batch_sampler.process_index = 1, 0
        return loader

    def _collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return encode(self.tokenizer, self.task, examples, self.max_length)

    def score(self, examples: list[dict]) -> float:
        """The task's metric on `examples` for the model as it is now."""
        return evaluate(
            self.model,
            self.tokenizer,
            self.task,
            examples,
            self.eval_batch_size,
            self.max_length,
            self.max_new_tokens,
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The task's metric on the validation split, logged; keeps the best result so far."""
        value = self.score(self.task.validation)
        metrics = {f"{metric_key_prefix}_{self.task.metric}": value}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        key = f"validation_{self.task.metric}"
        if self.best is None or value > self.best.get(key, float("-inf")):
            self.best = {"best_step": self.state.global_step, key: value}
            if self.args.should_save:
                self.save_result(self.best_folder, self.best)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save and output_dir is not None:
            text = json.dumps(self.run_settings, indent=1)
            atomic_write_text(Path(output_dir) / RUN_FILE, text)


class SelectiveRun(_TaskRun, UnmaskTrainer):
    """`unmask train` with a selective method: the result is a sparse delta."""

    def save_result(self, folder: Path, metadata: dict[str, Any]) -> None:
        delta = unwrap_optimizer(self.optimizer).delta()
        delta.metadata.update(self.result_metadata, **metadata)
        delta.save_pretrained(folder)


class LoraRun(_TaskRun, Trainer):
    """`unmask train --method lora`: the result is a peft adapter folder."""

    def save_result(self, folder: Path, metadata: dict[str, Any]) -> None:
        self.model.save_pretrained(folder)
        text = json.dumps({**self.result_metadata, **metadata}, indent=1)
        atomic_write_text(Path(folder) / "unmask_result.json", text)


class StepLog(TrainerCallback):
    """Writes train_log.jsonl: a record per optimizer step ("step" counts from 0; loss,
    learning rate, gradient norm when clipping, and for selective methods the weights selected,
    those the schedule allows and the tensors on the sparse backward), and one per evaluation
    (``eval_<metric>``)."""

    def __init__(self, file, grows_mask: bool) -> None:
        self.file = file
        self.grows_mask = grows_mask

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if not logs:
            return
        step = state.global_step - 1
        record: dict[str, Any] = {"step": step}
        if "loss" in logs:
            record["loss"] = round(float(logs["loss"]), 5)
            record["learning_rate"] = logs.get("learning_rate")
            if "grad_norm" in logs and args.max_grad_norm:
                record["grad_norm"] = logs["grad_norm"]
            opt = unwrap_optimizer(optimizer)
            if opt is not None:
                record["num_selected"] = opt.num_selected
                # only a growing mask follows the schedule; the others hold their weights
                # from the first step
                record["scheduled"] = (
                    opt.schedule.cumulative(step, opt.budget, state.max_steps)
                    if self.grows_mask
                    else opt.num_selected
                )
                # tensors whose selected gradients the sparse backward computes next
                record["sparse_tensors"] = len(opt.sparse_names)
        else:
            evals = {k: v for k, v in logs.items() if k.startswith("eval_")}
            if not evals:
                return
            record.update(evals)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


class Progress(TrainerCallback):
    """A tqdm bar over the optimizer steps with the loss and the weights selected, drawn by
    process zero only."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.enabled and state.is_world_process_zero),
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            postfix = {"loss": f"{logs['loss']:.4f}"}
            if "unmask/num_selected" in logs:
                postfix["selected"] = logs["unmask/num_selected"]
            self.bar.set_postfix(postfix)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class StopOnSignal(TrainerCallback):
    """Turns SIGINT/SIGTERM into a checkpoint and a stop after the current optimizer step, so
    a step is never cut short. Use as a context manager around `trainer.train()`."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
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

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True
