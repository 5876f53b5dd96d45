"""unmask inside transformers.Trainer and accelerate: schedule, checkpoints, telemetry, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_batches, snapshot, tiny_bert
from torch import nn
from transformers import Trainer, TrainingArguments

import unmask
from unmask.integrations.trainer import (
    DELTA_DIRNAME,
    UnmaskCallback,
    UnmaskTrainer,
    make_optimizer,
    unwrap_optimizer,
)
from unmask.module_types import MODULE_TYPES

# transformers' Trainer and TrainingArguments need accelerate (a pinned test dependency).
accelerate = pytest.importorskip("accelerate", reason="Trainer needs accelerate")

STEPS, SAVE, BATCH = 6, 3, 4
# Tests that place the model on a device run on each one present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences with binary labels, held in memory."""

    def __init__(self, size: int = STEPS * BATCH, length: int = 12, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (size, length), generator=g)
        self.labels = torch.randint(0, 2, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def model_without_dropout(seed: int = 0) -> nn.Module:
    # Trainer switches the model to train mode; with dropout at 0 a step is a pure function of
    # the weights and the batch, so runs can be compared bit for bit.
    model = tiny_bert(seed)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def training_args(out: Path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(out),
        max_steps=STEPS,
        save_steps=SAVE,
        per_device_train_batch_size=BATCH,
        report_to=[],
        use_cpu=True,
        seed=0,
        logging_steps=1,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def step_logs(trainer: Trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_id3_follows_schedule_saves_deltas_and_logs(tmp_path, device):
    model = model_without_dropout()
    pretrained = snapshot(model)
    budget = 60
    trainer = UnmaskTrainer(
        model=model,
        args=training_args(tmp_path, use_cpu=device == "cpu"),
        train_dataset=TokenDataset(),
        unmask_config=dict(method="id3", budget=budget),
    )
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, unmask.SelectiveOptimizer)
    assert opt.total_steps == STEPS and opt.steps_done == STEPS

    # One telemetry record per step; |Λ| equals the uniform schedule after every step.
    logs = step_logs(trainer)
    assert [e["step"] for e in logs] == list(range(1, STEPS + 1))
    schedule = unmask.UniformSchedule()
    for entry in logs:
        assert entry["unmask/num_selected"] == schedule.cumulative(entry["step"] - 1, budget, STEPS)
        assert entry["unmask/num_changed"] == entry["unmask/num_selected"]
        assert entry["unmask/budget"] == budget
        alloc = [entry[f"unmask/alloc/{t}"] for t in MODULE_TYPES]
        assert sum(alloc) == entry["unmask/num_changed"]

    # Deltas in every checkpoint and at the end; each reproduces the weights of its step.
    for step in (SAVE, STEPS):
        folder = tmp_path / f"checkpoint-{step}" / DELTA_DIRNAME
        delta = unmask.SparseDelta.from_pretrained(folder)
        assert delta.num_weights == schedule.cumulative(step - 1, budget, STEPS)
        assert delta.metadata["method"] == "id3" and delta.metadata["steps_done"] == step
    final = unmask.SparseDelta.from_pretrained(tmp_path / DELTA_DIRNAME)
    assert final.num_weights == budget
    assert next(model.parameters()).device.type == device
    rebuilt = final.apply_(model_without_dropout())
    for name, p in rebuilt.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name].cpu()), name

    # Frozen means frozen: only the selected weights moved.
    changed = sum(int((p.cpu() != pretrained[n].cpu()).sum()) for n, p in model.named_parameters())
    assert 0 < changed <= budget

    # The Trainer's linear scheduler drives the wrapped optimizer's learning rate down to 0.
    assert [e["learning_rate"] for e in logs][0] > logs[-1]["learning_rate"]
    assert opt.param_groups[0]["lr"] == trainer.lr_scheduler.get_last_lr()[0] == 0.0


