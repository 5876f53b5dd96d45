"""The rows of a local .csv / .tsv / .jsonl / .json file, read by `datasets` (its "csv" and "json"
builders), or a ValueError that names the file and, where it can be found, the line at fault.

CSV and TSV values are read as strings, exactly as written (no number or NA inference: "007"
stays "007", "NA" stays "NA"); JSON values keep their JSON types. `datasets` caches what it reads
under its cache folder (``HF_DATASETS_CACHE``, by default in ``~/.cache/huggingface``), keyed by
the file's path and modification time, so an edited file is read again.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# suffix -> format; the csv and tsv formats go to the "csv" builder, jsonl and json to "json"
FILE_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".jsonlines": "jsonl",
    ".json": "json",
}
_DELIMITERS = {"csv": ",", "tsv": "\t"}


def read_rows(path: Path, not_found_hint: str = "") -> list[dict[str, Any]]:
    """The data rows of local file `path`, in file order, as dicts keyed by column name.

    CSV/TSV: a header row names the columns (names stripped of spaces; an empty name becomes
    ``column_<n>``, counting from 1); rows whose every value is blank are skipped. JSON: one
    object per line, or one array of objects. Raises ValueError naming the file for a missing,
    unreadable, empty or malformed file (with the line or item where it can be found), and when
    the `datasets` package is not installed. `not_found_hint` is appended to "file not found".
    """
    fmt = _check_file(path, not_found_hint)
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"reading {path} needs the `datasets` package: pip install datasets "
            "(or pip install 'unmask[hf]')"
        ) from None
    options: dict[str, Any] = {}
    if fmt in _DELIMITERS:
        names = _csv_header(path, _DELIMITERS[fmt])
        options = {
            "sep": _DELIMITERS[fmt],
            "header": 0,  # the file's header row is replaced by the cleaned-up `names`
            "column_names": names,
            "features": datasets.Features({n: datasets.Value("string") for n in names}),
            "keep_default_na": False,
        }
    try:
        with _quiet(datasets):
            loaded = datasets.load_dataset(
                "csv" if fmt in _DELIMITERS else "json",
                data_files=str(path.resolve()),
                split="train",
                **options,
            )
    except Exception as exc:  # datasets wraps pandas, pyarrow and decoding errors alike
        raise _load_error(path, fmt, exc) from exc
    rows = loaded.to_list()
    if fmt in _DELIMITERS:
        rows = [r for r in rows if any(v is not None and v.strip() for v in r.values())]
    if not rows:
        raise ValueError(f"{path} has no data rows (empty dataset)")
    return rows


def _check_file(path: Path, not_found_hint: str) -> str:
    """The format of `path` after the checks that need no parsing: it exists, is a file of a
    known suffix, and holds more than white space."""
    if not path.exists():
        raise ValueError(f"file not found: {path}{not_found_hint}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a .csv, .tsv, .jsonl or .json file")
    fmt = FILE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv, .jsonl or .json"
        )
    with open(path, "rb") as f:  # stops at the first byte that is not white space
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return fmt
    raise ValueError(f"{path} is empty; it needs a header row and at least one data row")


def _csv_header(path: Path, delimiter: str) -> list[str]:
    """The column names of a CSV/TSV file's header row, stripped; empty ones named by position."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next((row for row in csv.reader(f, delimiter=delimiter) if row), [])
    except UnicodeDecodeError as exc:
        raise ValueError(f"could not read {path} as UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise ValueError(f"could not parse {path} as CSV in its header row: {exc}") from None
    if not any(name.strip() for name in header):
        raise ValueError(f"{path} has no header row naming its columns")
    names = [name.strip() or f"column_{i}" for i, name in enumerate(header, start=1)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"{path}: the header row names column(s) {twice} more than once; give every "
            "column a name of its own"
        )
    return names


@contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No "Generating train split" progress bars while a local file is read."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_error(path: Path, fmt: str, exc: Exception) -> ValueError:
    """What `datasets` failing on `path` means for the user, the line at fault included."""
    causes = []
    cause: BaseException | None = exc
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, UnicodeDecodeError) for c in causes):
        bad = next(c for c in causes if isinstance(c, UnicodeDecodeError))
        return ValueError(f"could not read {path} as UTF-8 text: {bad}")
    if "corresponds to no data" in str(exc):  # the train split came out empty
        return ValueError(f"{path} has no data rows (empty dataset)")
    if fmt not in _DELIMITERS:
        problem = _json_problem(path)
        if problem is not None:
            return ValueError(f"{path} {problem}")
    root = causes[-1]
    what = "CSV" if fmt == "csv" else fmt.upper()
    return ValueError(f"could not parse {path} as {what}: {type(root).__name__}: {str(root)[:300]}")


def _json_problem(path: Path) -> str | None:
    """Where and why `path` is not JSON lines of objects (or one array of objects), e.g.
    "line 2 is not valid JSON (Expecting value)"; None when no problem is found.

    Run only after `datasets` has refused the file: its own messages count rows within a block
    of the file, not lines.
    """
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            return f"is not valid JSON ({_why(exc)})"
        bad = next((i for i, row in enumerate(items) if not isinstance(row, dict)), None)
        return (
            None if bad is None else f"item {bad} is not a JSON object; expected a list of objects"
        )
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            return (
                f"line {number} is not valid JSON ({_why(exc)}); expected one JSON object per line"
            )
        if not isinstance(row, dict):
            return (
                f"line {number} is a JSON {type(row).__name__}, expected an object like "
                '{"text": ..., "label": ...}'
            )
    return None


def _why(exc: Exception) -> str:
    return exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
