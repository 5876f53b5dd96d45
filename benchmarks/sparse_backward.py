"""Sparse-backward benchmark: whole-step time and peak RSS with and without `sparse_backward`.

What is measured
----------------
Grid mode (the default) trains the MiniLM shape and the 135M Llama (SmolLM2) shape of
`benchmarks.memory` (random init from configs, nothing downloaded) on random tokens, for every
batch in ``--batches`` (default 4 and 16, x ``--seq-len`` 64) and every budget in ``--budgets``
(default 0.1% and 1%). Variants, each in its own fresh child process, in this order:

- ``adamw``: dense AdamW (full fine-tuning); ``lora``: peft LoRA r 8 on the query and value
  projections (both once per model and batch: they do not depend on the budget);
- ``random``, ``pafi``: static masks, dense backward (``freeze_unselected=True``, so tensors
  without a selected weight get no gradient), and ``random-sparse``, ``pafi-sparse`` with
  ``sparse_backward=True``;
- ``random-sparse-lora-modules``: ``random-sparse`` with the same number of weights B drawn
  only from the weights of LoRA's target modules (everything else frozen, as peft freezes it):
  selective fine-tuning where LoRA trains;
- ``id3``, ``id3-sparse``: ID3 with T = ``--id3-total-steps`` (default: the warm-up steps), so
  that every measured step comes after its last unmask: this measures ID3 once its mask is
  final, where the sparse backward applies (the unmasking steps run the dense path);
- ``id3-every10``: ID3 with ``unmask_every=10``, ``sparse_backward=True`` and T = 20, run for
  ``--warmup`` + 10 steps: the 10 measured steps hold one dense unmask step (step 10) and nine
  sparse ones, and its step time is their mean (the cost of a whole cycle), not the median.

With ``--rounds R`` every model and batch runs R rounds in turn (the references, then each
budget's variants), and every number is the median over the rounds; a ratio is taken against
its own round's references, so the shared machine's slow drifts cancel.

Reported per variant: the median whole step (forward, backward, ``opt.step()``,
``opt.zero_grad()``) after ``--warmup`` steps, peak RSS (``ru_maxrss``), both as ratios to
``adamw`` and ``lora`` of the same model and batch measured in the same session; the weight-
gradient entries computed per step (measured: ``opt.sparse_entries_computed`` for the sparse
tensors plus the numel of every parameter whose ``.grad`` was formed) over B, the weights that
train (1 when only their gradients are computed; over a run of T steps this is the measured
entries / (T·B)); and the share of the step spent computing the
selected entries (``linear_entry_grads`` and ``embedding_entry_grads``, timed in the child).

Crossover mode (``--crossover``) times, in one process, the dense weight gradient ``dYᵀX`` of
the 135M shape's Linear sizes against ``linear_entry_grads`` at a range of selected fractions,
for T = 256 and 1024 tokens, and reports the largest fraction at which the sparse path is
still faster for every shape: the value behind `unmask.optimize.sparse_backward.MAX_DENSITY`.

The machine is shared with other work: run under ``flock /tmp/bench.lock`` and read the
numbers as one noisy session's.

How to run
----------
::

    flock /tmp/bench.lock .venv/bin/python -m benchmarks.sparse_backward \\
        --out benchmarks/results/sparse_backward
    flock /tmp/bench.lock .venv/bin/python -m benchmarks.sparse_backward --crossover \\
        --out benchmarks/results/sparse_backward

Quick smoke run::

    .venv/bin/python -m benchmarks.sparse_backward --models minilm --layers 1 --hidden 32 \\
        --vocab 100 --batches 2 --budgets 1% --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    emit_result,
    fmt,
    machine_info,
    peak_rss_mb,
    run_child,
    write_text,
)
from benchmarks.memory import (
    LORA_TARGETS,
    PRESETS,
    Config,
    build_model,
    build_optimizer,
    make_batches,
)

RESULT_MARKER = "SPARSE_BACKWARD_RESULT "
REFERENCES = ("adamw", "lora")
SELECTIVE = (
    "random", "random-sparse", "random-sparse-lora-modules", "pafi", "pafi-sparse", "id3",
    "id3-sparse", "id3-every10",
)  # fmt: skip
LORA_MODULES = "-lora-modules"  # suffix: only LoRA's target modules' weights are candidates
EVERY = 10  # id3-every10's unmask_every: its measured steps are one whole cycle of EVERY steps
LINEAR_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): 135M
CROSSOVER_FRACTIONS = [0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2]


# --------------------------------------------------------------------------- child side


def _timed_kernels(seconds: list[float]) -> None:
    """Wrap the sparse backward's kernels so that their time is added to seconds[0]."""
    from unmask.optimize import entry_grads

    for name in ("linear_entry_grads", "embedding_entry_grads"):
        inner = getattr(entry_grads, name)

        def timed(*args: Any, _inner: Any = inner) -> Any:
            t0 = time.perf_counter()
            try:
                return _inner(*args)
            finally:
                seconds[0] += time.perf_counter() - t0

        setattr(entry_grads, name, timed)


