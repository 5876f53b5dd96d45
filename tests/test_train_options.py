"""`unmask train`'s Trainer options on `tiny_model_dir` and a tiny CSV: device, bf16, schedules,
accumulation, clipping, evaluation during training, loggers, candidate patterns, LoRA; and the
options a method does not use, refused. The device-touching tests run on every device present
(the CPU always, CUDA when there is one)."""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLUMNS, assert_clear, cli, train_argv
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from unmask import SparseDelta
from unmask.app import task_trainer
from unmask.app.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from unmask.optimize import sparse_backward as sb

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def log_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def steps_of(out) -> list[dict]:
    return [r for r in log_of(out) if "loss" in r]


def same_delta(a: SparseDelta, b: SparseDelta) -> bool:
    return (
        a.sparse.keys() == b.sparse.keys()
        and all(
            torch.equal(i, b.sparse[n][0]) and torch.equal(v, b.sparse[n][1])
            for n, (i, v) in a.sparse.items()
        )
        and a.replace.keys() == b.replace.keys()
        and all(torch.equal(v, b.replace[n]) for n, v in a.replace.items())
    )


def assert_same_weights_close(
    a: SparseDelta, b: SparseDelta, rtol: float, atol: float = 1e-6
) -> None:
    """The same selected weights, with values equal to `rtol` and `atol`."""
    assert a.sparse.keys() == b.sparse.keys()
    for name, (index, values) in a.sparse.items():
        assert torch.equal(index, b.sparse[name][0]), name
        torch.testing.assert_close(b.sparse[name][1], values, rtol=rtol, atol=atol)


def test_default_options_are_the_validated_job(tiny_model_dir, reviews_csv, tmp_path):
    """Constant learning rate, no warm-up, no clipping, fp32: what the default job was tuned
    with."""
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, reviews_csv, out, "--steps", "3", "--budget", "5%")
    assert main(argv) == EXIT_OK
    rows = steps_of(out)
    assert [r["learning_rate"] for r in rows] == [3e-2] * 3
    assert not any("grad_norm" in r for r in rows)
    used = json.loads((out / "report.json").read_text())["config"]
    assert (used["method"], used["lr"], used["lr_scheduler_type"]) == ("random", 3e-2, "constant")
    assert (used["warmup_ratio"], used["max_grad_norm"], used["bf16"]) == (0.0, 0.0, False)


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_flags_on_a_tiny_model(tiny_model_dir, reviews_csv, tmp_path, device):
    out = tmp_path / "run"
    flags = [
        "--method", "id3", "--budget", "200", "--steps", "8", "--lr", "1e-2",
        "--device", device, "--lr-scheduler-type", "cosine", "--warmup-ratio", "0.25",
        "--gradient-accumulation-steps", "2", "--batch-size", "4", "--max-grad-norm", "0.5",
        "--eval-steps", "3", "--include", "encoder", "pooler", "classifier",
        "--exclude", r"layer\.1\.", "--dense", "pooler", "--no-dense-in-budget",
    ]  # fmt: skip
    assert main(train_argv(tiny_model_dir, reviews_csv, out, *flags)) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    assert report["device"].startswith(device)
    rows = steps_of(out)
    assert [r["step"] for r in rows] == list(range(8))
    lrs = [r["learning_rate"] for r in rows]
    # The rate each step used: 2 warm-up steps from 0 up to 1e-2, then a cosine decay
    assert lrs[0] == 0 < lrs[1] < lrs[2] == pytest.approx(1e-2)
    assert lrs[2] > lrs[5] > lrs[7] > 0
    assert all(r["grad_norm"] > 0 for r in rows)
    evals = [r for r in log_of(out) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 5, 7]  # every 3 steps, and at the end
    best = max(evals, key=lambda r: r["eval_accuracy"])
    assert report["best"] == {
        "best_step": best["step"] + 1,
        "validation_accuracy": best["eval_accuracy"],
    }
    best_delta = SparseDelta.from_pretrained(out / "best_delta")
    assert best_delta.metadata["best_step"] == best["step"] + 1

    delta = SparseDelta.from_pretrained(out / "delta")
    names = [*delta.sparse, *delta.replace]
    assert all(re.search("encoder|pooler|classifier", n) for n in names)
    assert not any(re.search(r"layer\.1\.", n) for n in names)
    assert set(delta.replace) == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
        "classifier.bias",
    }  # fmt: skip
    # The dense tensors do not count against the budget: the 200 sparse weights are all there.
    assert sum(len(i) for i, _ in delta.sparse.values()) == 200
    # Two micro-batches of 4 per step: the batches of 8 steps cover 64 examples.
    assert report["steps"] == 8


