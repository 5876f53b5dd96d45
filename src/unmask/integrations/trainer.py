"""Selective fine-tuning inside a `transformers.Trainer`.

    from unmask.integrations.trainer import UnmaskTrainer

    trainer = UnmaskTrainer(
        model=model, args=TrainingArguments(output_dir="out", max_steps=1000, learning_rate=1e-4),
        train_dataset=train, unmask_config=dict(method="id3", budget="0.1%", dense=["classifier"]),
    )
    trainer.train()                     # out/checkpoint-*/unmask_delta and out/unmask_delta

`UnmaskTrainer` builds a `SelectiveOptimizer` instead of the Trainer's AdamW, with T set to the
Trainer's own number of optimizer steps, and adds an `UnmaskCallback`, which saves the sparse
delta next to every checkpoint and at the end of training, and adds the selection telemetry
(`unmask/num_selected`, `unmask/num_changed`, `unmask/alloc/<module type>`) to the logs. A plain
`Trainer` works too: pass ``optimizers=(make_optimizer(model, args, ...), None)`` and
``callbacks=[UnmaskCallback()]``.

`UnmaskTrainer.save_model()` and its checkpoints store the sparse delta (``unmask_delta/``)
instead of a full copy of the model; with it a checkpoint holds what the Trainer needs to
resume: `optimizer.state_dict()` (slots, wrapped optimizer state, step counter), the scheduler,
the RNG states and the trainer state. `train(resume_from_checkpoint=...)` rebuilds the weights
as base + delta (the model passed to the Trainer must be the base the run started from: the
delta checks it) and restores the rest, so a resumed run selects the same weights and reaches
the same values as an uninterrupted one. On the tiny BERT of the tests (23,586 weights,
budget 60) a checkpoint takes 33,880 bytes instead of 133,268 (model.safetensors alone is
98,656; the delta 3,646; the rest is the optimizer, scheduler, RNG and trainer state). Pass
``save_full_model=True`` for checkpoints that `from_pretrained` loads; with
``load_best_model_at_end`` full models are saved, since the Trainer reloads the best weights
from them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from unmask.choose.methods import make_method
from unmask.module_types import MODULE_TYPES, module_type
from unmask.optimize.optimizer import SelectiveOptimizer
from unmask.optimize.sharding import world_size
from unmask.store.delta import DeltaError, SparseDelta

logger = logging.getLogger(__name__)

DELTA_DIRNAME = "unmask_delta"

# TrainingArguments.optim values with an elementwise torch equivalent that SelectiveOptimizer can
# wrap. Fused/foreach variants compute the same update, and for Adam/AdamW unmask's per-slot Adam
# replaces torch's anyway (adam_step="per-weight"). Anything else (8-bit, Adafactor, GaLore, LOMO,
# ...) is refused instead of silently swapped for AdamW.
TRAINER_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw_torch": torch.optim.AdamW,
    "adamw_torch_fused": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}


def unwrap_optimizer(optimizer: Any) -> SelectiveOptimizer | None:
    """The SelectiveOptimizer inside `optimizer` (e.g. an AcceleratedOptimizer), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, SelectiveOptimizer) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, SelectiveOptimizer) else None


def telemetry(optimizer: SelectiveOptimizer) -> dict[str, int]:
    """Selection counters for the Trainer's loggers.

    unmask/num_selected  weights trained in the current step
    unmask/num_changed   weights that may differ from the pretrained model (dense ones included)
    unmask/budget        the budget B (dense weights included when they count against it)
    unmask/alloc/<type>  changed weights per module type (`unmask.module_types.module_type`:
                         embeddings, attention, mlp, norm, pooler, head, other); every type
                         is always present, so loggers get stable columns
    """
    logs = {
        "unmask/num_selected": optimizer.num_selected,
        "unmask/num_changed": optimizer.num_changed,
        "unmask/budget": optimizer.total_budget,
    }
    by_type = dict.fromkeys(MODULE_TYPES, 0)
    for name, count in optimizer.allocation().items():
        by_type[module_type(name)] += count
    logs.update({f"unmask/alloc/{kind}": count for kind, count in by_type.items()})
    return logs


