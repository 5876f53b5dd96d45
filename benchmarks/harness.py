"""What every benchmark shares: the training loop, the LoRA builder, a child process per
measured run, its peak RSS, results files.

A benchmark measures each variant in a fresh interpreter (``python -m benchmarks.NAME --child``)
that prints one result line, so that its peak RSS is its own. This module imports only the
standard library at module level: a parent that held torch would inflate every child's peak,
because on Linux a child's ``ru_maxrss`` starts from the high-water mark of the image it was
forked from. Anything that imports torch or unmask is imported inside the functions that need
it, in the child, or in the parent only after its last child has finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainingLog:
    """One entry per step: its loss, the whole step's seconds and `optimizer.step()`'s."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    optimizer_seconds: list[float] = field(default_factory=list)


def train(
    model: Any,
    optimizer: Any,
    batches: Iterable[dict[str, Any]],
    after_backward: Callable[[], None] | None = None,
) -> TrainingLog:
    """One step per batch, in order: ``model(**batch).loss``, backward, step, zero_grad.

    The benchmarks' one training loop. A batch is drawn from `batches` before its step's clock
    starts, so tokenising it lazily is not timed. A step's seconds run from the forward to the
    end of ``zero_grad()``; `after_backward` is called within them, between backward and step,
    while the gradients are at their largest. The model's mode (train/eval) is the caller's.
    """
    log = TrainingLog()
    for batch in batches:
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if after_backward is not None:
            after_backward()
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        optimizer.zero_grad()
        t3 = time.perf_counter()
        log.step_seconds.append(t3 - t0)
        log.optimizer_seconds.append(t2 - t1)
        log.losses.append(loss.item())
    return log


def with_lora(model: Any, targets: Iterable[str], classifier: bool, rank: int = 8) -> Any:
    """`model` wrapped by peft LoRA of `rank` (alpha 2 x rank, no dropout), for training.

    Adapts every module whose last name part is one of `targets` (e.g. "query", "value",
    "q_proj", "v_proj"; names the model lacks are ignored). `classifier`: peft's SEQ_CLS task
    type, which also trains a copy of the classification head; else CAUSAL_LM.
    """
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=sorted(names & set(targets)),
        task_type="SEQ_CLS" if classifier else "CAUSAL_LM",
    )
    return get_peft_model(model, config)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable in nested dicts/lists/tuples of `obj`."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def default_heads(hidden: int) -> int:
    """12 heads as in MiniLM when the width allows it, else the most heads <= 12 that divide it."""
    return next(h for h in range(12, 0, -1) if hidden % h == 0)


def emit_result(marker: str, result: dict[str, Any]) -> None:
    """Print a child's result as the one line `run_child` reads: `marker` then JSON."""
    sys.stdout.write(marker + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_child(
    module: str,
    args: list[str],
    marker: str,
    threads: int,
    timeout_s: float,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Run ``python -m module *args`` from the repository root; return its parsed result line.

    The child gets `threads` OpenMP/MKL threads. A timeout, a non-zero exit or a missing result
    line becomes ``{"error": ...}``; the child's stderr is passed through.
    """
    cmd = [python, "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"child timed out after {timeout_s:.0f} s"}
    sys.stderr.write(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker)]
    if proc.returncode != 0 or not lines:
        last = proc.stderr.strip().splitlines()[-1:] or ["no output on stderr"]
        return {"error": f"child exited with status {proc.returncode}: {last[0]}"}
    return json.loads(lines[-1][len(marker) :])


def machine_info(results: dict[str, dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Where the run happened; torch's version comes from the children's `results`
    (`baseline`'s if it reported one)."""
    try:
        commit: str | None = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    torch_versions = {
        name: r["torch_version"] for name, r in results.items() if "torch_version" in r
    }
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch_version": torch_versions.get(baseline) or next(iter(torch_versions.values()), None),
        "torch_versions": torch_versions,
        "git_commit": commit,
    }


def check_run_length(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error unless 0 <= --warmup < --steps <= --total-steps."""
    if args.total_steps < args.steps:
        parser.error("need --total-steps >= --steps")
    if not 0 <= args.warmup < args.steps:
        parser.error("need 0 <= --warmup < --steps")


def chosen_variants(
    parser: argparse.ArgumentParser, text: str, variants: tuple[str, ...]
) -> list[str]:
    """The variants named in the comma list `text`, in `variants`' order (the order they run);
    a usage error if it names none or one that is not in `variants`."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(variants))
    if unknown or not names:
        parser.error(f"unknown or no variants: {unknown}; choose from {', '.join(variants)}")
    return [v for v in variants if v in names]


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or "n/a" for None and NaN (a table cell)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def write_text(path: Path, text: str) -> None:
    """Write a results file atomically (`atomic_write_text`; mode from the umask).

    Imports unmask, hence torch: a parent calls it only after its last child has finished.
    """
    from unmask.store.files import atomic_write_text

    atomic_write_text(path, text)
