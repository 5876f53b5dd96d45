"""Memory benchmark: peak RSS and whole-step time of fine-tuning variants, as ratios to AdamW.

What is measured
----------------
A model built from a config with random init (nothing is downloaded) is trained for
``--steps`` steps (default 20) on random tokens drawn from a seeded generator, batch
``--batch`` x ``--seq-len`` (default 16 x 64). The first ``--warmup`` steps (default 3) are
left out of the medians. Models (``--model``):

- ``minilm``: ``BertForSequenceClassification`` with all-MiniLM-L6-v2's shape (6 layers,
  hidden 384, 12 heads, intermediate 1536, vocab 30522, 2 labels; about 22.7M weights),
  random labels;
- ``smollm2``: ``LlamaForCausalLM`` with SmolLM2-135M's config (30 layers, hidden 576,
  9 heads, 3 key/value heads, intermediate 1536, vocab 49152, tied embeddings, rope_theta
  1e5; about 134.5M weights), loss on every token (labels = input_ids).

Variants, always run in this order, each in its own fresh subprocess, one after another, with
the same seed and data and ``--threads`` torch threads (default 2):

- ``inference``: forward only under ``torch.no_grad()`` in eval mode: the memory floor;
- ``adamw``: dense ``torch.optim.AdamW`` full fine-tuning;
- ``lora``: peft LoRA r 8 (alpha 16, dropout 0) on the attention query and value projections,
  ``torch.optim.AdamW`` on the trainable parameters (the adapters, plus peft's trainable copy
  of a classification head);
- ``pafi``: ``unmask.SelectiveOptimizer(method="pafi", freeze_unselected=True)``: a static
  mask, and no gradients for tensors that hold no selected weight;
- ``id3``: ``unmask.SelectiveOptimizer(method="id3", total_steps=T)``;
- ``id3-lowmem``: the same with ``low_memory=True``.

Every optimizer gets lr ``--lr`` (default 1e-5; neither time nor memory depends on it), the
selective ones a budget of ``--budget`` (default 0.1%) of the weights. ID3 is told a run length
T (``--total-steps``, default 1000) and the benchmark measures the first ``--steps`` steps of
that run, so every measured step unmasks B/T weights.

For every variant this script reports the median time of a whole step (forward + backward +
``opt.step()`` + ``opt.zero_grad()``; forward alone for ``inference``), the peak RSS of its
process (``ru_maxrss``), both as ratios to ``adamw``'s, and the peak RSS as a ratio to
``lora``'s. The parent process never imports torch, so that the children's peaks are their
own (see ``benchmarks/harness.py``).

How to run
----------
Full runs (see benchmarks/README.md)::

    .venv/bin/python -m benchmarks.memory --model minilm --out runs/memory_minilm
    .venv/bin/python -m benchmarks.memory --model smollm2 --out runs/memory_smollm2
    .venv/bin/python -m benchmarks.memory --model smollm2 --batch 4 --out runs/memory_smollm2_b4
    .venv/bin/python -m benchmarks.memory --sizes --out runs/memory_sizes

``--sizes`` runs the SmolLM2 shape at several depths (default 2, 12 and 30 layers: about
35M, 71M and 135M weights) and also writes ``memory_vs_size.png``. Quick smoke run::

    .venv/bin/python -m benchmarks.memory --steps 3 --warmup 1 --layers 1 --hidden 32 \\
        --vocab 100 --variants adamw,id3

With ``--out DIR`` the results are written to ``DIR/memory.json`` and ``DIR/memory.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
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
    with_lora,
    write_text,
)

VARIANTS = ("inference", "adamw", "lora", "pafi", "id3", "id3-lowmem")
BASELINE = "adamw"
LORA = "lora"
RESULT_MARKER = "MEMORY_RESULT "
DEFAULT_SIZES = "2,12,30"

# Shapes of the two reference models. `kv_heads` is used by the Llama shape only.
PRESETS: dict[str, dict[str, int]] = {
    "minilm": {
        "layers": 6,
        "hidden": 384,
        "heads": 12,
        "kv_heads": 12,
        "intermediate": 1536,
        "vocab": 30522,
    },
    "smollm2": {
        "layers": 30,
        "hidden": 576,
        "heads": 9,
        "kv_heads": 3,
        "intermediate": 1536,
        "vocab": 49152,
    },
}
# LoRA's attention query and value projections, by model family.
LORA_TARGETS = {"minilm": ["query", "value"], "smollm2": ["q_proj", "v_proj"]}
LORA_R = 8  # lora_alpha is 2 x r = 16 (benchmarks.harness.with_lora)


@dataclass(frozen=True)
class Config:
    """Everything that defines one model size's run; identical for every variant."""

    model: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    num_labels: int
    steps: int
    warmup: int
    total_steps: int
    batch: int
    seq_len: int
    budget: str
    lr: float
    seed: int
    threads: int