def test_sparse_backward_clips_through_the_optimizer(
    tiny_model_dir, reviews_csv, tmp_path, monkeypatch
):
    # The selected weights' gradients live in the optimizer's slots, not in model.parameters():
    # the Trainer's clipping must go through SelectiveOptimizer.clip_grad_norm_ to see them.
    from unmask.optimize.optimizer import SelectiveOptimizer

    norms = []
    clip = SelectiveOptimizer.clip_grad_norm_

    def recording(self, max_norm):
        norms.append(float(clip(self, max_norm)))
        return torch.tensor(norms[-1])

    monkeypatch.setattr(SelectiveOptimizer, "clip_grad_norm_", recording)
    monkeypatch.setattr(sb, "MAX_DENSITY", 1.0)  # the tiny model's 5% lies above the crossover
    out = tmp_path / "run"
    flags = ["--sparse-backward", "--budget", "5%", "--steps", "3", "--max-grad-norm", "0.5"]
    assert main(train_argv(tiny_model_dir, reviews_csv, out, *flags)) == EXIT_OK
    assert len(norms) == 3 and all(n > 0 for n in norms)
    assert all(r["sparse_tensors"] > 0 for r in steps_of(out))
    assert [r["grad_norm"] for r in steps_of(out)] == pytest.approx(norms)


def test_bf16_trains(tiny_model_dir, reviews_csv, tmp_path):
    out = tmp_path / "run"
    flags = ["--bf16", "--device", "cpu", "--steps", "2", "--budget", "5%"]
    assert main(train_argv(tiny_model_dir, reviews_csv, out, *flags)) == EXIT_OK
    assert json.loads((out / "report.json").read_text())["config"]["bf16"] is True
    assert all(math.isfinite(r["loss"]) for r in steps_of(out))


def test_low_memory_trains_the_same_weights(tiny_model_dir, reviews_csv, tmp_path):
    deltas = []
    for low in (False, True):
        out = tmp_path / str(low)
        flags = ["--method", "id3", "--budget", "5%", "--steps", "3", "--max-grad-norm", "1.0"]
        flags += ["--low-memory"] if low else []
        assert main(train_argv(tiny_model_dir, reviews_csv, out, *flags)) == EXIT_OK
        deltas.append(SparseDelta.from_pretrained(out / "delta"))
    assert_same_weights_close(*deltas, rtol=1e-5)


@pytest.mark.parametrize(
    "flags",
    [["--method", "random"], ["--method", "id3", "--unmask-every", "2"]],
    ids=["random", "id3-every-2"],
)
def test_sparse_backward_trains_the_same_weights(
    tiny_model_dir, reviews_csv, tmp_path, monkeypatch, flags
):
    """--sparse-backward selects the same weights and reaches the same values as the dense
    backward. (Not with clipping: the sparse path's norm covers only the gradients it computes,
    docs/sparse_backward.md.)"""
    monkeypatch.setattr(sb, "MAX_DENSITY", 1.0)  # the tiny model's 5% lies above the crossover
    deltas = []
    for sparse in (False, True):
        out = tmp_path / str(sparse)
        argv = [*flags, "--budget", "5%", "--steps", "4"]
        argv += ["--sparse-backward"] if sparse else ["--no-sparse-backward"]
        assert main(train_argv(tiny_model_dir, reviews_csv, out, *argv)) == EXIT_OK
        deltas.append(SparseDelta.from_pretrained(out / "delta"))
        assert json.loads((out / "report.json").read_text())["config"]["sparse_backward"] is sparse
        assert any(r["sparse_tensors"] > 0 for r in steps_of(out)) is sparse
    # Summed in another order, a gradient that is zero in exact arithmetic (BERT's key bias:
    # softmax ignores it) is other rounding noise, which Adam turns into other tiny updates
    # (seen: 1.2e-6 apart, 1e-5 of the most a weight moves, lr x steps; 4e-7 elsewhere).
    assert_same_weights_close(*deltas, rtol=1e-4, atol=1e-4 * 3e-2 * 4)


