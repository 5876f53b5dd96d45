"""Tiny random models, batches, data files and deltas shared by the tests (nothing is
downloaded), and the helpers that check a refusal's message and run the CLI in process."""

from __future__ import annotations

import copy
import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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

from unmask import SelectiveOptimizer, SparseDelta
from unmask.app.cli import main
from unmask.store.fingerprints import tensor_hash

VOCAB = 100


def tiny_bert(seed: int = 0, **fields: float) -> BertForSequenceClassification:
    """A tiny random BERT classifier in eval mode; `fields` override its BertConfig fields."""
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
    return BertForSequenceClassification(BertConfig(**{**options, **fields})).eval()


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


def tiny_gpt2(**fields: float):
    """A tiny random GPT-2 in eval mode: Conv1D projections (weights stored in x out), a tied
    LM head; `fields` override its GPT2Config fields."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    options = dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(GPT2Config(**{**options, **fields})).eval()


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


def bits(model: torch.nn.Module) -> dict[str, str]:
    """Per parameter: a hash of dtype, shape and bytes (so -0.0 and 0.0 differ)."""
    return {n: tensor_hash(p) for n, p in model.named_parameters()}


def assert_clear(message: str, what: str, fix: str) -> None:
    """The message names the problem (regex `what`) and the way out (regex `fix`)."""
    assert re.search(what, message), f"does not say what was wrong ({what!r}): {message!r}"
    assert re.search(fix, message), f"does not say how to fix it ({fix!r}): {message!r}"


_DATASETS_ENV = ("HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE")
_saved_datasets_env: dict[str, str | None] = {}


def pytest_configure(config):
    """`datasets` (which reads local data files) never goes online and caches under a temporary
    folder. It reads these variables when first imported, and `transformers.Trainer` imports
    it, so they are set here, before the test modules are collected; subprocesses (torchrun,
    the CLI) inherit them."""
    _saved_datasets_env.update({k: os.environ.get(k) for k in _DATASETS_ENV})
    cache = tempfile.mkdtemp(prefix="unmask-tests-hf-datasets-")
    os.environ.update(HF_DATASETS_CACHE=cache, HF_DATASETS_OFFLINE="1")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
    for key, value in _saved_datasets_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def datasets_cache() -> Path:
    """The folder where `datasets` caches what the tests read."""
    import datasets

    assert str(datasets.config.HF_DATASETS_CACHE) == os.environ["HF_DATASETS_CACHE"]
    return Path(os.environ["HF_DATASETS_CACHE"])


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


# ---------------------------------------------------------------- the CLI on tiny data


def write_reviews(
    path: Path,
    rows: int = 60,
    labels: tuple[str, ...] = ("neg", "pos"),
    header: tuple[str, str] = ("sentence", "sentiment"),
) -> Path:
    """A CSV of `rows` short reviews in the words of `tiny_model_dir`'s vocabulary, labels taken
    in turn from `labels`; the same seed every time, so a shorter file is a prefix of a longer."""
    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(rows):
            word = rng.choice(WORDS[:4] if i % 2 else WORDS[4:8])
            writer.writerow([f"the movie was {word}", labels[i % len(labels)]])
    return path


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory) -> Path:
    """`write_reviews` with its defaults: 60 rows, columns "sentence" and "sentiment"."""
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.csv")


# The column flags `unmask train` and `unmask eval` need for `write_reviews`' files.
COLUMNS = ["--text-column", "sentence", "--label-column", "sentiment"]


def train_argv(model, task, out, *extra: str) -> list[str]:
    """`unmask train` of `model` on a `write_reviews` file `task`, writing to `out`."""
    return [
        "train", "--model", str(model), "--task", str(task), *COLUMNS,
        "--output", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run `unmask argv` in process: (exit code, what it wrote to stderr)."""
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, reviews_csv, tmp_path_factory) -> Path:
    """The output folder of a finished 4-step `unmask train` on `reviews_csv`, budget 5%, with
    a checkpoint written at its last step."""
    out = tmp_path_factory.mktemp("run")
    argv = train_argv(tiny_model_dir, reviews_csv, out, "--steps", "4", "--budget", "5%")
    assert main([*argv, "--save-every", "2"]) == 0
    return out


# ---------------------------------------------------------------- trained optimizers and deltas