def test_trainer_epochs_give_total_steps(tmp_path):
    # With epochs instead of max_steps, T is the Trainer's computed number of optimizer steps.
    trainer = UnmaskTrainer(
        model=model_without_dropout(),
        args=training_args(
            tmp_path,
            max_steps=-1,
            num_train_epochs=2,
            gradient_accumulation_steps=2,
            save_strategy="no",
        ),
        train_dataset=TokenDataset(size=16),
        unmask_config=dict(method="id3", budget=20),
    )
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    # 16 samples / batch 4 = 4 batches per epoch, 2 per optimizer step: 2 steps x 2 epochs.
    assert opt.total_steps == trainer.state.max_steps == 4
    assert opt.steps_done == 4 and opt.num_selected == 20


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    config = dict(method="id3", budget=60, score_exp=1.0)
    full = UnmaskTrainer(
        model=model_without_dropout(),
        args=training_args(tmp_path / "full"),
        train_dataset=TokenDataset(),
        unmask_config=config,
    )
    full.train()

    # Trainer reloads optimizer.pt with torch.load(weights_only=True); the state must pass it.
    saved = torch.load(tmp_path / "full" / f"checkpoint-{SAVE}" / "optimizer.pt", weights_only=True)
    assert saved["unmask"]["steps_done"] == SAVE

    # The checkpoint holds the delta, not the model: resuming rebuilds base + delta, and the
    # delta refuses a model that is not the run's base.
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE}"
    assert (checkpoint / DELTA_DIRNAME).is_dir() and not (checkpoint / "model.safetensors").exists()
    other = UnmaskTrainer(
        model=model_without_dropout(seed=123),
        args=training_args(tmp_path / "other"),
        train_dataset=TokenDataset(),
        unmask_config=config,
    )
    with pytest.raises(ValueError, match="resume with the base model the run started from"):
        other.train(resume_from_checkpoint=str(checkpoint))
    resumed = UnmaskTrainer(
        model=model_without_dropout(),
        args=training_args(tmp_path / "resumed"),
        train_dataset=TokenDataset(),
        unmask_config=config,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    a, b = unwrap_optimizer(full.optimizer), unwrap_optimizer(resumed.optimizer)
    assert b.steps_done == STEPS
    assert a.selected().keys() == b.selected().keys()
    for name, index in a.selected().items():
        assert torch.equal(index, b.selected()[name]), name
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    da, db = a.delta(), b.delta()
    assert da.base_hashes == db.base_hashes and da.sparse.keys() == db.sparse.keys()
    for name, (index, values) in da.sparse.items():
        assert torch.equal(index, db.sparse[name][0]) and torch.equal(values, db.sparse[name][1])
    # The resumed run logs the same telemetry for the steps it ran.
    tail = {e["step"]: e["unmask/num_selected"] for e in step_logs(full) if e["step"] > SAVE}
    assert tail == {
        e["step"]: e["unmask/num_selected"] for e in step_logs(resumed) if e["step"] > SAVE
    }


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_checkpoints_hold_the_delta_not_the_model(tmp_path):
    sizes = {}
    for full in (False, True):
        trainer = UnmaskTrainer(
            model=model_without_dropout(),
            args=training_args(tmp_path / str(full), max_steps=SAVE),
            train_dataset=TokenDataset(),
            unmask_config=dict(method="id3", budget=60),
            save_full_model=full,
        )
        trainer.train()
        checkpoint = tmp_path / str(full) / f"checkpoint-{SAVE}"
        assert (checkpoint / "model.safetensors").is_file() == full
        assert (checkpoint / DELTA_DIRNAME / "delta.safetensors").is_file()
        sizes[full] = folder_bytes(checkpoint)
        trainer.save_model(str(tmp_path / f"saved-{full}"))
        saved = tmp_path / f"saved-{full}"
        assert (saved / "model.safetensors").is_file() == full
        delta = unmask.SparseDelta.from_pretrained(saved / DELTA_DIRNAME)
        rebuilt = delta.apply_(model_without_dropout())
        for name, p in trainer.model.named_parameters():
            assert torch.equal(p, dict(rebuilt.named_parameters())[name]), name
    weights = sum(p.numel() for p in model_without_dropout().parameters())
    # A full checkpoint holds the model's fp32 weights (4 bytes each) on top of what resume
    # needs; the delta-only one 60 weights' worth of delta instead (measured: 33,880 bytes
    # against 133,268).
    assert sizes[True] - sizes[False] >= 4 * weights


def test_load_best_model_at_end_keeps_the_best_delta(tmp_path):
    trainer = UnmaskTrainer(
        model=model_without_dropout(),
        args=training_args(
            tmp_path,
            eval_strategy="steps",
            eval_steps=SAVE,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            greater_is_better=False,
        ),
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(size=8, seed=2),
        unmask_config=dict(method="id3", budget=60),
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    # Eval loss is lower at step 3 than at step 6 here, so the Trainer reloads checkpoint-3
    # while the optimizer holds step 6's 60 weights.
    assert best.name == f"checkpoint-{SAVE}"
    final = unmask.SparseDelta.from_pretrained(tmp_path / DELTA_DIRNAME)
    assert final.num_weights == 30 and final.metadata["steps_done"] == SAVE
    rebuilt = final.apply_(model_without_dropout())
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, dict(rebuilt.named_parameters())[name]), name


def test_plain_trainer_with_make_optimizer_and_callback(tmp_path):
    model = model_without_dropout()
    args = training_args(
        tmp_path, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6
    )
    opt = make_optimizer(model, args, method="id3", budget=40)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-2, 0.1)
    assert (group["betas"], group["eps"]) == ((0.8, 0.99), 1e-6)
    assert opt.total_steps == STEPS
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(),
        optimizers=(opt, None),
        callbacks=[UnmaskCallback()],
    )
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == STEPS
    assert all("unmask/num_selected" in e and "unmask/alloc/attention" in e for e in logs)
    assert logs[-1]["unmask/num_selected"] == 40
    assert (tmp_path / f"checkpoint-{SAVE}" / DELTA_DIRNAME / "delta.safetensors").is_file()
    assert (tmp_path / DELTA_DIRNAME / "delta_config.json").is_file()


