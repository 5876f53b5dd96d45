"""Tiny random models and batches shared by the tests (nothing is downloaded)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 100


def tiny_bert(seed: int = 0, **shapes: int) -> BertForSequenceClassification:
    """A tiny random BERT classifier in eval mode; `shapes` override its BertConfig fields."""
    torch.manual_seed(seed)
    options = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(BertConfig(**{**options, **shapes})).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


MODELS = {"bert": tiny_bert, "llama": tiny_llama}


def make_batches(kind: str, count: int, seed: int = 1, batch: int = 4, length: int = 12):
    """Random token batches with labels suited to the model kind."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g) if kind == "bert" else ids.clone()
        out.append({"input_ids": ids, "labels": labels})
    return out


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(params=sorted(MODELS))
def model_kind(request) -> str:
    return request.param


# Words of the tiny WordPiece vocabulary used by the CLI tests' models and data.
WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "movie", "was"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny BERT backbone and tokenizer saved as a pretrained folder (no head)."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    AutoModelForSequenceClassification.from_config(config).bert.save_pretrained(folder)
    return folder


def launch_torchrun(script: Path, out: Path, world: int, timeout_s: float) -> float:
    """Run `script out` on `world` torchrun processes; fail the test with their output if they
    fail or run past `timeout_s` (then torchrun and its workers are killed). Returns seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(world), str(script), str(out),
    ]  # fmt: skip
    start = time.monotonic()
    # A session of its own, so a timeout can kill torchrun and both workers together.
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout_s} s:\n{output[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed with exit code {proc.returncode}:\n{output[-6000:]}")
    return time.monotonic() - start