def _selective(variant: str, model: Any, cfg: Config, id3_steps: int) -> tuple[Any, dict]:
    import torch

    import unmask

    base = variant.removesuffix(LORA_MODULES)
    method = base.removesuffix("-sparse").removesuffix(f"-every{EVERY}")
    kwargs: dict[str, Any] = {"method": method, "budget": cfg.budget, "lr": cfg.lr}
    kwargs["sparse_backward"] = base != method
    if variant.endswith(LORA_MODULES):
        # Where LoRA trains: the same B weights (a count, of the whole model), drawn only from
        # the weights of LoRA's target modules; everything else frozen, as peft freezes it.
        num_weights = sum(p.numel() for p in model.parameters())
        kwargs["budget"] = unmask.resolve_budget(cfg.budget, num_weights)
        targets = "|".join(LORA_TARGETS[cfg.model])
        for name, p in model.named_parameters():
            p.requires_grad_(bool(re.search(rf"\.({targets})\.weight$", name)))
    kwargs["freeze_unselected"] = True  # the dense path's best: no gradient for idle tensors
    if variant == "id3-every10":
        # Two cycles: steps 0 and EVERY unmask half the budget each (dense), the others run
        # the sparse backward on the mask so far.
        kwargs["unmask_every"] = EVERY
        kwargs["total_steps"] = 2 * EVERY
    elif method == "id3":
        kwargs["total_steps"] = id3_steps
    opt = unmask.SelectiveOptimizer(model, optimizer=torch.optim.AdamW, **kwargs)
    return opt, kwargs


def run_variant(variant: str, cfg: Config, id3_steps: int) -> dict[str, Any]:
    """Train cfg.steps steps of `variant`; its measurements."""
    import torch

    torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    model.train()
    if variant == "id3-every10":
        # Exactly one unmask step (a multiple of EVERY) among the EVERY measured ones.
        cfg = replace(cfg, steps=cfg.warmup + EVERY)
    batches = make_batches(cfg)
    if variant in REFERENCES:
        model, opt, info = build_optimizer(variant, model, cfg)
    else:
        opt, info = _selective(variant, model, cfg, id3_steps)
    kernel = [0.0]
    _timed_kernels(kernel)
    steps, entries, kernel_s = [], [], []
    for batch in batches:
        before_entries = getattr(opt, "sparse_entries_computed", 0)
        before_kernel = kernel[0]
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        dense = sum(p.numel() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - t0)
        entries.append(dense + getattr(opt, "sparse_entries_computed", 0) - before_entries)
        kernel_s.append(kernel[0] - before_kernel)
    measured = slice(cfg.warmup, None)
    median = statistics.median(steps[measured])
    if variant == "id3-every10":
        # A cycle's dense step is one of EVERY: its cost is the mean over a whole cycle.
        measured = slice(cfg.warmup, cfg.warmup + EVERY)
        median = statistics.fmean(steps[measured])
    return {
        "median_step_s": median,
        "peak_rss_mb": peak_rss_mb(),
        "gradient_entries_per_step": statistics.median(entries[measured]),
        "tokens_per_step": cfg.batch * cfg.seq_len,
        "num_selected": int(getattr(opt, "num_selected", 0)) or None,
        "sparse_tensors": len(getattr(opt, "sparse_names", [])),
        "kernel_share": statistics.median(kernel_s[measured]) / median,
        "num_weights": sum(p.numel() for p in model.parameters()),
        "last_loss": float(loss.detach()),
        "optimizer_info": {k: v for k, v in info.items() if k != "lr"},
        "torch_version": torch.__version__,
        "step_samples_s": steps,
    }