@pytest.mark.parametrize(
    ("flags", "sparse"),
    [([], True), (["--method", "pafi"], True), (["--lora-r", "4", "--budget", "300"], True),
     (["--method", "id3"], False), (["--no-sparse-backward"], False)],
    ids=["random", "pafi", "random+lora", "id3", "random-off"],
)  # fmt: skip
def test_sparse_backward_is_the_default_for_masks_chosen_before_training(
    tiny_model_dir, reviews_csv, tmp_path, monkeypatch, flags, sparse
):
    """Without the flag, a mask chosen before training runs the sparse backward from its first
    step (the benchmark measured it faster than the dense one everywhere); a growing mask does
    not, and --no-sparse-backward turns it off. The report records what ran."""
    from unmask.optimize import backward_switch

    monkeypatch.setattr(sb, "MAX_DENSITY", 1.0)  # the tiny model's 5% lies above the crossover
    built = []

    class Recording(backward_switch.SparseBackward):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(len(self.sparse))

    monkeypatch.setattr(backward_switch, "SparseBackward", Recording)
    out = tmp_path / "run"
    argv = ["--budget", "5%", *flags, "--steps", "2"]
    assert main(train_argv(tiny_model_dir, reviews_csv, out, *argv)) == EXIT_OK
    assert json.loads((out / "report.json").read_text())["config"]["sparse_backward"] is sparse
    # (accelerate's optimizer wrapper reloads the state dict, which rebuilds it once)
    assert (built and all(n > 0 for n in built)) if sparse else built == [], built


