"""Optimizer-step benchmark: unmask ID3 against dense AdamW and the authors' toolkit.

What is measured
----------------
A MiniLM-shaped ``BertForSequenceClassification`` (6 layers, hidden 384, 12 heads,
intermediate 1536, vocab 30522, 2 labels, random init) is trained for ``--steps`` steps
(default 30) on random token ids and labels drawn from a seeded generator, batch 16 x 64
tokens. The first ``--warmup`` steps (default 5) are excluded from the medians. For every
variant this script reports, measured in the same run:

- the median time of ``opt.step()`` alone, and the median time of a whole training step
  (forward + backward + step + zero_grad), each also as a ratio to dense AdamW;
- optimizer-state bytes: for dense AdamW and the toolkit, every tensor in ``opt.state``
  (the toolkit also holds a boolean mask per parameter, which is counted); for unmask,
  ``opt.state_bytes()``;
- peak RSS (``ru_maxrss``) of the process that ran it.

Variants, always run in this order, each in its own fresh subprocess, one after another:

- ``adamw``: dense ``torch.optim.AdamW`` full fine-tuning (lr 1e-4, default weight decay);
- ``unmask-id3``: ``unmask.SelectiveOptimizer(method="id3")`` with a per-weight Adam step;
- ``unmask-id3-global``: the same with ``adam_step="global"``;
- ``selective-optimizers``: the ID3 optimizer of the authors' toolkit
  (PyPI ``selective-optimizers==0.4``), recorded as skipped if it does not import.

The selective optimizers are told a run length T (``--total-steps``, default 1000) and the
script measures the first ``--steps`` steps of that run: each step unmasks B/T weights, as in
a real fine-tuning run. ``--total-steps`` equal to ``--steps`` is the worst case for the
selection (B/steps weights per step).

How to run
----------
Full benchmark (about 23M weights; a few minutes on 2 cores)::

    .venv/bin/python -m benchmarks.optimizer_step --out runs/optimizer_step \\
        --python-for-baseline /path/to/venv-with-selective-optimizers/bin/python

The toolkit is best kept out of the project's environment; ``--python-for-baseline`` names
the interpreter that runs the toolkit's child (default: this interpreter). That environment
needs torch, transformers and ``selective-optimizers==0.4``.

Quick smoke run::

    .venv/bin/python -m benchmarks.optimizer_step --steps 3 --warmup 1 --layers 1 --hidden 64

With ``--out DIR`` the results are also written to ``DIR/optimizer_step.json`` and
``DIR/optimizer_step.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    check_run_length,
    chosen_variants,
    default_heads,
    emit_result,
    fmt,
    machine_info,
    peak_rss_mb,
    run_child,
    tensor_bytes,
    train,
    write_text,
)

VARIANTS = ("adamw", "unmask-id3", "unmask-id3-global", "selective-optimizers")
BASELINE = "adamw"
TOOLKIT = "selective-optimizers"
RESULT_MARKER = "OPTIMIZER_STEP_RESULT "
# unmask's default score_eps; the toolkit's own default is 1e-8.
TOOLKIT_SCORE_EPS = 1e-3
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}

# Deliberately no torch or transformers import at module level: the parent process must stay
# small (see benchmarks.harness).


@dataclass(frozen=True)
class Config:
    """Everything that defines one benchmark run; identical for every variant."""

    steps: int
    total_steps: int
    warmup: int
    batch: int
    seq_len: int
    budget: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    num_labels: int
    lr: float
    seed: int
    threads: int


# --------------------------------------------------------------------------- child side


def resolve_budget(budget: str, num_weights: int) -> int:
    """Turn "0.1%", "0.001", "5000" or "100K" into a number of weights out of `num_weights`.

    Needed for the toolkit, which takes an absolute count; fractions round to the nearest
    weight as unmask does.
    """
    text = budget.strip().upper().replace(",", "").replace("_", "")
    if text.endswith("%"):
        count = round(float(text[:-1]) / 100 * num_weights)
    elif re.fullmatch(r"0?\.\d+", text):
        count = round(float(text) * num_weights)
    else:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)", text)
        if match is None:
            raise ValueError(f"cannot read budget {budget!r}")
        count = int(float(match.group(1)) * _SUFFIXES[match.group(2)])
    if not 1 <= count <= num_weights:
        raise ValueError(f"budget {budget!r} is {count} weights; need 1..{num_weights}")
    return count


@dataclass
class Built:
    """An optimizer plus how to read its state size and selection count."""

    optimizer: Any
    state_bytes: Callable[[], int]
    num_selected: Callable[[], int | None]
    info: dict[str, Any]


def build_optimizer(variant: str, model: Any, cfg: Config, budget_weights: int) -> Built:
    """Construct the optimizer under test for `variant`."""
    import torch

    if variant == BASELINE:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        return Built(
            opt,
            lambda: tensor_bytes(list(opt.state.values())),
            lambda: None,
            {"weight_decay": opt.defaults["weight_decay"]},
        )

    if variant in ("unmask-id3", "unmask-id3-global"):
        import unmask

        adam_step = "global" if variant == "unmask-id3-global" else "per-weight"
        opt = unmask.SelectiveOptimizer(
            model,
            method="id3",
            budget=cfg.budget,
            total_steps=cfg.total_steps,
            optimizer=torch.optim.AdamW,
            lr=cfg.lr,
            adam_step=adam_step,
        )
        return Built(
            opt,
            lambda: int(opt.state_bytes()),
            lambda: int(opt.num_selected),
            {"adam_step": adam_step, "unmask_path": str(Path(unmask.__file__).parent)},
        )

    if variant == TOOLKIT:
        from selective_optimizers.wrap import get_selective_optimizer

        id3_class = get_selective_optimizer(torch.optim.AdamW, "id3")
        # verify=False: verification saves a full copy of the initial weights to /tmp at
        # construction, which would charge the toolkit for a debugging aid. eps and exp set
        # its D3 metric |g| / (eps + |w|)^exp to unmask's defaults, so that both select by
        # the same score. It forces weight_decay to 0 itself.
        opt = id3_class(
            model.parameters(),
            lr=cfg.lr,
            budget=budget_weights,
            max_steps=cfg.total_steps,
            eps=TOOLKIT_SCORE_EPS,
            exp=1.0,
            verify=False,
        )

        def toolkit_state_bytes() -> int:
            masks = [g.get("chosen_masks", []) for g in opt.param_groups]
            return tensor_bytes(list(opt.state.values())) + tensor_bytes(masks)

        return Built(
            opt,
            toolkit_state_bytes,
            lambda: int(opt.get_budget_used()),
            {"weight_decay": 0.0, "verify": False, "eps": TOOLKIT_SCORE_EPS, "exp": 1.0},
        )

    raise ValueError(f"unknown variant {variant!r}")


def run_variant(variant: str, cfg: Config) -> dict[str, Any]:
    """Train for cfg.steps steps with the variant's optimizer and return its measurements."""
    import torch
    import transformers
    from transformers import BertConfig, BertForSequenceClassification

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=cfg.vocab,
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.intermediate,
            num_labels=cfg.num_labels,
        )
    )
    model.train()
    num_weights = sum(p.numel() for p in model.parameters() if p.requires_grad)
    budget_weights = resolve_budget(cfg.budget, num_weights)

    # All batches are drawn up front from their own generator, so every variant sees the
    # same data whatever its optimizer does with the global RNG.
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    input_ids = torch.randint(0, cfg.vocab, (cfg.steps, cfg.batch, cfg.seq_len), generator=gen)
    labels = torch.randint(0, cfg.num_labels, (cfg.steps, cfg.batch), generator=gen)
    attention_mask = torch.ones(cfg.batch, cfg.seq_len, dtype=torch.long)

    built = build_optimizer(variant, model, cfg, budget_weights)
    opt = built.optimizer
    rss_before_training = peak_rss_mb()

    batches = (
        {"input_ids": input_ids[i], "attention_mask": attention_mask, "labels": labels[i]}
        for i in range(cfg.steps)
    )
    log = train(model, opt, batches)
    opt_step_s, train_step_s, losses = log.optimizer_seconds, log.step_seconds, log.losses

    measured = slice(cfg.warmup, None)
    return {
        "median_opt_step_s": statistics.median(opt_step_s[measured]),
        "median_train_step_s": statistics.median(train_step_s[measured]),
        "optimizer_state_bytes": built.state_bytes(),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_before_training_mb": rss_before_training,
        "num_selected": built.num_selected(),
        "budget": cfg.budget,
        "budget_weights": budget_weights,
        "num_weights": num_weights,
        "steps": cfg.steps,
        "total_steps": cfg.total_steps,
        "warmup": cfg.warmup,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "optimizer": type(opt).__name__,
        "optimizer_info": built.info,
        "python": sys.executable,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": torch.get_num_threads(),
        "opt_step_samples_s": opt_step_s,
        "train_step_samples_s": train_step_s,
    }


