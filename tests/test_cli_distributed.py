"""`unmask train` under torchrun: two CPU processes (gloo) split every batch of the run between
them, so they train what one process trains on the whole batches; process zero alone writes
the delta, the step log, the report and the checkpoints, and prints the summary."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import COLUMNS, WORDS, assert_clear, torchrun

from unmask import SparseDelta
from unmask.app.cli import EXIT_OK, main
from unmask.app.task_trainer import check_batches_split, process_share

RUN = ("--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--save-every", "2", "--no-progress")
LAUNCH_TIMEOUT_S = 150  # generous for a loaded 2-core machine; a run takes ~10 s


@pytest.fixture(scope="module")
def qa_job(tmp_path_factory) -> list[str]:
    """`unmask train` options of a causal-LM job: a tiny random Llama folder and 60 prompts
    whose answers have 1 to 4 words, so the two halves of a batch differ in answer tokens."""
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), eos_token="[SEP]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
        pad_token_id=0, eos_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    data = folder / "qa.jsonl"
    rng = random.Random(0)
    with open(data, "w", encoding="utf-8") as f:
        for i in range(60):
            word = rng.choice(WORDS[:8])
            row = {"prompt": f"the movie was {word}", "answer": " ".join([word] * (1 + i % 4))}
            f.write(json.dumps(row) + "\n")
    return ["train", "--model", str(folder), "--task", str(data), "--budget", "10%"]


def _delta_folders(out):
    return sorted(str(p.parent.relative_to(out)) for p in out.rglob("delta_config.json"))


# Adam's first updates are lr * sign(g): a weight whose gradient is float noise can move a
# little differently when the gradient is summed in another order (seen: up to 5e-4 on the
# causal LM, 3e-7 on the classifier, a few dozen of ~2000 values)
VALUE_TOLERANCE = {"classifier": 1e-5, "causal-lm": 2e-3}


@pytest.mark.parametrize("job", ["classifier", "causal-lm"])
def test_two_processes_train_the_single_process_delta(
    job, tiny_model_dir, reviews_csv, qa_job, tmp_path
):
    single, double = tmp_path / "single", tmp_path / "double"
    if job == "classifier":
        model, task = str(tiny_model_dir), str(reviews_csv)
        # 1%, below the sparse backward's crossover: the default random mask runs it under DDP
        common = ["train", "--model", model, "--task", task, *COLUMNS, "--budget", "1%", *RUN]
    else:
        common = [*qa_job, *RUN]
    assert main([*common, "--output", str(single)]) == EXIT_OK
    argv = ["-m", "unmask.app.cli", *common, "--output", str(double)]
    output = torchrun(argv, 2, LAUNCH_TIMEOUT_S)

    assert output.count("weights changed:") == 1, output[-3000:]  # one summary, by process 0
    report = json.loads((double / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 4
    # the same files as the single-process run: one delta, one checkpoint (one RNG state each)
    assert _delta_folders(double) == _delta_folders(single)
    assert "delta" in _delta_folders(double)
    checkpoint = double / "checkpoints" / "checkpoint-4"
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    logs = [
        [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        for out in (single, double)
    ]
    assert [r["step"] for r in logs[1]] == [0, 1, 2, 3]  # written once, not once per process
    # the classifier's 1% mask runs the sparse backward; the causal LM's 10% lies above it
    sparse = [r["sparse_tensors"] > 0 for log in logs for r in log]
    assert all(sparse) if job == "classifier" else not any(sparse), logs
    # the whole batch's mean loss (per example, or per answer token): not scaled by the
    # process count, not a mean of the processes' means
    for one, two in zip(*logs, strict=True):
        assert abs(one["loss"] - two["loss"]) < 1e-4, (logs, job)

    a = SparseDelta.from_pretrained(single / "delta")
    b = SparseDelta.from_pretrained(double / "delta")
    assert b.num_weights == a.num_weights > 0
    assert set(a.sparse) == set(b.sparse) and set(a.replace) == set(b.replace)
    atol = VALUE_TOLERANCE[job]
    for name, (indices, values) in a.sparse.items():
        assert torch.equal(indices, b.sparse[name][0]), name  # the same weights selected
        torch.testing.assert_close(values, b.sparse[name][1], rtol=0, atol=atol)
    for name, tensor in a.replace.items():
        torch.testing.assert_close(tensor, b.replace[name], rtol=0, atol=atol)


def test_every_process_gets_a_share_of_every_batch():
    batch = [7, 3, 9, 1, 5]
    shares = [process_share(batch, rank, 2) for rank in range(2)]
    assert shares == [[7, 9, 5], [3, 1]]
    assert sorted(shares[0] + shares[1]) == sorted(batch)
    check_batches_split([[0, 1, 2, 3], [4, 5]], world=2, batch_size=4)  # every share non-empty
    with pytest.raises(ValueError) as err:
        check_batches_split([[0, 1, 2, 3], [4]], world=2, batch_size=4)
    assert_clear(
        str(err.value),
        r"a batch of only 1 example\(s\).*leaves a process without any",
        r"use a --batch-size that is a multiple of 2",
    )