def make_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    *,
    total_steps: int | None = None,
    optimizer: type[torch.optim.Optimizer] | None = None,
    **unmask_kwargs: Any,
) -> SelectiveOptimizer:
    """A SelectiveOptimizer configured from `TrainingArguments`.

    The wrapped optimizer is the torch equivalent of ``args.optim`` (AdamW by default; SGD,
    Adagrad, RMSprop; others are refused) unless `optimizer` is given. ``lr`` and
    ``weight_decay`` come from `args`, and for Adam/AdamW also ``betas`` and ``eps``; any of them
    in `unmask_kwargs` wins. T is `total_steps`, else ``args.max_steps`` when it is set. All
    other keywords (method, budget, include, exclude, dense, schedule, adam_step, score_eps,
    score_exp, seed, ...) go to `SelectiveOptimizer`.

    Unlike the Trainer's AdamW, weight decay applies to every selected weight, biases and norms
    included; it pulls a weight towards its pretrained value (see SelectiveOptimizer). Refuses
    ``args.fp16`` (torch's GradScaler cannot see the model gradients unmask reads); bf16 works.
    """
    if getattr(args, "fp16", False):
        # fp16 training runs through torch's GradScaler, which unscales and checks for inf only
        # the gradients of optimizer.param_groups: here the slot buffer, not the model's
        # candidate weights, so selection, clipping and steps would see scaled gradients.
        raise ValueError(
            "unmask does not support fp16 mixed precision (GradScaler): use bf16=True, or fp32"
        )
    if optimizer is None:
        name = str(getattr(args.optim, "value", args.optim))
        if name not in TRAINER_OPTIMIZERS:
            raise ValueError(
                f"TrainingArguments.optim={name!r} has no elementwise torch equivalent unmask can "
                f"wrap; use one of {sorted(TRAINER_OPTIMIZERS)} or pass optimizer=<torch class> "
                "in unmask_config"
            )
        optimizer = TRAINER_OPTIMIZERS[name]
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if optimizer in (torch.optim.Adam, torch.optim.AdamW):
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    kwargs.update(unmask_kwargs)
    if total_steps is None and args.max_steps > 0:
        total_steps = args.max_steps
    return SelectiveOptimizer(model, total_steps=total_steps, optimizer=optimizer, **kwargs)