def child_main(variant: str, cfg: Config) -> int:
    """Entry point of a child process: run one variant and print its result line."""
    if variant == TOOLKIT:
        try:
            import selective_optimizers.wrap  # noqa: F401
        except Exception as exc:  # any import-time failure means "cannot run the toolkit"
            why = f"cannot import selective_optimizers with {sys.executable}: {exc!r}"
            emit_result(RESULT_MARKER, {"skipped": why})
            return 0
    # Libraries that print (the toolkit does) must not corrupt the result line on stdout.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_variant(variant, cfg)
    emit_result(RESULT_MARKER, result)
    return 0


# -------------------------------------------------------------------------- parent side


def run_variant_in_child(
    variant: str, cfg: Config, python: str, timeout_s: float
) -> dict[str, Any]:
    """Run one variant in a fresh interpreter and return its parsed result."""
    if variant == TOOLKIT and not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return {"skipped": f"interpreter {python!r} for the toolkit is not an executable file"}
    print(f"[optimizer_step] running {variant} ({python})", file=sys.stderr, flush=True)
    args = ["--child", variant, *_config_args(cfg)]
    module = "benchmarks.optimizer_step"
    return run_child(module, args, RESULT_MARKER, cfg.threads, timeout_s, python)


def _config_args(cfg: Config) -> list[str]:
    return [f"--{name.replace('_', '-')}={value}" for name, value in asdict(cfg).items()]


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Add *_vs_adamw ratios to every measured variant (None when AdamW has no result)."""
    base = results.get(BASELINE, {})
    pairs = {
        "ratio_opt_step_vs_adamw": "median_opt_step_s",
        "ratio_train_step_vs_adamw": "median_train_step_s",
        "state_ratio_vs_adamw": "optimizer_state_bytes",
    }
    for result in results.values():
        if "skipped" in result or "error" in result:
            continue
        for ratio, key in pairs.items():
            denominator = base.get(key)
            result[ratio] = result[key] / denominator if denominator else None


def markdown_report(report: dict[str, Any]) -> str:
    """Render the results as a markdown table with the run's settings above it."""
    cfg = report["config"]
    machine = report["machine"]
    lines = [
        "# Optimizer-step benchmark",
        "",
        f"Model: BERT {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, "
        f"intermediate {cfg['intermediate']}, vocab {cfg['vocab']}. Batch {cfg['batch']} x "
        f"{cfg['seq_len']} tokens, {cfg['steps']} steps ({cfg['warmup']} warm-up excluded) of a "
        f"T = {cfg['total_steps']}-step run, budget {cfg['budget']}, {cfg['threads']} threads.",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, "
        f"torch {machine['torch_version'] or 'n/a'}, commit {machine['git_commit'] or 'n/a'}.",
        "",
        "| variant | opt.step median (ms) | vs AdamW | train step median (ms) | vs AdamW "
        "| optimizer state (MB) | vs AdamW | peak RSS (MB) | selected |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["variants"].items():
        if "skipped" in r or "error" in r:
            reason = str(r.get("skipped") or r.get("error")).replace("|", "\\|")
            kind = "skipped" if "skipped" in r else "error"
            lines.append(f"| {name} | {kind}: {reason} |" + " |" * 7)
            continue
        selected = r["num_selected"]
        budget_weights = r["budget_weights"]
        selected_text = "-" if selected is None else f"{selected:,} / {budget_weights:,}"
        lines.append(
            f"| {name} "
            f"| {fmt(r['median_opt_step_s'] * 1e3, '.2f')} "
            f"| {fmt(r.get('ratio_opt_step_vs_adamw'), '.3f')} "
            f"| {fmt(r['median_train_step_s'] * 1e3, '.1f')} "
            f"| {fmt(r.get('ratio_train_step_vs_adamw'), '.3f')} "
            f"| {fmt(r['optimizer_state_bytes'] / 1e6, '.3f')} "
            f"| {fmt(r.get('state_ratio_vs_adamw'), '.4f')} "
            f"| {fmt(r['peak_rss_mb'], '.0f')} "
            f"| {selected_text} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=30, help="training steps per variant (>= 20)")
    p.add_argument(
        "--total-steps",
        type=int,
        default=1000,
        help="T given to the selective optimizers: the run measured is the first --steps steps "
        "of a T-step fine-tuning run (B/T weights unmasked per step); pass --total-steps equal "
        "to --steps for the worst case, B/steps per step",
    )
    p.add_argument("--warmup", type=int, default=5, help="leading steps left out of medians")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--budget", default="0.1%", help='"0.1%%", a fraction, or a count ("22K")')
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=None, help="default: 12 if it divides --hidden")
    p.add_argument("--intermediate", type=int, default=None, help="default: 4 x --hidden")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list out of {', '.join(VARIANTS)}; always run in that order",
    )
    p.add_argument("--out", type=Path, default=None, help="write optimizer_step.{json,md} here")
    p.add_argument(
        "--python-for-baseline",
        default=sys.executable,
        help="interpreter that runs the selective-optimizers child (default: this one)",
    )
    p.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per variant")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.heads is None:
        args.heads = default_heads(args.hidden)
    if args.intermediate is None:
        args.intermediate = 4 * args.hidden
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    check_run_length(p, args)
    args.variants = chosen_variants(p, args.variants, VARIANTS)
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        steps=args.steps,
        total_steps=args.total_steps,
        warmup=args.warmup,
        batch=args.batch,
        seq_len=args.seq_len,
        budget=args.budget,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        num_labels=args.num_labels,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.child is not None:
        return child_main(args.child, cfg)

    results: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        python = args.python_for_baseline if variant == TOOLKIT else sys.executable
        results[variant] = run_variant_in_child(variant, cfg, python, args.child_timeout)
    add_ratios(results)

    report = {
        "benchmark": "optimizer_step",
        "command": shlex.join([sys.executable, *sys.argv]),
        "config": asdict(cfg),
        "machine": machine_info(results, BASELINE),
        "variants": results,
    }
    text_json = json.dumps(report, indent=2)
    text_md = markdown_report(report)
    print(text_md)
    print(text_json)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / "optimizer_step.json", text_json + "\n")
        write_text(args.out / "optimizer_step.md", text_md)
    # A variant that crashed (not one that was skipped) makes the run fail.
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