@pytest.mark.parametrize(
    "method",
    [["--method", "id3", "--budget", "5%"], ["--method", "id3", "--budget", "300", "--lora-r", "4"],
     ["--method", "lora", "--lora-r", "4"]],
    ids=["id3", "id3+lora", "lora"],
)  # fmt: skip
def test_interrupted_and_resumed_with_trainer_options_is_bit_identical(
    tiny_model_dir, reviews_csv, tmp_path, monkeypatch, method
):
    flags = [
        *method, "--steps", "6", "--lr", "1e-2", "--batch-size", "4",
        "--lr-scheduler-type", "linear", "--warmup-ratio", "0.2", "--max-grad-norm", "0.5",
        "--gradient-accumulation-steps", "2",
    ]  # fmt: skip
    straight = tmp_path / "straight"
    assert main(train_argv(tiny_model_dir, reviews_csv, straight, *flags)) == EXIT_OK

    on_step_end = task_trainer.StopOnSignal.on_step_end

    def signal_after_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:
            self.signal = "SIGTERM"  # as the handler does
        return on_step_end(self, args, state, control, **kwargs)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(task_trainer.StopOnSignal, "on_step_end", signal_after_step_3)
        assert main(train_argv(tiny_model_dir, reviews_csv, resumed, *flags)) == EXIT_INTERRUPTED
    assert (resumed / "checkpoints" / "checkpoint-3").is_dir()
    assert main(train_argv(tiny_model_dir, reviews_csv, resumed, *flags, "--resume")) == EXIT_OK
    if "lora" in method:  # plain LoRA: the adapters' weights
        a, b = (
            load_file(run / "adapter" / "adapter_model.safetensors") for run in (straight, resumed)
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    else:
        a = SparseDelta.from_pretrained(straight / "delta")
        b = SparseDelta.from_pretrained(resumed / "delta")
        assert same_delta(a, b)
    assert steps_of(straight) == steps_of(resumed)


@pytest.mark.parametrize("device", DEVICES)
def test_id3_on_lora_weights_eval_and_merge(tiny_model_dir, reviews_csv, tmp_path, capsys, device):
    out = tmp_path / "run"
    flags = ["--method", "id3", "--lora-r", "4", "--budget", "300", "--steps", "4"]
    flags += ["--lr", "1e-2", "--device", device]
    assert main(train_argv(tiny_model_dir, reviews_csv, out, *flags)) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    delta = SparseDelta.from_pretrained(out / "delta")
    assert all("lora_" in n for n in delta.sparse) and delta.sparse
    assert delta.metadata["lora"] == {"r": 4, "seed": 0, "task_kind": "classification"}
    capsys.readouterr()
    # eval rebuilds the adapter from the recorded rank and seed, on the recorded base model
    argv = ["eval", "--task", str(reviews_csv), *COLUMNS, "--delta", str(out / "delta")]
    assert main(argv) == EXIT_OK
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(report["accuracy"])
    merged = tmp_path / "merged"
    assert main(["merge", "--delta", str(out / "delta"), "--output", str(merged)]) == EXIT_OK
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_plain_lora_for_comparison(tiny_model_dir, reviews_csv, tmp_path):
    out = tmp_path / "run"
    flags = ["--method", "lora", "--lora-r", "4", "--steps", "3", "--lr", "1e-2"]
    assert main(train_argv(tiny_model_dir, reviews_csv, out, *flags)) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert 0 < report["weights_changed"] < report["weights_total"]
    assert "num_selected" not in steps_of(out)[0]


def test_eval_defaults_to_the_recorded_base_and_merge_keeps_the_labels(
    trained_run, reviews_csv, tmp_path, capsys
):
    delta = SparseDelta.from_pretrained(trained_run / "delta")
    base = delta.metadata["base_model"]
    assert base.startswith("/")  # an absolute path (or, for a hub model, its id)
    report = json.loads((trained_run / "report.json").read_text())
    capsys.readouterr()
    argv = ["eval", "--task", str(reviews_csv), *COLUMNS, "--delta", str(trained_run / "delta")]
    assert main(argv) == EXIT_OK
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(report["accuracy"])
    merged = tmp_path / "merged"
    assert main(["merge", "--delta", str(trained_run / "delta"), "--output", str(merged)]) == 0
    config = AutoConfig.from_pretrained(merged)
    assert config.id2label == {0: "neg", 1: "pos"}
    assert config.label2id == {"neg": 0, "pos": 1}


def test_report_to_tensorboard(tiny_model_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(
        tiny_model_dir,
        reviews_csv,
        out,
        "--steps",
        "2",
        "--budget",
        "5%",
        "--report-to",
        "tensorboard",
    )
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        code, err = cli(argv, capsys)
        assert code == EXIT_USAGE
        assert_clear(err, r"--report-to tensorboard needs the tensorboard package", r"pip install")
        return
    assert main(argv) == EXIT_OK
    assert list((out / "checkpoints").rglob("events.out.tfevents.*"))


def wandb_history(path: Path) -> list[dict[str, float]]:
    """The history rows ({key: value}) of a wandb offline run file (run-<id>.wandb): a 7-byte
    file header, then LevelDB-log framing (32 KiB blocks of chunks, each with a 7-byte header:
    crc32, length, kind 1 full / 2 first / 3 middle / 4 last) of protobuf `Record`s."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    rows, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zeros: the rest of the file is unwritten
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


def test_report_to_wandb_offline(tiny_model_dir, reviews_csv, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # the run: tmp_path/wandb/offline-run-*/
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # its logs, settings
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, reviews_csv, out, "--steps", "3", "--budget", "5%")
    assert main([*argv, "--report-to", "wandb"]) == EXIT_OK
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    logged = [row["train/loss"] for row in wandb_history(run_file) if "train/loss" in row]
    assert logged == pytest.approx([r["loss"] for r in steps_of(out)], abs=1e-5)


def test_report_to_wandb_without_the_package(
    tiny_model_dir, reviews_csv, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    argv = train_argv(tiny_model_dir, reviews_csv, tmp_path / "run", "--report-to", "wandb")
    code, err = cli(argv, capsys)
    assert code == EXIT_USAGE
    assert_clear(err, r"--report-to wandb needs the wandb package", r"pip install wandb")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_cuda_exits_2(tiny_model_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = cli(train_argv(tiny_model_dir, reviews_csv, out, "--device", "cuda"), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, r"--device cuda: no CUDA device is available", r"use --device cpu or auto")
    assert not (out / "train_log.jsonl").exists()


@pytest.mark.parametrize(
    ("flags", "what"),
    [
        (["--method", "random", "--score-eps", "0.1"], r"'random' does not use --score-eps"),
        (["--method", "pafi", "--schedule", "linear-decay"], r"does not use --schedule"),
        (["--method", "bitfit", "--budget", "5%"], r"'bitfit' does not use --budget"),
        (["--method", "full", "--low-memory"], r"does not use --low-memory"),
        (["--method", "lora", "--lora-r", "4", "--budget", "5%"], r"'lora' does not use --budget"),
        (["--method", "lora"], r"--method lora needs --lora-r"),
        (["--gradient-accumulation-steps", "0"], r"--gradient-accumulation-steps must be a"),
        (["--warmup-ratio", "1.5"], r"--warmup-ratio must be a number from 0 to below 1"),
        (["--max-grad-norm", "-1"], r"--max-grad-norm must be a finite number >= 0"),
        (["--eval-steps", "0"], r"--eval-steps must be a positive integer"),
        (["--include", "("], r"--include '\(' is not a valid regular expression"),
        (["--method", "id3", "--unmask-every", "0"], r"--unmask-every must be a positive integer"),
        (["--method", "random", "--unmask-every", "2"], r"'random' does not use --unmask-every"),
        (["--method", "full", "--sparse-backward"], r"'full' does not use --sparse-backward"),
    ],
    ids=["score-eps-random", "schedule-pafi", "budget-bitfit", "low-memory-full", "budget-lora",
         "lora-without-rank", "accumulation-0", "warmup-1.5", "clip-negative", "eval-steps-0",
         "bad-regex", "unmask-every-0", "unmask-every-static", "sparse-backward-full"],
)  # fmt: skip
def test_refused_options_exit_2_before_training(
    tiny_model_dir, reviews_csv, tmp_path, capsys, flags, what
):
    out = tmp_path / "out"
    code, err = cli(train_argv(tiny_model_dir, reviews_csv, out, *flags), capsys)
    assert code == EXIT_USAGE, err
    assert re.search(what, err), err
    assert "Traceback" not in err and not (out / "train_log.jsonl").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('score_eps = 0.1\nmethod = "random"\n', r"'random' does not use --score-eps"),
        ('gradient_accumulation_steps = "2"\n',
         r"gradient_accumulation_steps \(--gradient-accumulation-steps\) must be an integer"),
        ('include = "encoder"\n', r"include \(--include\) must be a list of strings or unset"),
        ('include = [1]\n', r"include \(--include\) must be a list of strings"),
        ('device = "tpu"\n', r"device \(--device\) must be one of auto, cpu, cuda, mps"),
        ("bf16 = 1\n", r"bf16 \(--bf16\) must be true or false"),
    ],
    ids=["unused-in-file", "accumulation-string", "include-string", "include-ints", "device",
         "bf16-int"],
)  # fmt: skip
def test_config_file_options_are_typed_and_checked(
    tiny_model_dir, reviews_csv, tmp_path, capsys, text, message
):
    (tmp_path / "job.toml").write_text(text)
    argv = train_argv(
        tiny_model_dir, reviews_csv, tmp_path / "run", "--config", str(tmp_path / "job.toml")
    )
    code, err = cli(argv, capsys)
    assert code == EXIT_USAGE, err
    assert re.search(message, err), err


def test_a_flag_overrides_the_file_for_trainer_options(tiny_model_dir, reviews_csv, tmp_path):
    (tmp_path / "job.yaml").write_text(
        "lr-scheduler-type: cosine\nmax-grad-norm: 2.0\ninclude: [encoder]\nsteps: 2\n"
    )
    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, reviews_csv, out, "--config", str(tmp_path / "job.yaml"))
    assert main([*argv, "--lr-scheduler-type", "constant", "--budget", "5%"]) == EXIT_OK
    used = json.loads((out / "report.json").read_text())["config"]
    assert used["lr_scheduler_type"] == "constant"  # the flag
    assert (used["max_grad_norm"], used["include"]) == (2.0, ["encoder"])  # the file


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_says_when_there_is_no_cuda(tmp_path):
    script = Path(__file__).parent.parent / "scripts" / "gpu_check.sh"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(script), str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1
    assert_clear(done.stderr, r"no CUDA device here", r"run this on a machine with an NVIDIA GPU")
    assert not (tmp_path / "gpu_check.json").exists()