def calibrate_across_processes(
    opt: SelectiveOptimizer,
    batches: Any,
    num_batches: int | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> None:
    """`opt.calibrate` with each batch's gradients averaged over all processes of a distributed run.

    Under data parallelism each process calibrates on its own shard of every batch. `calibrate`
    runs the unwrapped model, whose backward DDP does not all-reduce, so without averaging every
    process would sum different Fisher values, choose a different mask, and the processes would
    silently train different weights. With the gradients averaged after each backward, every
    process sees the gradient of the whole global batch and chooses the same mask (the one a
    single process would choose on the global batches). Every process must calibrate on the same
    number of batches. Without an initialised process group of more than one process this is
    plain `opt.calibrate`.
    """
    world = world_size()
    if world == 1:
        opt.calibrate(batches, loss_fn=loss_fn, num_batches=num_batches)
        return
    averager = _GradientAverager([p for p in opt.model.parameters() if p.requires_grad], world)
    try:
        opt.calibrate(batches, loss_fn=loss_fn, num_batches=num_batches)
    finally:
        averager.remove()


class _GradientAverager:
    """While alive, averages the gradients of `params` over all processes after each backward.

    The first gradient hook of a backward queues one callback that runs when the whole backward
    has finished (the mechanism DDP itself uses), so the all-reduces run in the same fixed
    parameter order on every process, whatever order autograd produced the gradients in.
    """

    def __init__(self, params: list[nn.Parameter], world: int) -> None:
        self.params = params
        self.world = world
        self.queued = False
        self.handles = [p.register_post_accumulate_grad_hook(self._queue) for p in params]

    def _queue(self, _param: nn.Parameter) -> None:
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce)

    def _reduce(self) -> None:
        self.queued = False
        for p in self.params:
            # A parameter can miss a gradient on one process only (data-dependent graphs); every
            # process must still join every all-reduce, with zeros, which add no Fisher mass.
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            # SUM then divide: gloo has no ReduceOp.AVG.
            dist.all_reduce(p.grad)
            p.grad.div_(self.world)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class UnmaskCallback(TrainerCallback):
    """Saves the sparse delta with every checkpoint and logs selection telemetry.

    - on_train_begin: for a method that chooses its mask from calibration batches ("fish"),
      calibrates on the first `calibration_batches` training batches (skipped when a resumed
      checkpoint already holds the mask), averaging gradients over the processes of a
      distributed run (see `calibrate_across_processes`).
    - on_save: writes ``<checkpoint>/unmask_delta`` (delta.safetensors + delta_config.json), on
      the processes that write checkpoints (``args.should_save``: process zero by default).
    - on_train_end: writes ``<output_dir>/unmask_delta``, the delta of the last step, or with
      ``load_best_model_at_end`` a copy of the best checkpoint's delta (the weights the Trainer
      leaves in the model).
    - on_log: adds `telemetry` to every training-step log (the ones with a ``loss``).

    Needs the Trainer's optimizer to be a SelectiveOptimizer (possibly wrapped by accelerate).
    """

    def __init__(
        self,
        save_delta: bool = True,
        log_telemetry: bool = True,
        calibration_batches: int = 8,
        delta_dirname: str = DELTA_DIRNAME,
    ) -> None:
        self.save_delta = save_delta
        self.log_telemetry = log_telemetry
        self.calibration_batches = calibration_batches
        self.delta_dirname = delta_dirname

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kw):
        opt = _require(optimizer)
        if opt.sharded:
            # delta() is collective under FSDP, but checkpoints are saved by one process only.
            raise NotImplementedError(
                "UnmaskTrainer/UnmaskCallback with FSDP is not supported: train FSDP2 models "
                "with a plain loop (docs/distributed.md), where every rank calls opt.delta()"
            )
        if not opt.calibrated:
            if train_dataloader is None:
                raise RuntimeError(
                    f"method {opt.method.name!r} needs calibration batches and the Trainer passed "
                    "no train_dataloader; call opt.calibrate(batches) before trainer.train()"
                )
            calibrate_across_processes(opt, train_dataloader, num_batches=self.calibration_batches)

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        # args.should_save is the Trainer's own rule for who writes checkpoints: the world's
        # process zero, or each node's local process zero with save_on_each_node.
        if not (self.save_delta and args.should_save):
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(checkpoint):
            # Hyperparameter search writes checkpoints under run-<id>/, which a callback cannot
            # see; the final delta is still written by on_train_end.
            logger.warning("unmask: checkpoint folder %s not found; delta not saved", checkpoint)
            return
        if os.path.isfile(os.path.join(checkpoint, self.delta_dirname, "delta_config.json")):
            return  # UnmaskTrainer.save_model wrote this checkpoint's delta already
        _require(optimizer).delta().save_pretrained(os.path.join(checkpoint, self.delta_dirname))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if not (self.save_delta and args.should_save):
            return
        path = os.path.join(args.output_dir, self.delta_dirname)
        best = state.best_model_checkpoint
        best_delta = os.path.join(best, self.delta_dirname) if best else None
        if args.load_best_model_at_end and best_delta and os.path.isdir(best_delta):
            # The Trainer has reloaded the best checkpoint's weights, but the optimizer still
            # holds the last step's slots: the delta that matches the model is the best one's.
            SparseDelta.from_pretrained(best_delta).save_pretrained(path)
        else:
            _require(optimizer).delta().save_pretrained(path)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if not self.log_telemetry or logs is None or "loss" not in logs:
            return
        if "unmask/num_selected" in logs:  # UnmaskTrainer.log added it already
            return
        extra = telemetry(_require(optimizer))
        logs.update(extra)
        # Trainer.log appends a copy of `logs` to log_history before calling callbacks; update
        # that entry too so trainer_state.json holds the telemetry.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


