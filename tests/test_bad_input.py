"""Bad input is refused with the right exception (or CLI exit code 2) and a clear message.

One test per bad input listed in issue 5. Every test checks the type (or exit code) and that the
message says both what was wrong and how to fix it (`assert_clear`). Tests marked
``xfail(strict=True)`` describe the behaviour the issue asks for where the current code falls
short; each reason says what happens today.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import random
import re

import pytest
import torch
from conftest import WORDS, tiny_bert, tiny_llama
from safetensors.torch import load_file, save_file

from unmask import METHODS, DeltaError, SelectiveOptimizer, SparseDelta
from unmask.cli import EXIT_USAGE, main


def assert_clear(message: str, what: str, fix: str) -> None:
    """The message names the problem (regex `what`) and the way out (regex `fix`)."""
    assert re.search(what, message), f"does not say what was wrong ({what!r}): {message!r}"
    assert re.search(fix, message), f"does not say how to fix it ({fix!r}): {message!r}"


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        assert p.dtype == before[name].dtype and torch.equal(p.detach(), before[name]), name


def num_weights(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- SelectiveOptimizer arguments


@pytest.mark.parametrize(
    ("budget", "what", "fix"),
    [
        (0, r"got 0\b", r"at least 1 weight"),
        (-5, r"got -5\b", r"at least 1 weight"),
        (0.0, r"got 0\.0", r"positive finite number"),
        (-0.5, r"got -0\.5", r"positive finite number"),
        ("0", r"'0'", r"whole number of weights >= 1"),
        ("0%", r"'0%'", r"percentage must be in \(0, 100\]"),
    ],
    ids=["int-0", "int-negative", "float-0", "float-negative", "str-0", "percent-0"],
)
def test_budget_not_positive(budget, what, fix):
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_bert(), method="id3", budget=budget, total_steps=3)
    assert_clear(str(err.value), what, fix)


def test_budget_larger_than_the_candidates():
    model = tiny_bert()
    pool = num_weights(model)
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(model, method="id3", budget=pool + 1, total_steps=3)
    assert_clear(
        str(err.value),
        rf"{pool + 1:,} weights, but only {pool:,} weights are candidates",
        r"lower the budget or widen the candidates",
    )


def test_budget_larger_than_the_candidates_narrowed_by_include():
    model = tiny_bert()
    head = model.classifier.weight.numel() + model.classifier.bias.numel()
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(model, method="id3", budget="1K", total_steps=3, include="classifier")
    assert_clear(
        str(err.value),
        rf"1,000 weights, but only {head} weights are candidates",
        r"include/exclude",
    )


@pytest.mark.parametrize("budget", ["0.1%%", "ten", "-5K"])
def test_budget_malformed_string(budget):
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_bert(), method="id3", budget=budget, total_steps=3)
    assert_clear(
        str(err.value),
        rf"cannot read budget {re.escape(repr(budget))}",
        r"use a count \(5000, '100K', '1\.5M'\), a percentage \('0\.1%'\) or a fraction",
    )


@pytest.mark.parametrize("total_steps", [0, -1])
def test_total_steps_not_positive(total_steps):
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_bert(), method="id3", budget=10, total_steps=total_steps)
    assert_clear(str(err.value), rf"total_steps .*got {total_steps}", r"positive integer")


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_bert(), method="lora", budget=10, total_steps=3)
    message = str(err.value)
    assert_clear(message, r"unknown method 'lora'", r"valid methods: ")
    for name in METHODS:
        assert re.search(rf"\b{re.escape(name)}\b", message), name


@pytest.mark.parametrize("score_eps", [0.0, -1e-3])
def test_score_eps_not_positive(score_eps):
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_bert(), method="id3", budget=10, total_steps=3, score_eps=score_eps)
    assert_clear(str(err.value), rf"score_eps .*got {score_eps}", r"positive finite number")


@pytest.mark.parametrize("score_exp", [math.nan, math.inf, -math.inf])
def test_score_exp_not_finite(score_exp):
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_bert(), method="id3", budget=10, total_steps=3, score_exp=score_exp)
    assert_clear(str(err.value), rf"score_exp .*got {score_exp}", r"finite number")


@pytest.mark.parametrize("role", ["include", "exclude", "dense"])
def test_pattern_matching_no_weight(role):
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(
            tiny_bert(), method="id3", budget=10, total_steps=3, **{role: "no_such_layer"}
        )
    assert_clear(
        str(err.value),
        rf"{role} pattern 'no_such_layer' matches no trainable parameter",
        r"names look like: bert\.embeddings\.word_embeddings\.weight",
    )


def test_bitfit_on_a_model_without_biases():
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(tiny_llama(), method="bitfit")
    assert_clear(
        str(err.value), r"bias terms .* this model has none", r"another method, e\.g\. .*'id3'"
    )


def test_no_trainable_parameter():
    model = tiny_bert()
    model.requires_grad_(False)
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(model, method="id3", budget=10, total_steps=3)
    assert_clear(
        str(err.value), r"no parameter with requires_grad=True", r"nothing can be fine-tuned"
    )


def test_no_sparse_candidate_left():
    """Only the head is trainable and it is trained densely: no weight competes for the budget."""
    model = tiny_bert()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    with pytest.raises(ValueError) as err:
        SelectiveOptimizer(model, method="id3", budget=10, total_steps=3, dense="classifier")
    assert_clear(
        str(err.value),
        r"no parameter is a candidate for method 'id3'",
        r"check the include/exclude/dense patterns and that parameters require grad",
    )


# ---------------------------------------------------------------- delta vs. model


@pytest.fixture(scope="module")
def trained():
    """(base model, delta) of a tiny BERT trained 2 steps with a dense head."""
    base = tiny_bert()
    model = copy.deepcopy(base)
    opt = SelectiveOptimizer(
        model, method="id3", budget=200, total_steps=2, lr=1e-2, dense=["classifier"]
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 100, (4, 12), generator=g)
        labels = torch.randint(0, 2, (4,), generator=g)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return base, opt.delta()


@pytest.mark.parametrize(
    ("convert", "name", "got"),
    [
        (lambda m: m.half(), "bert.embeddings.word_embeddings.weight", "float16"),
        (lambda m: m.double(), "bert.embeddings.word_embeddings.weight", "float64"),
        (lambda m: m.classifier.double(), "classifier.weight", "float64"),
    ],
    ids=["model-fp16", "model-fp64", "head-only-fp64"],
)
def test_delta_applied_to_a_model_in_another_dtype(trained, convert, name, got):
    base, delta = trained
    model = copy.deepcopy(base)
    convert(model)
    before = snapshot(model)
    with pytest.raises(DeltaError) as err:
        delta.apply_(model)
    assert_clear(
        str(err.value),
        rf"parameter {re.escape(name)} is {got}, the delta was trained in float32",
        r"load the model with (torch_)?dtype=float32",
    )
    assert_unchanged(model, before)


# Only a CPU exists on the machines these tests run on, so "a parameter on another device" is
# simulated with torch's 'meta' device: a tensor with shape and dtype but no storage, which is
# what a model built under init_empty_weights / device_map="meta" holds until its weights are
# loaded. (On a real second device, e.g. cuda, apply_ moves the values to the parameter's device
# by design; that path is not exercised here.)


def test_delta_applied_to_a_model_on_the_meta_device(trained):
    base, delta = trained
    model = copy.deepcopy(base).to("meta")
    with pytest.raises(DeltaError) as err:
        delta.apply_(model)
    assert_clear(str(err.value), r"meta", r"load|materiali[sz]e|to\(")


def test_delta_applied_to_a_model_with_one_tensor_on_the_meta_device(trained):
    base, delta = trained
    model = copy.deepcopy(base)
    model.classifier.weight = torch.nn.Parameter(model.classifier.weight.detach().to("meta"))
    before = snapshot(model)
    with pytest.raises(DeltaError) as err:
        delta.apply_(model)
    assert_clear(str(err.value), r"classifier\.weight.*meta", r"load|materiali[sz]e|to\(")
    assert_unchanged(model, before)


def test_delta_file_with_nan_in_a_replaced_tensor(trained, tmp_path):
    base, delta = trained
    delta.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "delta.safetensors"))
    tensors["classifier.weight:replace"][0, 0] = math.nan
    save_file(
        tensors, str(tmp_path / "delta.safetensors"), metadata={"format": "unmask.SparseDelta"}
    )
    config = json.loads((tmp_path / "delta_config.json").read_text())
    config["tensors_sha256"] = hashlib.sha256(
        (tmp_path / "delta.safetensors").read_bytes()
    ).hexdigest()
    (tmp_path / "delta_config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"classifier\.weight.*NaN or infinity"):
        SparseDelta.from_pretrained(tmp_path)


def test_delta_config_over_the_size_limit(trained, tmp_path):
    """A hostile delta_config.json is refused by its size, before it is parsed."""
    _, delta = trained
    delta.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "delta_config.json").read_text())
    config["metadata"]["padding"] = "x" * (16 * 2**20)
    (tmp_path / "delta_config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"delta_config\.json is larger than 16777216 bytes"):
        SparseDelta.from_pretrained(tmp_path)


# ---------------------------------------------------------------- CLI (in process)
# `tiny_model_dir` (conftest.py) is a tiny BERT backbone saved as a pretrained folder; the CSV
# written here has non-default column names.


def write_reviews(path, labels=("neg", "pos"), rows=120, header=("sentence", "sentiment")):
    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(rows):
            label = labels[i % len(labels)]
            word = rng.choice(WORDS[:4] if i % 2 else WORDS[4:8])
            writer.writerow([f"the movie was {word}", label])
    return path


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.csv")


COLUMNS = ["--text-column", "sentence", "--label-column", "sentiment"]


def cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def train_argv(model, task, out, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--task",
        str(task),
        *COLUMNS,
        "--output",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tiny_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(train_argv(tiny_model_dir, tiny_csv, out, "--steps", "2", "--budget", "5%")) == 0
    return out


def test_cli_missing_model_folder(tiny_csv, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    code, err = cli(train_argv(missing, tiny_csv, tmp_path / "out"), capsys)
    assert code == EXIT_USAGE
    assert_clear(
        err,
        rf"{re.escape(str(missing))}.*(not found|does not exist|no such)",
        r"minilm|smollm2|local folder|hub name",
    )


def test_cli_missing_data_file(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "no_such.csv"
    code, err = cli(train_argv(tiny_model_dir, missing, tmp_path / "out"), capsys)
    assert code == EXIT_USAGE
    assert_clear(
        err, rf"file not found: {re.escape(str(missing))}", r"check the path; built-in tasks"
    )


def test_cli_missing_delta_folder(tiny_model_dir, tiny_csv, tmp_path, capsys):
    missing = tmp_path / "no_such_delta"
    argv = ["eval", "--model", str(tiny_model_dir), "--task", str(tiny_csv), *COLUMNS]
    code, err = cli([*argv, "--delta", str(missing)], capsys)
    assert code == EXIT_USAGE
    assert_clear(
        err,
        rf"{re.escape(str(missing))}/delta_config\.json not found",
        r"a delta folder holds delta_config\.json and delta\.safetensors",
    )


def test_cli_resume_without_checkpoint(tiny_model_dir, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli(train_argv(tiny_model_dir, tiny_csv, out, "--budget", "5%", "--resume"), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"no checkpoint at {re.escape(str(out))}", r"run without --resume")


@pytest.mark.parametrize(
    "content",
    [
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "sentence,sentiment\ncaf\u00e9 au lait,pos\nna\u00efve,neg\n".encode("latin-1"),
        "sentence,sentiment\ngood,pos\nbad,neg\n".encode("utf-16"),
    ],
    ids=["binary-garbage", "latin-1", "utf-16"],
)
def test_cli_unreadable_csv(tiny_model_dir, tmp_path, capsys, content):
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    code, err = cli(train_argv(tiny_model_dir, path, tmp_path / "out"), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"could not read {re.escape(str(path))}", r"as UTF-8 text")


@pytest.mark.parametrize(
    ("header", "flags", "found"),
    [
        (("sentence", "sentiment"), [], r"\['sentence', 'sentiment'\]"),
        (("sentence", "score"), ["--text-column", "sentence"], r"\['sentence', 'score'\]"),
    ],
    ids=["default-names", "label-column-missing"],
)
def test_cli_csv_without_text_or_label_column(
    tiny_model_dir, tmp_path, capsys, header, flags, found
):
    path = write_reviews(tmp_path / "data.csv", header=header, rows=20)
    argv = ["train", "--model", str(tiny_model_dir), "--task", str(path), *flags]
    code, err = cli([*argv, "--output", str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"columns {found}", r"rename the columns or pass text_column=")


@pytest.mark.parametrize(
    "content",
    ["", "sentence,sentiment\n", "sentence,sentiment\n\n,\n\n"],
    ids=["zero-bytes", "header-only", "blank-rows"],
)
def test_cli_empty_dataset(tiny_model_dir, tmp_path, capsys, content):
    path = tmp_path / "data.csv"
    path.write_text(content, encoding="utf-8")
    code, err = cli(train_argv(tiny_model_dir, path, tmp_path / "out"), capsys)
    assert code == EXIT_USAGE
    assert_clear(
        err,
        rf"{re.escape(str(path))} (is empty|has no data rows)",
        r"needs a header row and at least one data row|empty dataset",
    )


@pytest.mark.parametrize("split", ["validation", "test"])
def test_cli_label_unseen_in_training(tiny_model_dir, tmp_path, capsys, split):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "sentiment", "split"])
        for i in range(20):
            writer.writerow([f"the movie was {WORDS[i % 8]}", ("neg", "pos")[i % 2], "train"])
        writer.writerow(["the movie was fine", "pos", "validation"])
        writer.writerow(["the movie was sad", "neg", "test"])
        writer.writerow(["the movie was", "neutral", split])
    code, err = cli(train_argv(tiny_model_dir, path, tmp_path / "out"), capsys)
    assert code == EXIT_USAGE
    assert_clear(
        err,
        rf"label 'neutral' appears in the {split} split but never in train "
        r"\(train labels: \['neg', 'pos'\]\)",
        r"add training examples with it or remove those rows",
    )


@pytest.mark.parametrize(
    "labels", [("bad", "good"), ("a", "b", "c")], ids=["same-count", "three-labels"]
)
def test_cli_eval_with_labels_unseen_in_training(
    trained_run, tiny_model_dir, tmp_path, capsys, labels
):
    path = write_reviews(tmp_path / "other.csv", labels=labels, rows=60)
    argv = ["eval", "--model", str(tiny_model_dir), "--task", str(path), *COLUMNS]
    code, err = cli([*argv, "--delta", str(trained_run / "delta")], capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"label.*{labels[0]}.*\['neg', 'pos'\]", r"labels? (it was )?trained on")


@pytest.mark.parametrize(
    ("flags", "what", "fix"),
    [
        (["--budget", "ten"], r"cannot read budget 'ten'", r"use a count"),
        (["--budget", "10M"], r"10,000,000 weights, but only [\d,]+", r"lower the budget"),
        (["--score-eps", "0"], r"score_eps .*got 0\.0", r"positive finite number"),
        (["--score-exp", "nan"], r"score_exp .*got nan", r"finite number"),
        (["--steps", "-3"], r"--steps .*got -3", r"positive integer"),
    ],
    ids=["budget-ten", "budget-too-large", "score-eps-0", "score-exp-nan", "steps-negative"],
)
def test_cli_bad_training_option(tiny_model_dir, tiny_csv, tmp_path, capsys, flags, what, fix):
    code, err = cli(train_argv(tiny_model_dir, tiny_csv, tmp_path / "out", *flags), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, what, fix)


def test_cli_unknown_method_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--method", "lora"])
    assert exit_.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert_clear(err, r"invalid choice: 'lora'", r"choose from")
    for name in METHODS:
        assert name in err


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--epochs", "0"]], ids=["steps", "epochs"])
def test_cli_zero_training_steps(tiny_model_dir, tiny_csv, tmp_path, capsys, flags):
    code, err = cli(train_argv(tiny_model_dir, tiny_csv, tmp_path / "out", *flags), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"{flags[0]}.*0", r"positive")


def test_cli_zero_batch_size(tiny_model_dir, tiny_csv, tmp_path, capsys):
    code, err = cli(
        train_argv(tiny_model_dir, tiny_csv, tmp_path / "out", "--batch-size", "0"), capsys
    )
    assert code == EXIT_USAGE
    assert_clear(err, r"--batch-size.*0", r"positive")