# --------------------------------------------------------------------------- child side


def build_model(cfg: Config) -> Any:
    """A randomly initialised model of cfg's shape (seeded, so every variant gets the same)."""
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.model == "minilm":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(
            BertConfig(
                vocab_size=cfg.vocab,
                hidden_size=cfg.hidden,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                intermediate_size=cfg.intermediate,
                num_labels=cfg.num_labels,
            )
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    # SmolLM2-135M's config.json, apart from the shape fields that --sizes and the tests vary.
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab,
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.kv_heads,
            intermediate_size=cfg.intermediate,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        )
    )


def make_batches(cfg: Config) -> list[dict[str, Any]]:
    """Every step's batch, drawn up front from a generator of its own.

    Drawing them before the optimizer exists means every variant sees the same data whatever
    it does with the global RNG.
    """
    import torch

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ids = torch.randint(0, cfg.vocab, (cfg.steps, cfg.batch, cfg.seq_len), generator=gen)
    mask = torch.ones(cfg.batch, cfg.seq_len, dtype=torch.long)
    if cfg.model == "minilm":
        labels = torch.randint(0, cfg.num_labels, (cfg.steps, cfg.batch), generator=gen)
    else:
        labels = ids  # causal LM: loss on every token
    return [
        {"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(cfg.steps)
    ]


def build_optimizer(variant: str, model: Any, cfg: Config) -> tuple[Any, Any, dict[str, Any]]:
    """Return (model to train, optimizer, facts about it) for a training variant.

    LoRA wraps the model, so the model that is trained is returned too.
    """
    import torch

    if variant == BASELINE:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        return model, opt, {"weight_decay": opt.defaults["weight_decay"]}

    if variant == LORA:
        import peft

        # The classifier task type makes peft train a copy of the classification head (BERT)
        # as a user would; it adds 770 weights, nothing for the tied Llama head.
        model = with_lora(
            model, LORA_TARGETS[cfg.model], classifier=cfg.model == "minilm", rank=LORA_R
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.lr)
        info = {
            "r": LORA_R,
            "lora_alpha": 2 * LORA_R,
            "target_modules": LORA_TARGETS[cfg.model],
            "peft_version": peft.__version__,
        }
        return model, opt, info

    import unmask

    kwargs: dict[str, Any] = {"budget": cfg.budget, "optimizer": torch.optim.AdamW, "lr": cfg.lr}
    if variant == "pafi":
        kwargs.update(method="pafi", freeze_unselected=True)
    elif variant in ("id3", "id3-lowmem"):
        kwargs.update(method="id3", total_steps=cfg.total_steps)
        if variant == "id3-lowmem":
            kwargs["low_memory"] = True
    else:
        raise ValueError(f"unknown variant {variant!r}")
    opt = unmask.SelectiveOptimizer(model, **kwargs)
    info = {k: v for k, v in kwargs.items() if k not in ("optimizer", "lr")}
    info["unmask_path"] = str(Path(unmask.__file__).parent)
    return model, opt, info


def optimizer_state_bytes(opt: Any) -> int:
    """unmask's own count, or every tensor in a torch optimizer's state."""
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    return tensor_bytes(list(opt.state.values()))


def run_variant(variant: str, cfg: Config) -> dict[str, Any]:
    """Run cfg.steps steps of `variant` and return its measurements."""
    import torch
    import transformers

    torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    num_weights = sum(p.numel() for p in model.parameters())
    attn_implementation = getattr(model.config, "_attn_implementation", None)
    batches = make_batches(cfg)
    result: dict[str, Any] = {"num_weights": num_weights}

    if variant == "inference":
        model.eval()
        opt = None
        info: dict[str, Any] = {}
        trainable = 0
    else:
        model.train()
        model, opt, info = build_optimizer(variant, model, cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rss_before_steps = peak_rss_mb()

    grad_bytes = 0
    if opt is None:
        step_s, losses = forward_only(model, batches)
    else:

        def held_gradient_bytes() -> None:
            # Gradients held at their largest, i.e. between backward and zero_grad; the loop
            # over parameters is cheap next to a step and measured the same way for all.
            nonlocal grad_bytes
            grad_bytes = sum(
                p.grad.numel() * p.grad.element_size()
                for p in model.parameters()
                if p.grad is not None
            )

        log = train(model, opt, batches, after_backward=held_gradient_bytes)
        step_s, losses = log.step_seconds, log.losses

    result.update(
        {
            "median_step_s": statistics.median(step_s[cfg.warmup :]),
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_before_steps_mb": rss_before_steps,
            "trainable_weights": trainable,
            "num_selected": int(opt.num_selected) if hasattr(opt, "num_selected") else None,
            "optimizer_state_bytes": 0 if opt is None else optimizer_state_bytes(opt),
            "gradient_bytes": grad_bytes,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "optimizer": type(opt).__name__ if opt is not None else None,
            "optimizer_info": info,
            "attn_implementation": attn_implementation,
            "python": sys.executable,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "threads": torch.get_num_threads(),
            "step_samples_s": step_s,
        }
    )
    return result


def forward_only(model: Any, batches: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(seconds, loss) of each batch's forward under ``torch.no_grad()``: the memory floor."""
    import torch

    seconds, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        with torch.no_grad():
            loss = model(**batch).loss
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return seconds, losses


def child_main(variant: str, cfg: Config) -> int:
    """Entry point of a child process: run one variant and print its result line."""
    # Libraries that print (peft warns) must not corrupt the result line on stdout.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_variant(variant, cfg)
    emit_result(RESULT_MARKER, result)
    return 0


# -------------------------------------------------------------------------- parent side


def run_variant_in_child(variant: str, cfg: Config, timeout_s: float) -> dict[str, Any]:
    """Run one variant in a fresh interpreter and return its parsed result."""
    print(f"[memory] {cfg.model} {cfg.layers} layers: {variant}", file=sys.stderr, flush=True)
    args = ["--child", variant, "--child-config", json.dumps(asdict(cfg))]
    return run_child("benchmarks.memory", args, RESULT_MARKER, cfg.threads, timeout_s)


def measured(result: dict[str, Any]) -> bool:
    """Whether a variant's child finished (a crashed or timed-out one has an "error")."""
    return "error" not in result


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Add ratios to AdamW (time, peak RSS) and to LoRA (peak RSS); None without a reference."""
    base = results.get(BASELINE, {})
    lora = results.get(LORA, {})
    pairs = {
        "ratio_step_vs_adamw": (base, "median_step_s"),
        "ratio_peak_rss_vs_adamw": (base, "peak_rss_mb"),
        "ratio_peak_rss_vs_lora": (lora, "peak_rss_mb"),
    }
    for result in results.values():
        if not measured(result):
            continue
        for ratio, (reference, key) in pairs.items():
            denominator = reference.get(key) if measured(reference) else None
            result[ratio] = result[key] / denominator if denominator else None


def run_size(cfg: Config, variants: list[str], timeout_s: float) -> dict[str, Any]:
    """Every variant at one model size, with ratios."""
    results = {variant: run_variant_in_child(variant, cfg, timeout_s) for variant in variants}
    add_ratios(results)
    num_weights = next((r["num_weights"] for r in results.values() if "num_weights" in r), None)
    return {"layers": cfg.layers, "num_weights": num_weights, "variants": results}


def _model_line(cfg: dict[str, Any], num_weights: int | None) -> str:
    family = "BERT (MiniLM shape)" if cfg["model"] == "minilm" else "Llama (SmolLM2 shape)"
    kv = f" ({cfg['kv_heads']} key/value)" if cfg["model"] == "smollm2" else ""
    size = f", {num_weights:,} weights" if num_weights else ""
    return (
        f"{family}: {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads{kv}, "
        f"intermediate {cfg['intermediate']}, vocab {cfg['vocab']}{size}."
    )


def markdown_report(report: dict[str, Any]) -> str:
    """Render the results as markdown: the run's settings, then one table per model size."""
    cfg = report["config"]
    machine = report["machine"]
    lines = [
        "# Memory benchmark",
        "",
        f"Batch {cfg['batch']} x {cfg['seq_len']} tokens, {cfg['steps']} steps "
        f"({cfg['warmup']} warm-up excluded), budget {cfg['budget']}, ID3 T = "
        f"{cfg['total_steps']}, lr {cfg['lr']:g}, {cfg['threads']} threads.",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, "
        f"torch {machine['torch_version'] or 'n/a'}, commit {machine['git_commit'] or 'n/a'}.",
    ]
    for run in report["runs"]:
        lines += [
            "",
            f"## {run['layers']} layers" if len(report["runs"]) > 1 else "## Results",
            "",
            _model_line({**cfg, "layers": run["layers"]}, run["num_weights"]),
            "",
            "| variant | step median (ms) | vs AdamW | peak RSS (MB) | vs AdamW | vs LoRA "
            "| RSS before steps (MB) | weights with requires_grad / selected |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in run["variants"].items():
            if not measured(r):
                reason = str(r["error"]).replace("|", "\\|")
                lines.append(f"| {name} | error: {reason} |" + " |" * 6)
                continue
            selected = r["num_selected"]
            weights = f"{r['trainable_weights']:,}"
            if selected is not None:
                weights += f" / {selected:,}"
            lines.append(
                f"| {name} "
                f"| {fmt(r['median_step_s'] * 1e3, '.1f')} "
                f"| {fmt(r.get('ratio_step_vs_adamw'), '.3f')} "
                f"| {fmt(r['peak_rss_mb'], '.0f')} "
                f"| {fmt(r.get('ratio_peak_rss_vs_adamw'), '.3f')} "
                f"| {fmt(r.get('ratio_peak_rss_vs_lora'), '.3f')} "
                f"| {fmt(r['peak_rss_before_steps_mb'], '.0f')} "
                f"| {weights} |"
            )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot_sizes(report: dict[str, Any], path: Path) -> None:
    """Peak RSS against model size, one line per measured variant, written atomically as PNG."""
    # Imported here, after every child has finished: only the parent's own peak grows.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    names = list(report["runs"][0]["variants"]) if report["runs"] else []
    for name in names:
        points = [
            (run["num_weights"] / 1e6, run["variants"][name]["peak_rss_mb"])
            for run in report["runs"]
            if run["num_weights"] and measured(run["variants"].get(name, {}))
        ]
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    cfg = report["config"]
    ax.set_xlabel("model weights (millions)")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title(
        f"Peak memory vs size, Llama (SmolLM2 shape), batch {cfg['batch']} x {cfg['seq_len']}"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from unmask.store.files import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(PRESETS), default=None, help="default: minilm")
    p.add_argument(
        "--sizes",
        nargs="?",
        const=DEFAULT_SIZES,
        default=None,
        metavar="LAYERS",
        help="run the SmolLM2 shape at these depths (comma list of layer counts; default "
        f"{DEFAULT_SIZES}) and plot peak RSS against size",
    )
    p.add_argument("--steps", type=int, default=20, help="steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="leading steps left out of medians")
    p.add_argument("--total-steps", type=int, default=1000, help="T given to ID3 (>= --steps)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--budget", default="0.1%", help='"0.1%%", a fraction, or a count ("22K")')
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    shape = p.add_argument_group("model shape overrides (default: the --model preset's)")
    shape.add_argument("--layers", type=int, default=None)
    shape.add_argument("--hidden", type=int, default=None)
    shape.add_argument("--heads", type=int, default=None)
    shape.add_argument("--kv-heads", type=int, default=None, help="Llama only")
    shape.add_argument(
        "--intermediate", type=int, default=None, help="default with --hidden: 4 x --hidden"
    )
    shape.add_argument("--vocab", type=int, default=None)
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list out of {', '.join(VARIANTS)}; always run in that order",
    )
    p.add_argument("--out", type=Path, default=None, help="write memory.{json,md} here")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per variant")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        return args

    if args.sizes is not None:
        if args.model not in (None, "smollm2"):
            p.error("--sizes runs the SmolLM2 (Llama) shape; drop --model or use --model smollm2")
        if args.layers is not None:
            p.error("--sizes sets the layer counts; drop --layers")
        try:
            args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
        except ValueError:
            p.error(f"--sizes takes a comma list of layer counts, got {args.sizes!r}")
        if not args.sizes or min(args.sizes) < 1:
            p.error("--sizes needs at least one layer count >= 1")
        args.model = "smollm2"
    args.model = args.model or "minilm"
    preset = PRESETS[args.model]
    if args.hidden is None:
        args.hidden = preset["hidden"]
        args.intermediate = args.intermediate or preset["intermediate"]
    else:
        args.intermediate = args.intermediate or 4 * args.hidden
    if args.heads is None:
        # The preset's head count when the width allows it (SmolLM2's 9 does not divide 32).
        args.heads = preset["heads"] if args.hidden % preset["heads"] == 0 else None
        args.heads = args.heads or default_heads(args.hidden)
    if args.kv_heads is None:
        args.kv_heads = preset["kv_heads"] if args.heads % preset["kv_heads"] == 0 else args.heads
    for name in ("layers", "vocab"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("need --hidden divisible by --heads, and --heads by --kv-heads")
    check_run_length(p, args)
    args.variants = chosen_variants(p, args.variants, VARIANTS)
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        model=args.model,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        num_labels=2,
        steps=args.steps,
        warmup=args.warmup,
        total_steps=args.total_steps,
        batch=args.batch,
        seq_len=args.seq_len,
        budget=args.budget,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child, Config(**json.loads(args.child_config)))

    cfg = config_from_args(args)
    layer_counts = args.sizes if args.sizes is not None else [cfg.layers]
    runs = [
        run_size(replace(cfg, layers=layers), args.variants, args.child_timeout)
        for layers in layer_counts
    ]
    all_results = {
        f"{run['layers']}:{name}": r for run in runs for name, r in run["variants"].items()
    }
    machine = machine_info(all_results, BASELINE)
    report = {
        "benchmark": "memory",
        "command": shlex.join([sys.executable, *sys.argv]),
        "mode": "sizes" if args.sizes is not None else "single",
        "config": asdict(cfg) | {"layers": layer_counts if args.sizes else cfg.layers},
        "machine": machine,
        "runs": runs,
    }
    text_json = json.dumps(report, indent=2)
    text_md = markdown_report(report)
    print(text_md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / "memory.json", text_json + "\n")
        write_text(args.out / "memory.md", text_md)
        if args.sizes is not None:
            plot_sizes(report, args.out / "memory_vs_size.png")
    # A variant that crashed makes the run fail.
    return 1 if any("error" in r for r in all_results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
