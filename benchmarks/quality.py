"""Quality benchmark: ID3 against every baseline, over task x method x budget x seed.

    .venv/bin/python -m benchmarks.quality run       # the full grid, resumable
    .venv/bin/python -m benchmarks.quality_report    # report.md + PNG plots from the records
    .venv/bin/python -m benchmarks.quality run --grid smoke --out /tmp/q   # tiny, < 1 min

Each cell (one training run) writes one JSON record to OUT/records/<cell id>.json; `run` skips
cells whose record exists, so it resumes where it stopped. Cells run `--workers` at a time, each
in a fresh subprocess (so that its peak RSS is its own), in priority order: learning-rate tuning
on the validation split, seed 0 of every method, the ablations, more seeds of the central
comparison and of the score ablations, the second task, the decoder, the remaining seeds.

Learning rates: every method gets the same search, three rates (its own range, a factor of
about 3 apart), on sentence polarity's validation split, seed 0, budget 0.1%; the best rate is
then used for every task, budget and seed of that method. The test split is never used to choose
anything. Decoder methods are tuned the same way on addition's validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.harness import train, with_lora

RESULTS = Path("benchmarks/results/quality")

ENCODER_METHODS = (
    "full",
    "head-only",
    "lora",
    "bitfit",
    "pafi",
    "random",
    "fish",
    "id3",
    "id3-snr",
    "id3-repeat",
    "increment-pafi",
    "id3+lora",
    "pafi+lora",
)
DECODER_METHODS = ("lora", "id3", "id3-snr", "random", "pafi", "id3+lora", "pafi+lora")
# Issue 14's comparison: these methods' sparse members are tuned at every budget.
COMPARED = ("full", "lora", "pafi", "random", "fish", "id3", "id3-snr")
DECODER_COMPARED = ("lora", "id3", "id3-snr", "random")
TASKS = ("polarity", "uncertainty")
# Methods that train a fixed set of weights, whatever the budget.
FIXED_SIZE = ("full", "head-only", "lora", "bitfit")
# Learning-rate search per method: three rates around each family's usual range.
LR_SEARCH = {
    "full": (3e-5, 1e-4, 3e-4),
    "head-only": (1e-3, 3e-3, 1e-2),
    "lora": (3e-4, 1e-3, 3e-3),
    "bitfit": (1e-3, 3e-3, 1e-2),
    "id3+lora": (1e-3, 3e-3, 1e-2),
    "pafi+lora": (1e-3, 3e-3, 1e-2),
}
SPARSE_LRS = (3e-4, 1e-3, 3e-3)
ABLATIONS: dict[str, dict[str, Any]] = {
    "eps=0.1": {"score_eps": 0.1},
    "eps=1": {"score_eps": 1.0},
    "exp=0": {"score_exp": 0.0},
    "exp=2": {"score_exp": 2.0},
    "adam-step=global": {"adam_step": "global"},
    "schedule=linear-decay": {"schedule": "linear-decay"},
}
# Extra learning rates a method may get when its best rate is at the edge of those tried.
MAX_EXTRA_RATES = 2
LORA_RANK = 8
LORA_TARGETS = ("query", "value", "q_proj", "v_proj")


@dataclass(frozen=True)
class Setting:
    """How one model family is trained: the same for every method and budget."""

    model: str
    train_size: int
    steps: int
    batch_size: int
    max_length: int
    eval_size: int | None
    max_new_tokens: int = 8


@dataclass(frozen=True)
class Cell:
    """One training run. `lr` None means: the tuned rate of (setting, method)."""

    phase: str
    setting: str
    task: str
    method: str
    budget: str | None
    seed: int
    split: str
    lr: float | None = None
    ablation: str | None = None

    @property
    def id(self) -> str:
        parts = [
            self.phase,
            Path(self.task).stem,
            self.method.replace("+", "-plus-"),
            f"s{self.seed}",
        ]
        if self.budget:
            parts.append("b" + self.budget.replace("%", "pct").replace("/", "div"))
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        if self.ablation:
            parts.append(self.ablation.replace("=", "-"))
        return "_".join(parts)


@dataclass
class Grid:
    settings: dict[str, Setting]
    cells: list[Cell] = field(default_factory=list)


def lrs_for(method: str) -> tuple[float, ...]:
    return LR_SEARCH.get(method, SPARSE_LRS)


def _budgets(method: str, budgets: tuple[str, ...], lora_budgets: tuple[str, ...]):
    if method in FIXED_SIZE:
        return (None,)
    return lora_budgets if method.endswith("+lora") else budgets


def full_grid() -> Grid:
    """The committed grid, in the order it runs (most informative cells first).

    It holds two studies. The first (issue 4) compared every method with rates tuned at one
    budget. The second (issue 14, `COMPARED`) tunes each sparse method's rate at every budget
    (on polarity's and addition's validation splits; uncertainty and plurals use those rates
    untuned) and compares the new selection, id3-snr, with paper ID3, the static masks, LoRA
    and full fine-tuning. Cells the two share are run once.
    """
    settings = {
        "encoder": Setting(
            "minilm", train_size=1600, steps=100, batch_size=16, max_length=64, eval_size=None
        ),
        "decoder": Setting(
            "smollm2", train_size=960, steps=60, batch_size=16, max_length=32, eval_size=200
        ),
    }
    enc_budgets, enc_lora = ("0.03%", "0.1%", "lora"), ("0.03%", "0.1%")
    dec_budgets, dec_lora = ("lora/4", "lora"), ("lora/4",)

    def tune(methods, setting="encoder", task="polarity", budget="0.1%", rates=None) -> list[Cell]:
        return [
            Cell("tune", setting, task, m, None if m in FIXED_SIZE else budget, 0, "validation",
                 lr)
            for m in methods
            for lr in (rates or lrs_for(m))
        ]  # fmt: skip

    def tune_per_budget(methods, setting, task, budgets, rates) -> list[Cell]:
        return [c for b in budgets for c in tune(methods, setting, task, b, rates)]

    def main(task: str, seed: int, methods=ENCODER_METHODS, setting="encoder") -> list[Cell]:
        budgets, lora = (enc_budgets, enc_lora) if setting == "encoder" else (dec_budgets, dec_lora)
        return [
            Cell("main", setting, task, m, b, seed, "test")
            for m in methods
            for b in _budgets(m, budgets, lora)
        ]

    def ablations(seed: int, names=tuple(ABLATIONS)) -> list[Cell]:
        return [
            Cell("ablation", "encoder", "polarity", "id3", "0.1%", seed, "test", ablation=a)
            for a in names
        ]

    def decoder(seed: int, methods=DECODER_METHODS) -> list[Cell]:
        return [c for t in ("addition", "plurals") for c in main(t, seed, methods, "decoder")]

    # Issue 4's grid: the paper's central comparison first (ID3 against PaFi, LoRA and full
    # fine-tuning on one task), then every other method, the ablations, more seeds, the second
    # task, the decoder and the remaining encoder seeds. Its sparse methods of COMPARED are
    # tuned per budget below instead of at 0.1% only.
    core = ("full", "id3", "pafi", "lora")
    rest = tuple(m for m in ENCODER_METHODS if m not in core)
    score = ("eps=0.1", "eps=1", "exp=0", "exp=2")
    others = tuple(a for a in ABLATIONS if a not in score)
    per_budget = [m for m in COMPARED if m not in FIXED_SIZE]
    once = [m for m in ENCODER_METHODS if m not in per_budget]
    dec_sparse = [m for m in per_budget if m in DECODER_COMPARED]
    dec_once = [m for m in DECODER_METHODS if m not in dec_sparse]
    cells = tune(m for m in core if m in once) + main("polarity", 0, core)
    cells += tune(m for m in rest if m in once) + main("polarity", 0, rest)
    cells += ablations(0) + main("polarity", 1, core) + main("polarity", 2, core)
    cells += ablations(1, score) + ablations(2, score)
    cells += main("uncertainty", 0, core)
    cells += tune(dec_once, "decoder", "addition", "lora/4") + decoder(0)
    cells += main("uncertainty", 0, rest) + decoder(1) + decoder(2)
    for seed in (1, 2):
        cells += main("polarity", seed, rest) + main("uncertainty", seed) + ablations(seed, others)
    # Issue 14: the new selection first (tuning, then both tasks, every seed), then the other
    # sparse methods' tuning at every budget and their runs, then the decoder.
    enc_rates, dec_rates = (3e-3, 1e-2, 3e-2), (3e-4, 1e-3, 3e-3)
    cells += tune_per_budget(["id3-snr"], "encoder", "polarity", enc_budgets, enc_rates)
    cells += [c for seed in range(3) for t in TASKS for c in main(t, seed, ["id3-snr"])]
    others_sparse = [m for m in per_budget if m != "id3-snr"]
    cells += tune_per_budget(others_sparse, "encoder", "polarity", enc_budgets, enc_rates)
    cells += [c for seed in range(3) for t in TASKS for c in main(t, seed, others_sparse)]
    cells += tune_per_budget(dec_sparse, "decoder", "addition", dec_budgets, dec_rates)
    cells += [c for seed in range(3) for c in decoder(seed, dec_sparse)]
    return Grid(settings, _unique(cells))


def _unique(cells: list[Cell]) -> list[Cell]:
    """The cells in order, each once (the two studies share some)."""
    return list({c.id: c for c in reversed(cells)}.values())[::-1]


def smoke_grid(out: Path) -> Grid:
    """Every encoder method, phase and ablation on a tiny random BERT and a 60-row CSV task."""
    model_dir, data = _smoke_data(out / "smoke-data")
    setting = Setting(
        str(model_dir), train_size=40, steps=4, batch_size=4, max_length=16, eval_size=None
    )
    budgets = ("1%", "5%", "lora")
    cells = [
        Cell("tune", "encoder", data, m, None if m in FIXED_SIZE else "5%", 0, "validation", lr)
        for m in ENCODER_METHODS
        for lr in lrs_for(m)[:2]
    ]
    cells += [
        Cell("main", "encoder", data, m, b, 0, "test")
        for m in ENCODER_METHODS
        for b in _budgets(m, budgets, budgets[:2])
    ]
    cells += [
        Cell("ablation", "encoder", data, "id3", "5%", 0, "test", ablation=a) for a in ABLATIONS
    ]
    return Grid({"encoder": setting}, cells)


def _smoke_data(folder: Path) -> tuple[Path, str]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    model_dir, csv = folder / "model", folder / "sentiment.csv"
    if csv.is_file():
        return model_dir, str(csv)
    words = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "very"]
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    BertForSequenceClassification(config).bert.save_pretrained(model_dir)
    rows = ["label,text"]
    for i in range(60):
        good = i % 2 == 0
        adjective = words[(i // 2) % 3] if good else words[3 + (i // 2) % 3]
        rows.append(
            f"{'positive' if good else 'negative'},the movie was {'very ' * (i % 3)}{adjective}"
        )
    from unmask.store.files import atomic_write_text

    atomic_write_text(csv, "\n".join(rows) + "\n")
    return model_dir, str(csv)


# ---------------------------------------------------------------------------------- one cell


def run_cell(
    cell: Cell,
    setting: Setting,
    tuned_lr: float | None,
    threads: int | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one cell; returns its record. Imports torch (call in a child).

    `options` go to the SelectiveOptimizer (default: the cell's ablation options); the key
    "dense_extra" adds patterns to the dense ones (the new head); "method_options" builds the
    method with these options (`unmask.choose.methods.make_method`).
    """
    import resource
    import tempfile

    import torch

    if threads:
        torch.set_num_threads(threads)

    import unmask
    from unmask.app.models import load_model
    from unmask.app.tasks import load_task
    from unmask.app.tasks.batches import batch_order, encode
    from unmask.app.tasks.evaluation import evaluate

    lr = cell.lr if cell.lr is not None else tuned_lr
    if lr is None:
        raise ValueError(f"cell {cell.id} has no learning rate: run the tuning cells first")
    task = load_task(cell.task, seed=0, train_size=setting.train_size, eval_size=setting.eval_size)
    torch.manual_seed(cell.seed)
    model, tokenizer = load_model(setting.model, task)
    model.train()
    total_weights = sum(p.numel() for p in model.parameters())
    if options is None:
        options = ABLATIONS.get(cell.ablation or "", {})
    trainer = _Trainer(cell, model, lr, setting.steps, total_weights, options)
    order = batch_order(len(task.train), setting.batch_size, setting.steps, cell.seed)

    def batch(idx: list[int]) -> dict:
        return encode(tokenizer, task, [task.train[i] for i in idx], setting.max_length)

    started = time.perf_counter()
    if trainer.selective is not None and trainer.selective.method.needs_calibration:
        trainer.selective.calibrate(batch(idx) for idx in order[:8])
    log = train(trainer.model, trainer.opt, (batch(idx) for idx in order))
    train_seconds = time.perf_counter() - started
    examples = task.test if cell.split == "test" else task.validation
    metric = evaluate(
        trainer.model,
        tokenizer,
        task,
        examples,
        setting.batch_size * 4,
        setting.max_length,
        setting.max_new_tokens,
    )
    with tempfile.TemporaryDirectory() as folder:
        delta_bytes = trainer.save(Path(folder))
    return {
        **asdict(cell),
        "id": cell.id,
        "lr": lr,
        "ablation_options": options,
        "training": asdict(setting),
        "task_sizes": {"train": len(task.train), "eval": len(examples)},
        "metric": task.metric,
        "value": metric,
        "budget_weights": trainer.budget_weights,
        "weights_changed": trainer.weights_changed,
        "weights_total": total_weights,
        "train_loss_last10": statistics.fmean(log.losses[-10:]),
        "train_seconds": round(train_seconds, 2),
        "step_seconds_median": round(statistics.median(log.step_seconds), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "delta_bytes": delta_bytes,
        "allocation": trainer.allocation(),
        "concentration": trainer.concentration(),
        "unmask_version": unmask.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "hardware": f"{os.cpu_count()} CPUs ({platform.machine()}, {platform.system()})",
        "git_commit": _git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def lora_weight_count(model) -> int:
    """Weights LoRA r8 trains on `model`: A and B of each targeted Linear, plus any new head."""
    from torch import nn

    from unmask.app.models import new_head_patterns

    heads = tuple(p.strip("^\\.") + "." for p in new_head_patterns(model))
    count = sum(p.numel() for n, p in model.named_parameters() if n.startswith(heads))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            count += LORA_RANK * (module.in_features + module.out_features)
    return count


def budget_count(spec: str, model, total_weights: int) -> int:
    """A budget of the grid as a weight count: "0.1%" of the whole model, "lora", "lora/4"."""
    from unmask import resolve_budget

    if spec.startswith("lora"):
        lora = lora_weight_count(model)
        return lora // int(spec.split("/")[1]) if "/" in spec else lora
    return resolve_budget(spec, total_weights)


class _Trainer:
    """The model to train and its optimizer, built the way `cell.method` needs."""

    def __init__(
        self, cell: Cell, model, lr: float, steps: int, total_weights: int, options: dict
    ) -> None:
        import torch

        from unmask import SelectiveOptimizer
        from unmask.app.models import new_head_patterns
        from unmask.integrations.peft import peft_candidates

        method = cell.method
        heads = new_head_patterns(model)
        self.budget_weights = (
            budget_count(cell.budget, model, total_weights) if cell.budget else None
        )
        self.selective: SelectiveOptimizer | None = None
        if method in ("lora", "id3+lora", "pafi+lora"):
            model = with_lora(model, LORA_TARGETS, classifier=bool(heads), rank=LORA_RANK)
        self.model = model
        trainable = [p for p in model.parameters() if p.requires_grad]
        if method == "head-only":
            if not heads:
                raise ValueError("head-only needs a model with a new classification head")
            for name, p in model.named_parameters():
                p.requires_grad_(any(name.startswith(h.strip("^\\.") + ".") for h in heads))
            trainable = [p for p in model.parameters() if p.requires_grad]
        if method in ("lora", "head-only"):
            self.opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
            self._trained = sum(p.numel() for p in trainable)
            return
        options = dict(options)
        dense = heads + list(options.pop("dense_extra", []))
        method_options = options.pop("method_options", None)
        kwargs: dict[str, Any] = (
            peft_candidates(model) if method.endswith("+lora") else {"dense": dense or None}
        )
        base_method = method.removesuffix("+lora")
        if method_options:
            from unmask.choose.methods import make_method

            base_method = make_method(base_method, **method_options)
        self.selective = SelectiveOptimizer(
            model,
            method=base_method,
            budget=self.budget_weights,
            total_steps=steps,
            lr=lr,
            weight_decay=0.0,
            seed=cell.seed,
            freeze_unselected=True,
            **kwargs,
            **options,
        )
        self.opt = self.selective

    @property
    def weights_changed(self) -> int:
        """Weights whose value may differ from the pretrained model (adapters: all trained)."""
        return self._trained if self.selective is None else self.selective.num_changed

    def allocation(self) -> dict[str, int] | None:
        return None if self.selective is None else self.selective.allocation()

    def concentration(self) -> dict[str, float] | None:
        """How the selection spreads over the rows and input columns of 2-D weights.

        top1pct_columns / top1pct_rows: the share of the selected 2-D weights that sit in the
        1% of each tensor's columns (rows) holding the most selected weights; a uniformly random
        mask gives about 0.01 plus sampling noise. Tensor shares by module: see allocation.
        """
        if self.selective is None or self.selective.method.kind in ("all", "dense"):
            return None
        import math

        params = dict(self.model.named_parameters())
        total = in_cols = in_rows = 0
        for name, flat in self.selective.selected().items():
            p = params[name]
            if p.dim() != 2 or not flat.numel():
                continue
            rows, cols = p.shape
            n = flat.numel()
            col_counts = (flat % cols).bincount(minlength=cols).sort(descending=True).values
            row_counts = (flat // cols).bincount(minlength=rows).sort(descending=True).values
            in_cols += int(col_counts[: math.ceil(cols / 100)].sum())
            in_rows += int(row_counts[: math.ceil(rows / 100)].sum())
            total += n
        return {
            "weights_2d": total,
            "top1pct_columns": round(in_cols / total, 4) if total else 0.0,
            "top1pct_rows": round(in_rows / total, 4) if total else 0.0,
        }

    def save(self, folder: Path) -> int:
        """Bytes on disk of what this method must store to reproduce the trained model."""
        if self.selective is not None:
            self.selective.delta().save_pretrained(folder / "delta")
            files = (folder / "delta").iterdir()
        else:
            from safetensors.torch import save_file

            trained = {
                n: p.detach().contiguous()
                for n, p in self.model.named_parameters()
                if p.requires_grad
            }
            save_file(trained, folder / "trained.safetensors")
            files = [folder / "trained.safetensors"]
        return sum(f.stat().st_size for f in files)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------------------------- the grid


def load_records(out: Path) -> list[dict[str, Any]]:
    folder = out / "records"
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def tuned_lrs(records: list[dict[str, Any]]) -> dict[tuple[str, str, str | None], float]:
    """(setting, method, budget tuned at) -> the rate with the best validation metric (ties:
    the smaller rate)."""
    best: dict[tuple[str, str, str | None], tuple[float, float]] = {}
    for r in records:
        if r["phase"] != "tune" or r["split"] != "validation":
            continue  # a rate is never chosen on a test split
        key = (r["setting"], r["method"], r["budget"])
        score = (r["value"], -r["lr"])
        if key not in best or score > (best[key][0], -best[key][1]):
            best[key] = (r["value"], r["lr"])
    return {k: lr for k, (_, lr) in best.items()}


def rate_for(
    chosen: dict[tuple[str, str, str | None], float], setting: str, method: str, budget: str | None
) -> float | None:
    """The tuned rate a run at `budget` uses: the rate tuned at that budget if the method was
    tuned there, else the rate of the one budget the method was tuned at (None if unknown)."""
    if (setting, method, budget) in chosen:
        return chosen[(setting, method, budget)]
    tuned = [lr for (s, m, _), lr in chosen.items() if (s, m) == (setting, method)]
    return tuned[0] if len(tuned) == 1 else None


def next_rate(lr: float, up: bool) -> float:
    """The next rate of the 1-3-10 ladder above or below `lr` (1e-3 -> 3e-3 -> 1e-2)."""
    mantissa = lr / 10 ** math.floor(math.log10(lr) + 1e-9)
    step = (3 if mantissa < 2 else 10 / 3) if up else (1 / 3 if mantissa > 2 else 0.3)
    return float(f"{lr * step:.0e}")


def tuning_extension(
    grid: Grid, records: list[dict], setting: str, method: str, budget: str | None
) -> Cell | None:
    """The extra tuning cell a method needs at a tuning budget, if its best rate there is at
    the edge of those tried.

    Every method gets the same rule: its declared rates, then while the best is the lowest or
    the highest rate tried, one more rate beyond it, at most MAX_EXTRA_RATES times.
    """
    base = _tune_cells(grid, setting, method, budget)
    tried = _tried_rates(records, setting, method, budget)
    if not base or any(c.lr not in tried for c in base):
        return None  # the method's own rates first
    rates = sorted(tried)
    best = max(rates, key=lambda lr: (tried[lr], -lr))
    if best not in (rates[0], rates[-1]):
        return None
    up = best == rates[-1]
    # Count only the rates beyond the declared ones on the side of the edge, so that rates an
    # earlier search tried on the other side do not use up this side's extensions.
    beyond = [
        lr for lr in rates if (lr > max(c.lr for c in base) if up else lr < min(c.lr for c in base))
    ]
    if len(beyond) >= MAX_EXTRA_RATES:
        return None
    return replace(base[0], lr=next_rate(best, up=up))


def tune_budget(grid: Grid, cell: Cell) -> str | None:
    """The budget whose tuning sets `cell`'s rate: its own budget where the grid tunes the
    method there, else the one budget the grid tunes the method at."""
    budgets = {
        c.budget
        for c in grid.cells
        if c.phase == "tune" and c.setting == cell.setting and c.method == cell.method
    }
    if cell.budget in budgets or len(budgets) != 1:
        return cell.budget
    return next(iter(budgets))


def _tune_cells(grid: Grid, setting: str, method: str, budget: str | None) -> list[Cell]:
    """The method's declared tuning cells at `budget` (its base rates, before any extension)."""
    return [
        c
        for c in grid.cells
        if c.phase == "tune" and (c.setting, c.method, c.budget) == (setting, method, budget)
    ]


def _tried_rates(
    records: list[dict], setting: str, method: str, budget: str | None
) -> dict[float, float]:
    """Rate -> validation metric of the method's finished tuning cells at `budget`."""
    return {
        r["lr"]: r["value"]
        for r in records
        if r["phase"] == "tune"
        and (r["setting"], r["method"], r["budget"]) == (setting, method, budget)
    }


def _tuning_complete(
    grid: Grid, records: list[dict], setting: str, method: str, budget: str | None
) -> bool:
    tried = _tried_rates(records, setting, method, budget)
    return all(c.lr in tried for c in _tune_cells(grid, setting, method, budget)) and (
        tuning_extension(grid, records, setting, method, budget) is None
    )


def run_grid(
    grid: Grid,
    out: Path,
    in_process: bool,
    limit: int | None,
    phases: set | None,
    threads: int | None = None,
    workers: int = 1,
) -> int:
    """Run every missing cell, `workers` at a time; returns the number of cells that failed.

    A cell that needs a tuned learning rate waits until its method's tuning cells are done.
    """
    (out / "records").mkdir(parents=True, exist_ok=True)
    pending = [
        c
        for c in grid.cells
        if not (phases and c.phase not in phases)
        and (c.lr is None or not (out / "records" / f"{c.id}.json").is_file())
        and not _running_elsewhere(out, c)
    ]
    running: dict[str, tuple[Cell, subprocess.Popen | None, float]] = {}
    failed = started = 0
    seen = None  # the records folder's mtime when the records were last read
    while pending or running:
        # Records are renamed into the folder, which changes its mtime: read them again only
        # then (this also sees cells finished by an earlier, stopped harness).
        mtime = (out / "records").stat().st_mtime_ns
        if mtime != seen:
            seen = mtime
            records = load_records(out)
            trained_with = {r["id"]: r["lr"] for r in records}
        progressed = False
        for cell in list(pending):
            if len(running) >= (1 if in_process else workers):
                break
            if limit is not None and started >= limit:
                pending = []
                break
            tuned = None
            if cell.lr is None:
                at = tune_budget(grid, cell)
                if not _tuning_complete(grid, records, cell.setting, cell.method, at):
                    extra = tuning_extension(grid, records, cell.setting, cell.method, at)
                    queued = {c.id for c in pending} | set(running)
                    if (
                        extra is not None
                        and extra.id not in queued
                        and not _running_elsewhere(out, extra)
                    ):
                        pending.insert(pending.index(cell), extra)
                        progressed = True
                    continue
                tuned = tuned_lrs(records)[(cell.setting, cell.method, at)]
                if trained_with.get(cell.id) == tuned:
                    pending.remove(cell)  # done, with the rate its tuning chose
                    continue
            pending.remove(cell)
            progressed = True
            started += 1
            print(f"[{started}] {cell.id} ...", flush=True)
            setting = grid.settings[cell.setting]
            if in_process:
                _run_in_process(cell, setting, tuned, out, threads)
                print(f"    ok {cell.id}", flush=True)
                seen = None  # reload the records: this cell may finish a tuning
                break
            running[cell.id] = (cell, _launch(cell, setting, tuned, out, threads), time.time())
        if progressed and not running:
            continue
        if not running:
            for cell in pending:
                print(f"skip {cell.id}: its learning-rate tuning did not finish", flush=True)
            break
        time.sleep(1)
        for key, (cell, process, t0) in list(running.items()):
            if process.poll() is None:
                continue
            del running[key]
            seen = None  # its record is read even if the folder's mtime did not tick
            (out / "records" / f"{cell.id}.running").unlink(missing_ok=True)
            ok = process.returncode == 0 and (out / "records" / f"{cell.id}.json").is_file()
            failed += not ok
            status = "ok" if ok else "FAILED"
            print(f"    {status} {cell.id} in {time.time() - t0:.0f} s", flush=True)
    return failed


def _running_elsewhere(out: Path, cell: Cell) -> bool:
    """Whether a cell process started by an earlier (stopped) harness is still running."""
    marker = out / "records" / f"{cell.id}.running"
    try:
        os.kill(int(marker.read_text()), 0)
    except (OSError, ValueError):
        return False
    print(f"skip {cell.id}: still running in process {marker.read_text()}", flush=True)
    return True


def _run_in_process(
    cell: Cell, setting: Setting, tuned: float | None, out: Path, threads: int | None
) -> None:
    from unmask.store.files import atomic_write_text

    record = run_cell(cell, setting, tuned, threads)
    record["peak_rss_scope"] = "whole harness process (in-process run)"
    atomic_write_text(out / "records" / f"{cell.id}.json", json.dumps(record, indent=1))


def _launch(
    cell: Cell, setting: Setting, tuned: float | None, out: Path, threads: int | None
) -> subprocess.Popen:
    payload = json.dumps(
        {"cell": asdict(cell), "setting": asdict(setting), "tuned": tuned, "threads": threads}
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.quality", "cell", "--out", str(out), payload],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    (out / "records" / f"{cell.id}.running").write_text(str(process.pid))
    return process


def _cell_main(out: Path, payload: str) -> None:
    from unmask.store.files import atomic_write_text

    spec = json.loads(payload)
    cell, setting = Cell(**spec["cell"]), Setting(**spec["setting"])
    record = run_cell(cell, setting, spec["tuned"], spec["threads"])
    record["peak_rss_scope"] = "this cell's own process"
    atomic_write_text(out / "records" / f"{cell.id}.json", json.dumps(record, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the missing cells of a grid")
    run.add_argument("--grid", choices=("full", "smoke"), default="full")
    run.add_argument("--out", type=Path, default=None, help=f"default: {RESULTS} (smoke: required)")
    run.add_argument("--limit", type=int, default=None, help="run at most this many cells")
    run.add_argument("--phase", action="append", choices=("tune", "main", "ablation"))
    run.add_argument("--in-process", action="store_true", help="no subprocess per cell")
    run.add_argument("--workers", type=int, default=1, help="cells run at the same time")
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per cell (default 1: robust when the machine is shared; 0 = torch's)",
    )
    run.add_argument("--list", action="store_true", help="print the cells and their state")
    cell = sub.add_parser("cell", help=argparse.SUPPRESS)
    cell.add_argument("--out", type=Path, required=True)
    cell.add_argument("payload")
    args = parser.parse_args(argv)
    if args.command == "cell":
        _cell_main(args.out, args.payload)
        return 0
    if args.grid == "smoke" and args.out is None:
        parser.error("--grid smoke needs --out (it must not mix with the committed records)")
    out = args.out or RESULTS
    grid = full_grid() if args.grid == "full" else smoke_grid(out)
    if args.list:
        done = {r["id"] for r in load_records(out)}
        for c in grid.cells:
            print(("done  " if c.id in done else "todo  ") + c.id)
        print(f"{len(done & {c.id for c in grid.cells})} of {len(grid.cells)} cells done")
        return 0
    failed = run_grid(
        grid,
        out,
        args.in_process,
        args.limit,
        set(args.phase or ()),
        args.threads or None,
        args.workers,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
