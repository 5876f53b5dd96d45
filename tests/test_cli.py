"""`unmask.app.cli`: the `unmask` command end to end on a tiny random model and a tiny local CSV
(nothing downloaded), and the exit code and message of every bad input it refuses."""

from __future__ import annotations

import csv
import json
import random
import re

import pytest
import torch
import transformers
from conftest import COLUMNS, WORDS, assert_clear, cli, train_argv, write_reviews
from transformers import BertForSequenceClassification as Bert
from transformers import BertTokenizerFast

from unmask import METHODS, SparseDelta
from unmask.app.checkpoints import last_checkpoint
from unmask.app.cli import EXIT_OK, EXIT_USAGE, main


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "sentiment"])
        for _ in range(120):
            positive = rng.random() < 0.5
            word = rng.choice(WORDS[:4] if positive else WORDS[4:8])
            writer.writerow([f"the movie was {word}", "pos" if positive else "neg"])
    return path


def test_train_eval_inspect_merge(tiny_model_dir, tiny_csv, tmp_path, capsys):
    out = tmp_path / "run"
    common = [
        "--model",
        str(tiny_model_dir),
        "--task",
        str(tiny_csv),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
    ]
    code = main(
        [
            "train",
            *common,
            "--budget",
            "5%",
            "--steps",
            "12",
            "--lr",
            "1e-2",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy on test" in printed and "weights changed" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 12 and 0 < report["weights_changed"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(12))
    assert all(r["num_selected"] <= r["scheduled"] for r in log)

    assert main(["eval", *common, "--delta", str(out / "delta")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(report["accuracy"])

    plot = tmp_path / "budget.png"
    assert (
        main(
            [
                "inspect",
                str(out / "delta"),
                "--log",
                str(out / "train_log.jsonl"),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "layer 00" in table and "module type" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    merged = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                "--delta",
                str(out / "delta"),
                "--output",
                str(merged),
                "--model",
                str(tiny_model_dir),
            ]
        )
        == 0
    )
    reloaded = Bert.from_pretrained(merged).eval()
    base = Bert.from_pretrained(tiny_model_dir, num_labels=2).eval()
    SparseDelta.from_pretrained(out / "delta").apply_(base)
    ids = torch.randint(5, 5 + len(WORDS), (4, 6))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, base(input_ids=ids).logits)


def test_config_file_and_flag_override(tiny_model_dir, tiny_csv, tmp_path):
    config = tmp_path / "job.toml"
    config.write_text(
        f'model = "{tiny_model_dir}"\ntask = "{tiny_csv}"\n'
        'text_column = "sentence"\nlabel_column = "sentiment"\n'
        'method = "pafi"\nbudget = "2%"\nsteps = 3\n'
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--output",
                str(out),
                "--no-progress",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "pafi" and report["steps"] == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--task", "missing.csv"], "not found"),
        (["inspect", "no/such/delta"], "not found"),
        (["eval", "--delta", "no/such/delta", "--task", "addition", "--model", "x"], ""),
    ],
)
def test_bad_input_exits_2_with_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_yaml_config(tiny_model_dir, tiny_csv, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ntask: {tiny_csv}\ntext-column: sentence\n"
        "label-column: sentiment\nmethod: random\nbudget: 3%\nsteps: 2\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "random" and report["config"]["budget"] == "3%"


def test_unknown_config_key(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("lerning_rate = 0.1\n")
    assert main(["train", "--config", str(config)]) == EXIT_USAGE
    assert "unknown option" in capsys.readouterr().err


def test_causal_lm_prompt_answer(tmp_path, capsys):
    """Generation tasks: loss on the answer only, exact-match evaluation, merge to a causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), eos_token="[SEP]").save_pretrained(
        folder
    )
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            pad_token_id=0,
            eos_token_id=3,
        )
    ).save_pretrained(folder)
    data = tmp_path / "qa.jsonl"
    rng = random.Random(0)
    with open(data, "w") as f:
        for _ in range(60):
            word = rng.choice(WORDS[:8])
            f.write(json.dumps({"prompt": f"the movie was {word}", "answer": word}) + "\n")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(folder),
                "--task",
                str(data),
                "--steps",
                "4",
                "--eval-steps",
                "2",
                "--budget",
                "10%",
                "--lr",
                "1e-2",
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["kind"] == "generation" and 0.0 <= report["exact_match"] <= 1.0
    # evaluation during training generates answers on the validation split
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_exact_match" in r] == [1, 3]
    assert report["best"]["best_step"] in (2, 4)
    assert SparseDelta.from_pretrained(out / "best_delta").metadata["best_step"] in (2, 4)
    merged = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                "--delta",
                str(out / "delta"),
                "--output",
                str(merged),
                "--model",
                str(folder),
            ]
        )
        == 0
    )
    reloaded = LlamaForCausalLM.from_pretrained(merged)
    base = LlamaForCausalLM.from_pretrained(folder)
    SparseDelta.from_pretrained(out / "delta").apply_(base)
    for p, q in zip(reloaded.parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q)


def test_answer_only_loss_masks_prompt_tokens(tiny_model_dir):
    from unmask.app.tasks import Task
    from unmask.app.tasks.batches import encode

    tokenizer = BertTokenizerFast.from_pretrained(tiny_model_dir, eos_token="[SEP]")
    task = Task("t", "generation", [], [], [], None, "exact_match")
    batch = encode(
        tokenizer,
        task,
        [
            {"prompt": "the movie was", "answer": "good"},
            {"prompt": "the", "answer": "movie was bad"},
        ],
        32,
    )
    labels = batch["labels"]
    # Row 0: 3 prompt tokens then "good" + eos; row 1: 1 prompt token, 3 answer tokens + eos.
    assert (labels[0] != -100).sum() == 2 and (labels[1] != -100).sum() == 4
    answer_ids = labels[0][labels[0] != -100].tolist()
    assert answer_ids == tokenizer("good", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert batch["attention_mask"].sum(1).tolist() == [5, 5]


def test_sigterm_writes_checkpoint_and_resume_matches_uninterrupted(
    tiny_model_dir, tiny_csv, tmp_path
):
    import os
    import signal
    import subprocess
    import sys
    import time

    common = [
        "--model",
        str(tiny_model_dir),
        "--task",
        str(tiny_csv),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
        "--budget",
        "5%",
        "--steps",
        "100",
        "--lr",
        "1e-2",
        "--no-progress",
    ]
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "unmask.app.cli", "train", *common, "--output", str(interrupted)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log = interrupted / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"--resume" in err
    checkpoint = last_checkpoint(interrupted)
    assert (checkpoint / "optimizer.pt").is_file() and not (interrupted / "delta").exists()
    # The checkpoint holds the delta, not a copy of the model.
    assert (checkpoint / "unmask_delta").is_dir()
    assert not (checkpoint / "model.safetensors").exists()

    assert main(["train", *common, "--output", str(interrupted), "--resume"]) == 0
    reference = tmp_path / "reference"
    assert main(["train", *common, "--output", str(reference)]) == 0
    a = SparseDelta.from_pretrained(interrupted / "delta")
    b = SparseDelta.from_pretrained(reference / "delta")
    assert a.sparse.keys() == b.sparse.keys()
    for name, (idx, val) in a.sparse.items():
        assert torch.equal(idx, b.sparse[name][0]) and torch.equal(val, b.sparse[name][1])
    for name, value in a.replace.items():
        assert torch.equal(value, b.replace[name])
    lines = (interrupted / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(100))


def test_persistent_nonfinite_gradients_stop_with_exit_4(
    tiny_model_dir, tiny_csv, tmp_path, capsys
):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--task",
            str(tiny_csv),
            "--text-column",
            "sentence",
            "--label-column",
            "sentiment",
            "--budget",
            "5%",
            "--steps",
            "40",
            "--lr",
            "1e30",
            "--save-every",
            "1",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 4
    assert "max_nonfinite_steps" in capsys.readouterr().err
    checkpoint = last_checkpoint(out)
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert torch.isfinite(state["delta"]).all() and torch.isfinite(state["base"]).all()
    delta = SparseDelta.from_pretrained(checkpoint / "unmask_delta")
    assert delta.replace and all(torch.isfinite(v).all() for v in delta.replace.values())


# ---------------------------------------------------------------- bad input exits 2
# Each refusal exits with EXIT_USAGE and a message that says what was wrong and how to fix it
# (`assert_clear`). `tiny_model_dir` is a tiny BERT backbone saved as a pretrained folder;
# `reviews_csv` has non-default column names (`COLUMNS`).


def test_cli_missing_model_folder(reviews_csv, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    code, err = cli(train_argv(missing, reviews_csv, tmp_path / "out"), capsys)
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


def test_cli_missing_delta_folder(tiny_model_dir, reviews_csv, tmp_path, capsys):
    missing = tmp_path / "no_such_delta"
    argv = ["eval", "--model", str(tiny_model_dir), "--task", str(reviews_csv), *COLUMNS]
    code, err = cli([*argv, "--delta", str(missing)], capsys)
    assert code == EXIT_USAGE
    assert_clear(
        err,
        rf"{re.escape(str(missing))}/delta_config\.json not found",
        r"a delta folder holds delta_config\.json and delta\.safetensors",
    )


# What a data file that cannot be read as a table is refused with; {path} is the file's path.
UNREADABLE = (r"could not read {path}", r"as UTF-8 text")
EMPTY = (
    r"{path} (is empty|has no data rows)",
    r"needs a header row and at least one data row|empty dataset",
)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, UNREADABLE),
        ("sentence,sentiment\ncaf\u00e9 au lait,pos\nna\u00efve,neg\n".encode("latin-1"),
         UNREADABLE),
        ("sentence,sentiment\ngood,pos\nbad,neg\n".encode("utf-16"), UNREADABLE),
        (b"", EMPTY),
        (b"sentence,sentiment\n", EMPTY),
        (b"sentence,sentiment\n\n,\n\n", EMPTY),
    ],
    ids=["binary-garbage", "latin-1", "utf-16", "zero-bytes", "header-only", "blank-rows"],
)  # fmt: skip
def test_cli_unreadable_or_empty_data_file_exits_2(
    tiny_model_dir, tmp_path, capsys, content, message
):
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    code, err = cli(train_argv(tiny_model_dir, path, tmp_path / "out"), capsys)
    assert code == EXIT_USAGE
    what, fix = message
    assert_clear(err, what.format(path=re.escape(str(path))), fix)


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
        (["--budget", "0,1%"], r"cannot read budget '0,1%'", r"write decimals with a dot"),
        (["--method", "id3", "--score-eps", "0"], r"score_eps .*got 0\.0",
         r"positive finite number"),
        (["--method", "id3", "--score-exp", "nan"], r"score_exp .*got nan", r"finite number"),
        (["--steps", "-3"], r"--steps .*got -3", r"positive integer"),
        (["--steps", "0"], r"--steps.*0", r"positive"),
        (["--epochs", "0"], r"--epochs.*0", r"positive"),
        (["--batch-size", "0"], r"--batch-size.*0", r"positive"),
        *[
            (flags, rf"{flags[0]} must be a finite number >= 0, got", r"finite number")
            for flags in [["--lr", "inf"], ["--lr", "nan"], ["--weight-decay", "nan"],
                          ["--weight-decay", "-1"]]
        ],
        (["--max-length", "33"], r"--max-length 33 is more than the model's 32 positions",
         r"give --max-length 32 or less"),
        (["--max-length", "-1"], r"--max-length must be a positive integer", r"positive integer"),
        (["--epochs", "1e309"], r"--epochs must be a positive finite number, got inf",
         r"positive finite number"),
        (["--seed", str(2**64)], r"--seed must be an integer from -2\*\*63 to 2\*\*64 - 1",
         r"an integer from"),
        (["--save-every", "-1"], r"--save-every must be an integer >= 0", r"integer >= 0"),
        (
            ["--steps", "2", "--train-size", "1"],
            r"training split of task 'reviews' has examples of only 1 label \['(neg|pos)'\]",
            r"at least 2 distinct labels: use more training examples \(--train-size\)",
        ),
    ],
    ids=["budget-ten", "budget-too-large", "budget-decimal-comma", "score-eps-0",
         "score-exp-nan", "steps-negative", "steps-0", "epochs-0", "batch-size-0", "lr-inf",
         "lr-nan", "weight-decay-nan", "weight-decay-negative", "max-length-above-positions",
         "max-length-negative", "epochs-inf", "seed-2**64", "save-every-negative",
         "train-size-keeping-one-label"],
)  # fmt: skip
def test_cli_bad_training_option_exits_2_before_training(
    tiny_model_dir, reviews_csv, tmp_path, capsys, flags, what, fix
):
    out = tmp_path / "out"
    code, err = cli(train_argv(tiny_model_dir, reviews_csv, out, *flags), capsys)
    assert code == EXIT_USAGE, err
    assert_clear(err, what, fix)
    assert "Traceback" not in err
    assert not (out / "train_log.jsonl").exists()  # refused before the first step


def test_cli_single_label_data_exits_2(tiny_model_dir, tmp_path, capsys):
    path = write_reviews(tmp_path / "one.csv", rows=30, labels=("pos",))
    out = tmp_path / "out"
    code, err = cli(train_argv(tiny_model_dir, path, out, "--steps", "2"), capsys)
    assert code == EXIT_USAGE
    assert_clear(err, r"every training example has the label 'pos'", r"at least 2 distinct")
    assert not (out / "report.json").exists()


def test_cli_unknown_method_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--method", "id4"])
    assert exit_.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert_clear(err, r"invalid choice: 'id4'", r"choose from")
    for name in METHODS:
        assert name in err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("job.yaml", "lr: 1e-2\n", r"lr \(--lr\) must be a number, got '1e-2' \(str\).*1\.0e-2"),
        ("job.toml", 'steps = "5"\n', r"steps \(--steps\) must be an integer or unset, got '5'"),
        ("job.toml", "batch_size = 2.5\n", r"batch_size \(--batch-size\) must be an integer"),
    ],
    ids=["yaml-lr-string", "toml-steps-string", "toml-batch-size-float"],
)
def test_config_values_of_the_wrong_type_exit_2(
    tiny_model_dir, reviews_csv, tmp_path, capsys, name, text, message
):
    (tmp_path / name).write_text(text)
    config = ["--budget", "5%", "--config", str(tmp_path / name)]
    code, err = cli(train_argv(tiny_model_dir, reviews_csv, tmp_path / "run", *config), capsys)
    assert code == EXIT_USAGE, err
    assert re.search(message, err), err


def test_flags_equal_to_their_defaults_override_the_config_file(
    tiny_model_dir, reviews_csv, tmp_path
):
    config = tmp_path / "job.toml"
    config.write_text(
        f'model = "{tiny_model_dir}"\ntask = "{reviews_csv}"\n'
        'text_column = "sentence"\nlabel_column = "sentiment"\n'
        'method = "pafi"\nbudget = "2%"\nsteps = 3\nlr = 0.5\nseed = 7\nprogress = false\n'
    )
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--output", str(out), "--steps", "2"]
    # Each of these flags equals its default (see `unmask train --help`).
    argv += ["--lr", "0.001", "--method", "id3", "--seed", "0"]
    assert main(argv) == EXIT_OK
    used = json.loads((out / "report.json").read_text())["config"]
    assert (used["lr"], used["method"], used["seed"], used["steps"]) == (0.001, "id3", 0, 2)
    assert used["budget"] == "2%"  # not given on the command line: the file's value
    assert used["progress"] is False  # no --no-progress flag: the file's value stays


# ---------------------------------------------------------------- merge


def test_cli_merge_onto_an_existing_file_exits_2(trained_run, tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "merged.bin"
    target.write_bytes(b"keep me")
    argv = ["merge", "--delta", str(trained_run / "delta"), "--model", str(tiny_model_dir)]
    code, err = cli([*argv, "--output", str(target)], capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"--output {re.escape(str(target))} exists and is not a folder", r"new path")
    assert target.read_bytes() == b"keep me"


def test_cli_merge_checks_that_the_files_were_written(
    trained_run, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    # transformers' save_pretrained logs some failures and returns as if it had saved.
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", lambda *a, **k: None)
    out = tmp_path / "merged"
    argv = ["merge", "--delta", str(trained_run / "delta"), "--model", str(tiny_model_dir)]
    code, err = cli([*argv, "--output", str(out)], capsys)
    assert code == EXIT_USAGE
    assert_clear(
        err,
        rf"saving the merged model to {re.escape(str(out))} failed: config\.json and the "
        r"weights .*not written",
        r"writable.*run merge again",
    )


@pytest.mark.parametrize(
    ("labels", "what"),
    [
        ([str(i) for i in range(500_000)], r"list of 2 to 100,000 labels, got 500000"),
        (["a", "b", "c"], r"has 3 labels, but no tensor of the delta has that many rows"),
        ([0, 1], r"must be strings"),
        (["a", "a"], r"repeat a label"),
        ("ab", r"must be a list"),
        (["only"], r"list of 2 to"),
    ],
    ids=["half-a-million", "more-than-the-head", "not-strings", "repeated", "a-string", "one"],
)
def test_merge_checks_label_metadata_before_building_a_model(
    head_delta, labels, what, tmp_path, monkeypatch, capsys
):
    head_delta.metadata["label_names"] = labels
    head_delta.save_pretrained(tmp_path / "d")

    def never(*args, **kwargs):
        raise AssertionError("a model was built before the label metadata was checked")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", never)
    out = tmp_path / "merged"
    assert main(["merge", "--delta", str(tmp_path / "d"), "--output", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert_clear(err, what, r"corrupt")
    assert not out.exists()


def test_csv_and_jsonl_of_the_same_rows_train_the_same_delta(
    tiny_model_dir, tiny_csv, tmp_path, capsys, datasets_cache
):
    with open(tiny_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    deltas = {}
    for path in (tiny_csv, jsonl):
        out = tmp_path / path.suffix[1:]
        argv = train_argv(tiny_model_dir, path, out, "--steps", "3", "--budget", "2%")
        code, err = cli(argv, capsys)
        assert code == EXIT_OK, err
        report = json.loads((out / "report.json").read_text())
        assert report["task"]["train"] == 96 and report["task"]["eval"] == 12
        deltas[path.suffix] = SparseDelta.from_pretrained(out / "delta")
    for builder in ("csv", "json"):  # both files were read by datasets
        assert any((datasets_cache / builder).rglob("*.arrow"))
    csv_delta, jsonl_delta = deltas[".csv"], deltas[".jsonl"]
    assert csv_delta.num_weights > 0 and set(csv_delta.sparse) == set(jsonl_delta.sparse)
    for name, (indices, values) in csv_delta.sparse.items():
        assert torch.equal(indices, jsonl_delta.sparse[name][0])
        assert torch.equal(values, jsonl_delta.sparse[name][1])