def test_trainer_calibrates_fish(tmp_path):
    trainer = UnmaskTrainer(
        model=model_without_dropout(),
        args=training_args(tmp_path, max_steps=2, save_strategy="no"),
        train_dataset=TokenDataset(),
        unmask_config=dict(method="fish", budget=50, calibration_batches=2),
    )
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert opt.calibrated and opt.num_selected == 50
    assert [e["unmask/num_selected"] for e in step_logs(trainer)] == [50, 50]


def test_callback_without_selective_optimizer_fails(tmp_path):
    trainer = Trainer(
        model=model_without_dropout(),
        args=training_args(tmp_path, max_steps=1, save_strategy="no"),
        train_dataset=TokenDataset(),
        callbacks=[UnmaskCallback()],
    )
    with pytest.raises(TypeError, match="SelectiveOptimizer"):
        trainer.train()


def test_unsupported_trainer_optimizer_is_refused(tmp_path):
    args = training_args(tmp_path, optim="adafactor")
    with pytest.raises(ValueError, match="adafactor"):
        make_optimizer(model_without_dropout(), args, method="id3", budget=10)
    fp16 = training_args(tmp_path)
    fp16.fp16 = True  # set after construction: TrainingArguments refuses fp16 on a CPU
    with pytest.raises(ValueError, match="bf16"):
        make_optimizer(model_without_dropout(), fp16, method="id3", budget=10)
    sgd = make_optimizer(
        model_without_dropout(), training_args(tmp_path, optim="sgd"), method="id3", budget=10
    )
    assert isinstance(sgd._sparse, torch.optim.SGD)


def test_misspelt_method_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        UnmaskTrainer(
            model=model_without_dropout(),
            args=training_args(tmp_path),
            unmask_config=dict(method="id4", budget=10),
        )


def test_accelerate_prepare_matches_plain_loop():
    from accelerate.state import AcceleratorState, GradientState

    batches = make_batches("bert", 4)
    steps, budget = len(batches), 40

    def run(use_accelerate: bool):
        model = tiny_bert()
        opt = unmask.SelectiveOptimizer(
            model, method="id3", budget=budget, total_steps=steps, lr=1e-2
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        if use_accelerate:
            accelerator = accelerate.Accelerator(cpu=True)
            model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
            assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
        lrs = []
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss) if use_accelerate else loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            lrs.append(unwrap_optimizer(opt).param_groups[0]["lr"])
        return model, unwrap_optimizer(opt), lrs

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        plain_model, plain_opt, plain_lrs = run(False)
        acc_model, acc_opt, acc_lrs = run(True)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert acc_opt.num_selected == plain_opt.num_selected == budget
    assert acc_lrs == plain_lrs and acc_lrs[-1] == 0.0
    for (name, p), q in zip(plain_model.named_parameters(), acc_model.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("device", DEVICES)
def test_low_memory_mode_clips_like_the_standard_mode(tmp_path, device):
    # The Trainer clips after backward; in low-memory mode the candidates' .grad is already
    # gone, so UnmaskTrainer clips through the optimizer. Both runs must train the same weights.
    results = []
    for low_memory in (False, True):
        model = model_without_dropout()
        args = training_args(
            tmp_path / str(low_memory), max_grad_norm=0.05, save_steps=100, use_cpu=device == "cpu"
        )
        trainer = UnmaskTrainer(
            model=model,
            args=args,
            train_dataset=TokenDataset(),
            unmask_config=dict(method="id3", budget=60, low_memory=low_memory),
        )
        trainer.train()
        norms = [entry["grad_norm"] for entry in step_logs(trainer)]
        results.append((snapshot(model), norms))
    (standard, norms), (low, norms_low) = results
    assert all(n > 0.05 for n in norms)  # clipping was active at every step
    assert norms_low == pytest.approx(norms, rel=1e-4)
    for name, value in standard.items():
        torch.testing.assert_close(low[name], value, rtol=1e-5, atol=1e-6, msg=name)
