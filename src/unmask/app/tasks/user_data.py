"""A task from the user's own data: a local CSV / TSV / JSON-lines / JSON file or a hub dataset.

Rows are mapped to examples by column names, labels to indices in sorted order of the values in
train; a ``split`` column is used as given, else the rows are split 80 / 10 / 10, seeded and
stratified (`unmask.app.tasks.splits`). Every problem is a ValueError saying what to fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from unmask.app.tasks.builtin import BUILTIN_TASKS
from unmask.app.tasks.local_files import FILE_SUFFIXES, read_rows
from unmask.app.tasks.splits import cut, eval_count, interleaved_order, pick, seeded_rng
from unmask.app.tasks.task import KINDS, Task

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


def is_path(spec: str) -> bool:
    """Whether `spec` names a local file: a known suffix, or an existing path."""
    return Path(spec).suffix.lower() in FILE_SUFFIXES or os.path.exists(spec)


def task_from_file(path: Path, columns: dict[str, str], kind: str | None, seed: int) -> Task:
    """A task from a local .csv / .tsv / .jsonl / .json file, read by `datasets` (see
    `load_task`); a row is named in error messages by its number, counting data rows from 1."""
    hint = f" (check the path; built-in tasks are {', '.join(sorted(BUILTIN_TASKS))})"
    rows = read_rows(path, not_found_hint=hint)
    places = [f"row {i}" for i in range(1, len(rows) + 1)]
    return _from_rows(path.stem, str(path), rows, places, columns, kind, seed)


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
    n_eval = eval_count(len(pairs))
    labels = [lab for _, lab in pairs] if kind == "classification" else None
    order = interleaved_order(labels, seeded_rng("file", seed), len(pairs))
    return tuple(pick(pairs, part) for part in cut(order, n_eval, n_eval))


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
    rng = seeded_rng("file", seed)

    def ordered(indices: list[int]) -> list[int]:
        # Seeded, stratified order so that train_size/eval_size prefixes are representative.
        labels = [pairs[i][1] for i in indices] if kind == "classification" else None
        return [indices[j] for j in interleaved_order(labels, rng, len(indices))]

    train = ordered(by_split["train"])
    carved = {}
    for split in ("test", "validation"):
        if not by_split[split]:
            n = eval_count(len(train))
            if len(train) <= n:
                raise ValueError(
                    f"{source}: no '{split}' rows and too few train rows to set "
                    "some aside; add them to the split column"
                )
            carved[split], train = train[:n], train[n:]
    val = carved.get("validation") or ordered(by_split["validation"])
    test = carved.get("test") or ordered(by_split["test"])
    return pick(pairs, train), pick(pairs, val), pick(pairs, test)


def task_from_hub(spec: str, columns: dict[str, str], kind: str | None, seed: int) -> Task:
    """A task from hub dataset ``NAME`` or ``NAME:CONFIG`` (needs `datasets` and internet);
    its train / validation / test splits are kept as the split column (see `load_task`)."""
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