class UnmaskTrainer(Trainer):
    """A `transformers.Trainer` that fine-tunes with a `SelectiveOptimizer`.

    Args:
        unmask_config: keyword arguments of `make_optimizer` / `SelectiveOptimizer`: method,
            budget, include, exclude, dense, dense_in_budget, schedule, adam_step, score_eps,
            score_exp, seed, optimizer, total_steps, and overrides of lr, weight_decay, betas, eps.
            T defaults to the Trainer's number of optimizer steps (``max_steps``, or the epochs
            converted to steps). One extra key, ``calibration_batches`` (default 8), sets how
            many training batches calibrate "fish".
        save_full_model: save_model() and checkpoints also write the whole model
            (model.safetensors) as the Trainer does; by default they hold the delta only
            (always the whole model with ``load_best_model_at_end``).
        *args, **kwargs: as for `transformers.Trainer`.

    An `UnmaskCallback` is added unless `callbacks` holds one already. Telemetry is added in
    `log`, so ``trainer.state.log_history`` and every report_to logger see it.
    """

    def __init__(
        self,
        *args: Any,
        unmask_config: dict[str, Any] | None = None,
        save_full_model: bool = False,
        **kwargs: Any,
    ):
        config = dict(unmask_config or {})
        self.save_full_model = save_full_model
        calibration_batches = config.pop("calibration_batches", 8)
        # Fail on a misspelt method now rather than after the model is loaded and wrapped.
        make_method(config.get("method", "id3"))
        self.unmask_config = config
        self._unmask_total_steps: int | None = None
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, UnmaskCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(UnmaskCallback(calibration_batches=calibration_batches))

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """As Trainer's, remembering `num_training_steps` as T for `create_optimizer`."""
        self._unmask_total_steps = num_training_steps
        super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the SelectiveOptimizer (once); T is the Trainer's number of optimizer steps."""
        if self.optimizer is None:
            config = dict(self.unmask_config)
            if config.get("total_steps") is None:
                # train() sets state.max_steps (epochs already converted to optimizer steps)
                # before it creates the optimizer; create_optimizer_and_scheduler passes it too.
                steps = self._unmask_total_steps or self.state.max_steps
                config["total_steps"] = steps if steps and steps > 0 else None
            if config.get("low_memory") and self.args.max_grad_norm > 0:
                if not hasattr(Trainer, "_clip_grad_norm"):
                    # Older Trainers clip model.parameters() inline, whose gradients the
                    # low-memory hooks have already consumed: clipping would silently not act.
                    raise ValueError(
                        "low_memory=True with max_grad_norm > 0 needs transformers>=5 (a Trainer "
                        "with _clip_grad_norm); upgrade, or set max_grad_norm=0"
                    )
            target = self.model if model is None else model
            self.optimizer = make_optimizer(target, self.args, **config)
        return self.optimizer

    def _saves_delta_only(self) -> bool:
        opt = unwrap_optimizer(self.optimizer)
        return not (self.save_full_model or self.args.load_best_model_at_end or opt is None)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the delta (``unmask_delta/``), the tokenizer and the training arguments to
        `output_dir`, not the weights: base + delta rebuilds them (see the module docstring).
        With the whole model saved too (`save_full_model`), the delta is written next to it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        opt = unwrap_optimizer(self.optimizer)
        if not self._saves_delta_only():
            super()._save(output_dir, state_dict)
            if opt is not None and self.args.should_save:
                opt.delta().save_pretrained(os.path.join(output_dir, DELTA_DIRNAME))
            return
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        opt.delta().save_pretrained(os.path.join(output_dir, DELTA_DIRNAME))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        """A checkpoint without weights is base + delta: apply its delta to the model (which
        must be the run's base model; the delta checks it). Others load as the Trainer does."""
        folder = os.path.join(resume_from_checkpoint, DELTA_DIRNAME)
        weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
        if any(os.path.isfile(os.path.join(resume_from_checkpoint, w)) for w in weights):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        if not os.path.isdir(folder):
            raise ValueError(
                f"can't find a valid checkpoint at {resume_from_checkpoint}: it holds neither "
                f"{DELTA_DIRNAME}/ nor model weights"
            )
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        try:
            SparseDelta.from_pretrained(folder).apply_(target)
        except DeltaError as err:
            raise ValueError(
                f"resuming from {resume_from_checkpoint}: its delta does not fit this model "
                f"({err}); resume with the base model the run started from"
            ) from err

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        # In low-memory mode the candidates' gradients are gone by the time the Trainer clips,
        # and with sparse backward the selected ones live in the optimizer's slots, not in
        # model.parameters(): the optimizer clips the gradients it will use.
        opt = unwrap_optimizer(self.optimizer)
        if opt is not None and (opt.low_memory or opt.sparse_backward):
            return opt.clip_grad_norm_(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the selection telemetry to training-step logs, then log as the Trainer does."""
        opt = unwrap_optimizer(self.optimizer)
        if opt is not None and "loss" in logs:
            logs.update(telemetry(opt))
        super().log(logs, *args, **kwargs)


def _require(optimizer: Any) -> SelectiveOptimizer:
    opt = unwrap_optimizer(optimizer)
    if opt is None:
        raise TypeError(
            "UnmaskCallback needs the Trainer's optimizer to be an unmask.SelectiveOptimizer, got "
            f"{type(optimizer).__name__}; use UnmaskTrainer, or Trainer(..., "
            "optimizers=(make_optimizer(model, args, ...), None))"
        )
    return opt