def child_main(variant: str, cfg: Config, id3_steps: int, max_density: float | None) -> int:
    if max_density is not None:
        from unmask.optimize import sparse_backward as sb

        sb.MAX_DENSITY = max_density
    with contextlib.redirect_stdout(sys.stderr):  # peft prints
        result = run_variant(variant, cfg, id3_steps)
    emit_result(RESULT_MARKER, result)
    return 0


def crossover(threads: int, repeats: int) -> dict[str, Any]:
    """Dense dYᵀX against `linear_entry_grads` per shape, T and selected fraction."""
    import torch

    from unmask.optimize.entry_grads import Scratch, entry_pattern, linear_entry_grads

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)

    def fastest_s(fn: Any) -> float:
        # The fastest of the repeats: the machine is shared, and other work only adds time.
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return min(samples)

    rows = []
    for tokens in (256, 1024):
        for out, inn in LINEAR_SHAPES:
            dy, x = torch.randn(tokens, out, generator=gen), torch.randn(tokens, inn, generator=gen)
            dense = fastest_s(lambda dy=dy, x=x: dy.t() @ x)
            for fraction in CROSSOVER_FRACTIONS:
                n = max(1, int(fraction * out * inn))
                flat = torch.randperm(out * inn, generator=gen)[:n].sort().values
                pattern = entry_pattern(flat // inn, flat % inn, (out, inn), torch.float32)
                # Kept buffers, as in training (the first, warm-up call allocates them); the
                # shared input is forgotten, as every forward does.
                scratch = Scratch()

                def sparse_call(dy=dy, x=x, p=pattern, scratch=scratch):
                    scratch.forget()
                    return linear_entry_grads(dy, x, p, torch.float32, scratch)

                sparse = fastest_s(sparse_call)
                rows.append(
                    {"tokens": tokens, "out": out, "in": inn, "fraction": fraction,
                     "dense_s": dense, "sparse_s": sparse, "ratio": sparse / dense}
                )  # fmt: skip
    faster = [
        f for f in CROSSOVER_FRACTIONS
        if all(r["ratio"] < 1.0 for r in rows if r["fraction"] <= f)
    ]  # fmt: skip
    return {"rows": rows, "max_fraction_always_faster": max(faster) if faster else None}


# -------------------------------------------------------------------------- parent side


def _in_child(
    variant: str, cfg: Config, id3_steps: int, timeout_s: float, max_density: float | None = None
) -> dict[str, Any]:
    print(f"[sparse_backward] {cfg.model} b{cfg.batch} {cfg.budget}: {variant}", file=sys.stderr)
    args = ["--child", variant, "--child-config", json.dumps(asdict(cfg))]
    args += ["--id3-total-steps", str(id3_steps)]
    if max_density is not None:
        args += ["--max-density", str(max_density)]
    return run_child("benchmarks.sparse_backward", args, RESULT_MARKER, cfg.threads, timeout_s)


def _ratios(result: dict[str, Any], refs: dict[str, dict[str, Any]]) -> None:
    for ref, r in refs.items():
        for key, name in (("median_step_s", "step"), ("peak_rss_mb", "rss")):
            ok = "error" not in r and "error" not in result
            result[f"{name}_vs_{ref}"] = result[key] / r[key] if ok else None


def _over_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's result over the rounds: round 0's facts, and for every timing, memory and
    ratio the median over the rounds (each ratio taken against its own round's references, run
    minutes apart, so that slow drifts of the shared machine cancel)."""
    if len(rounds) == 1 or any("error" in r for r in rounds):
        return next((r for r in rounds if "error" in r), rounds[0])
    merged = dict(rounds[0])
    for key in ("median_step_s", "peak_rss_mb", "kernel_share", "gradient_entries_per_step"):
        merged[key] = statistics.median(r[key] for r in rounds)
    for key in [k for k in rounds[0] if k.startswith(("step_vs_", "rss_vs_"))]:
        values = [r[key] for r in rounds]
        merged[key] = None if None in values else statistics.median(values)
    merged["rounds"] = [
        {k: r.get(k) for k in ("median_step_s", "peak_rss_mb", "step_vs_lora", "step_vs_adamw")}
        for r in rounds
    ]
    return merged


def run_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every cell's results. With --rounds R, each model and batch runs R rounds in turn; a round
    runs the references and then every budget's variants, each in a fresh child."""
    cells = []
    for model in args.models:
        preset = PRESETS[model]
        for batch in args.batches:
            cfg = _config(args, model, preset, batch)
            run = (args.id3_total_steps, args.child_timeout, args.max_density)
            refs_rounds: list[dict[str, dict[str, Any]]] = []
            by_budget: dict[str, list[dict[str, dict[str, Any]]]] = {b: [] for b in args.budgets}
            for _ in range(args.rounds):
                refs = {v: _in_child(v, cfg, *run[:2]) for v in REFERENCES}
                refs_rounds.append(refs)
                for budget in args.budgets:
                    bcfg = replace(cfg, budget=budget)
                    results = {v: _in_child(v, bcfg, *run) for v in args.variants}
                    for r in results.values():
                        _ratios(r, refs)
                    by_budget[budget].append(results)
            merged_refs = {v: _over_rounds([r[v] for r in refs_rounds]) for v in REFERENCES}
            cells.append({"model": model, "batch": batch, "budget": None, "variants": merged_refs})
            for budget, rounds in by_budget.items():
                variants = {v: _over_rounds([r[v] for r in rounds]) for v in args.variants}
                cells.append(
                    {"model": model, "batch": batch, "budget": budget, "variants": variants}
                )
    return cells


def _config(args: argparse.Namespace, model: str, preset: dict[str, int], batch: int) -> Config:
    def pick(name: str) -> int:
        value = getattr(args, name)
        return preset[name] if value is None else value

    hidden = pick("hidden")
    intermediate = preset["intermediate"] if args.hidden is None else 4 * hidden
    heads = preset["heads"] if hidden % preset["heads"] == 0 else 1
    kv = preset["kv_heads"] if heads % preset["kv_heads"] == 0 else heads
    return Config(
        model=model, layers=pick("layers"), hidden=hidden, heads=heads, kv_heads=kv,
        intermediate=intermediate, vocab=pick("vocab"), num_labels=2, steps=args.steps,
        warmup=args.warmup, total_steps=args.steps, batch=batch, seq_len=args.seq_len,
        budget=args.budgets[0], lr=1e-5, seed=0, threads=args.threads,
    )  # fmt: skip


def entries_per_selected(result: dict[str, Any]) -> float | None:
    """Weight-gradient entries computed per step over the weights that train (B): 1 when only
    the selected weights' gradients are computed; over a run of T steps, entries / (T·B)."""
    if "error" in result or not result.get("num_selected"):
        return None
    return result["gradient_entries_per_step"] / result["num_selected"]


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Sparse backward benchmark",
        "",
        f"{report['steps']} steps ({report['warmup']} warm-up excluded), "
        f"{report.get('rounds', 1)} round(s) (medians over rounds; ratios against each round's "
        "own references), seq len "
        f"{report['seq_len']}, {report['threads']} threads; ID3 T = {report['id3_total_steps']} "
        "(every measured step is after its last unmask). Machine: "
        f"{report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, shared "
        "with other work (noisy); commit "
        f"{report['machine']['git_commit']}.",
        "",
        "| model | batch | budget | variant | step (ms) | vs AdamW | vs LoRA | peak RSS (MB) "
        "| RSS vs LoRA | grad entries / step | / B | kernel share |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in report["cells"]:
        for name, r in cell["variants"].items():
            head = f"| {cell['model']} | {cell['batch']} | {cell['budget'] or '-'} | {name} "
            if "error" in r:
                lines.append(head + f"| error: {r['error']} |" + " |" * 7)
                continue
            lines.append(
                head + f"| {r['median_step_s'] * 1e3:.0f} | {fmt(r.get('step_vs_adamw'), '.2f')} "
                f"| {fmt(r.get('step_vs_lora'), '.2f')} | {r['peak_rss_mb']:.0f} "
                f"| {fmt(r.get('rss_vs_lora'), '.2f')} | {r['gradient_entries_per_step']:,.0f} "
                f"| {fmt(entries_per_selected(r), '.3g')} "
                f"| {fmt(r['kernel_share'], '.2f')} |"
            )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--batches", default="4,16")
    p.add_argument("--budgets", default="0.1%,1%")
    p.add_argument("--variants", default=",".join(SELECTIVE))
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--id3-total-steps", type=int, default=None, help="default: --warmup")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument(
        "--max-density", type=float, default=None,
        help="the sparse backward's MAX_DENSITY in the selective variants (default: the library's)",
    )  # fmt: skip
    p.add_argument(
        "--rounds", type=int, default=1,
        help="run every model and batch's variants this many times in turn; report medians",
    )  # fmt: skip
    p.add_argument("--crossover", action="store_true", help="time the kernels (see above)")
    p.add_argument("--repeats", type=int, default=9, help="crossover timings per point")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--report", type=Path, default=None, help="re-render the markdown of this JSON and exit"
    )
    p.add_argument("--child-timeout", type=float, default=1800.0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        return args
    args.models = [m for m in args.models.split(",") if m]
    if not args.models or set(args.models) - set(PRESETS):
        p.error(f"--models: a comma list out of {', '.join(PRESETS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error("--batches takes a comma list of batch sizes")
    args.budgets = [b for b in args.budgets.split(",") if b]
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - set(SELECTIVE) or not args.variants or not args.budgets:
        p.error(f"--variants: a comma list out of {', '.join(SELECTIVE)}; --budgets: not empty")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if not 0 <= args.warmup < args.steps:
        p.error("need 0 <= --warmup < --steps")
    if args.id3_total_steps is None:
        args.id3_total_steps = max(args.warmup, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        cfg = Config(**json.loads(args.child_config))
        return child_main(args.child, cfg, args.id3_total_steps, args.max_density)
    if args.report is not None:
        print(markdown(json.loads(args.report.read_text())))
        return 0
    command = shlex.join([sys.executable, *sys.argv])
    if args.crossover:
        report = {"benchmark": "sparse_backward_crossover", "command": command,
                  "threads": args.threads, **crossover(args.threads, args.repeats)}  # fmt: skip
        report["machine"] = machine_info({}, "")
        text = json.dumps(report, indent=2)
        print(text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            write_text(args.out / "crossover.json", text + "\n")
        return 0
    cells = run_grid(args)
    results = {
        f"{c['model']}:{c['batch']}:{c['budget']}:{n}": r
        for c in cells
        for n, r in c["variants"].items()
    }
    report = {
        "benchmark": "sparse_backward",
        "command": command,
        "steps": args.steps,
        "warmup": args.warmup,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "id3_total_steps": args.id3_total_steps,
        "max_density": args.max_density,
        "rounds": args.rounds,
        "machine": machine_info(results, next(iter(results))),
        "cells": cells,
    }
    text_md = markdown(report)
    print(text_md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / "sparse_backward.json", json.dumps(report, indent=2) + "\n")
        write_text(args.out / "sparse_backward.md", text_md)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