def train_id3(model: torch.nn.Module, steps: int = 3) -> SelectiveOptimizer:
    """ID3 (budget 400 weights, lr 1e-2) trained `steps` steps on a tiny BERT classifier `model`
    with fixed batches of 4 sequences of 8 tokens; returns the optimizer."""
    opt = SelectiveOptimizer(model, method="id3", budget=400, total_steps=steps, lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(5, 20, (4, 8), generator=generator)
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def id3_with_dense_head(steps: int, budget: int):
    """(base model, optimizer) of a tiny BERT trained `steps` steps by ID3 with a dense head,
    on seeded random batches."""
    base = tiny_bert()
    model = copy.deepcopy(base)
    opt = SelectiveOptimizer(
        model, method="id3", budget=budget, total_steps=steps, lr=1e-2, dense=["classifier"]
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 100, (4, 12), generator=g)
        labels = torch.randint(0, 2, (4,), generator=g)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return base, opt


@pytest.fixture(scope="module")
def trained_delta() -> tuple[BertForSequenceClassification, SparseDelta]:
    """(base model, delta) of a tiny BERT trained 2 steps by ID3 with a dense head."""
    base, opt = id3_with_dense_head(steps=2, budget=200)
    return base, opt.delta()


def sparse_delta(
    model: torch.nn.Module, changes: dict[str, tuple[list[int], torch.Tensor]], **replace
) -> SparseDelta:
    """A delta of `model` (its current values are the base) with the given flat changes
    (name -> (flat indices, values)) and replaced tensors (name -> the whole new tensor)."""
    params = dict(model.named_parameters())
    names = [*changes, *replace]
    return SparseDelta(
        sparse={n: (torch.tensor(i, dtype=torch.int32), v) for n, (i, v) in changes.items()},
        replace=dict(replace),
        shapes={n: tuple(params[n].shape) for n in names},
        dtypes={n: str(params[n].dtype).removeprefix("torch.") for n in names},
        base_hashes={n: tensor_hash(params[n]) for n in changes},
    )


@pytest.fixture
def head_delta(tiny_model_dir) -> SparseDelta:
    """A delta of `tiny_model_dir`'s BERT with one changed weight and a replaced 2-label head,
    its base model recorded; a new one for each test."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    delta = sparse_delta(
        model,
        {"bert.encoder.layer.0.output.dense.weight": ([3], torch.tensor([0.1]))},
        **{n: p.detach().clone() for n, p in model.named_parameters() if "classifier" in n},
    )
    delta.metadata["base_model"] = str(tiny_model_dir)
    return delta


def numbered_delta(save: int, weights: int = 1000) -> SparseDelta:
    """A delta whose every value and whose metadata both say which save it is (`save_of`)."""
    indices = torch.arange(weights, dtype=torch.int32)
    values = torch.full((weights,), float(save))
    return SparseDelta(
        sparse={"w": (indices, values)},
        replace={},
        shapes={"w": (weights,)},
        dtypes={"w": "float32"},
        base_hashes={"w": "0" * 32},
        metadata={"save": save},
    )


def save_of(delta: SparseDelta) -> int:
    """Which save a loaded `numbered_delta` is; fails if its config and its tensors are from
    two saves."""
    values = delta.sparse["w"][1]
    save = delta.metadata["save"]
    assert bool((values == save).all()), (
        f"config of save {save} with tensors of save(s) {sorted(set(values.tolist()))}"
    )
    return save


# ---------------------------------------------------------------- trained BERT deltas
# For test_delta and test_delta_format. Fixture models are never modified: every test that
# writes to a model deep-copies it first.

DELTA_STEPS = 5


def make_bert(seed: int) -> BertForSequenceClassification:
    """`tiny_bert` without dropout, in train mode (a step stays a pure function of its batch),
    named "tiny-random-bert"."""
    model = tiny_bert(seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    model.config._name_or_path = "tiny-random-bert"
    return model


def delta_batch(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """4 random sequences of 12 tokens, labelled for `model` (a classifier or a causal LM)."""
    ids = torch.randint(0, 100, (4, 12), generator=generator)
    if isinstance(model, LlamaForCausalLM):
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 2, (4,), generator=generator)}


def train_delta(
    model: torch.nn.Module, data_seed: int = 1, budget="1%", dense=None, **kwargs
) -> tuple[SelectiveOptimizer, SparseDelta]:
    """Train `model` in place by ID3 for DELTA_STEPS steps on random batches; return
    (optimizer, delta)."""
    opt = SelectiveOptimizer(
        model, method="id3", budget=budget, total_steps=DELTA_STEPS, lr=1e-2, dense=dense, **kwargs
    )
    generator = torch.Generator().manual_seed(data_seed)
    for _ in range(DELTA_STEPS):
        model(**delta_batch(model, generator)).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt, opt.delta()


@pytest.fixture(scope="module")
def bert_base():
    return make_bert(0)


@pytest.fixture(scope="module")
def bert_dense(bert_base):
    """BERT trained with a dense (replaced) classification head."""
    model = copy.deepcopy(bert_base)
    opt, delta = train_delta(model, dense=["classifier"])
    return model, delta, opt


@pytest.fixture(scope="module")
def bert_sparse(bert_base):
    """BERT trained with every tensor a candidate: a delta without replaced tensors."""
    model = copy.deepcopy(bert_base)
    _, delta = train_delta(model, dense=None)
    assert not delta.replace
    return model, delta


def launch_torchrun(script: Path, out: Path, world: int, timeout_s: float) -> float:
    """Run `script out` on `world` torchrun processes; fail the test with their output if they
    fail or run past `timeout_s` (then torchrun and its workers are killed). Returns seconds."""
    start = time.monotonic()
    torchrun([str(script), str(out)], world, timeout_s)
    return time.monotonic() - start


def torchrun(argv: list[str], world: int, timeout_s: float) -> str:
    """Run `torchrun --standalone --nproc_per_node world argv...` (e.g. a script and its
    arguments, or ``-m module ...``); fail the test with the output if it fails or runs past
    `timeout_s` (then torchrun and its workers are killed). Returns stdout and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(world), *argv,
    ]  # fmt: skip
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
    return output
