"""Fine-tuning tasks as plain Python lists: built-in real/synthetic tasks, local files, hub sets.

A `Task` holds three splits of examples:

- classification: ``{"text": str, "label": int}``, labels ``0 .. len(label_names) - 1``; metric
  ``"accuracy"``.
- generation: ``{"prompt": str, "answer": str}``; the model is trained on ``prompt + answer``
  (concatenated exactly as given, loss on the answer) and scored by ``"exact_match"``: the
  generated continuation of ``prompt``, stripped, equals ``answer.strip()``.

Where a task comes from, one module each: `task` (the Task itself), `builtin` (polarity,
uncertainty, addition, plurals: data from the pinned registry packages in `unmask.app.resources`,
nothing committed), `user_data` (local files and hub datasets: rows to a Task), `local_files`
(a local file's rows, read by `datasets`), `splits` (the seeded, stratified splitting they
share); `batches` and `evaluation` turn examples into model inputs and scores.

Splits are fixed by the seed alone: ``train_size`` and ``eval_size`` only take a prefix of the
train split, or of the validation and test splits, so the test set never changes when the
training set is shrunk, and a smaller eval set is a subset of the full one. Each split is in a
seeded order in which classes are interleaved evenly, so every prefix is stratified; shuffle the
training examples per epoch as usual.
"""

from __future__ import annotations

from pathlib import Path

from unmask.app.tasks.builtin import BUILDERS, BUILTIN_TASKS
from unmask.app.tasks.task import KINDS, METRICS, Task, TaskKind
from unmask.app.tasks.user_data import is_path, task_from_file, task_from_hub

__all__ = ["BUILTIN_TASKS", "KINDS", "METRICS", "Task", "TaskKind", "load_task"]


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

    spec: a name in BUILTIN_TASKS; a path to a ``.csv`` / ``.tsv`` (header row, UTF-8; values
        read as strings) or ``.jsonl`` / ``.json`` (JSON lines, or one JSON array of objects)
        file; otherwise a hub dataset ``NAME`` or ``NAME:CONFIG``. Files and hub sets are read
        by the `datasets` package (hub sets also need internet or its cache).
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
        task = BUILDERS[spec](seed)
        if kind is not None and kind != task.kind:
            raise ValueError(f"built-in task {spec!r} is a {task.kind} task, not {kind}")
    elif is_path(spec):
        task = task_from_file(Path(spec), columns, kind, seed)
    else:
        task = task_from_hub(spec, columns, kind, seed)
    if train_size is not None:
        task.train = task.train[:train_size]
    if eval_size is not None:
        task.validation = task.validation[:eval_size]
        task.test = task.test[:eval_size]
    return task
