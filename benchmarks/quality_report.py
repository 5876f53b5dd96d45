"""Turn the quality benchmark's records into report.md and PNG plots (see quality.py).

    .venv/bin/python -m benchmarks.quality_report                 # report.md + plots
    .venv/bin/python -m benchmarks.quality_report --sync README.md --sync docs/results.md

Every number in the report is computed here from OUT/records/*.json; nothing is typed by hand.
Each table in report.md sits between `<!-- table: NAME -->` and `<!-- end table -->`; `--sync
FILE` copies the named tables verbatim into FILE's blocks of the same names (README.md holds the
headline table, docs/results.md the rest), so rerunning it after new records is all it takes.
The report depends on the grid's declarations (benchmarks/quality.py), never the other way.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.quality import (
    ABLATIONS,
    DECODER_METHODS,
    ENCODER_METHODS,
    FIXED_SIZE,
    RESULTS,
    Cell,
    Grid,
    _tuning_complete,
    full_grid,
    load_records,
    rate_for,
    smoke_grid,
    tune_budget,
    tuned_lrs,
)
from unmask.module_types import ROLES, layer_index, module_role

BUDGET_ORDER = ("1%", "5%", "0.03%", "0.1%", "lora/4", "lora")
# The allocation plot's budget: 0.1% on the encoder, a quarter of LoRA's count on the decoder,
# 5% on the smoke grid's tiny model.
ALLOCATION_BUDGETS = ("0.1%", "lora/4", "5%")


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f} ({len(values)})"


def _budget_label(records: list[dict], budget: str | None) -> str:
    counts = sorted({r["budget_weights"] for r in records if r["budget"] == budget})
    if budget is None:
        return "own size"
    return f"{budget} ({counts[0]:,})" if len(counts) == 1 else budget


def main_table(records: list[dict], setting: str, task: str) -> list[str]:
    """Methods x budgets, test metric in % as mean ± std (seeds)."""
    rows = [
        r for r in records if r["phase"] == "main" and r["setting"] == setting and r["task"] == task
    ]
    if not rows:
        return []
    budgets = sorted({r["budget"] for r in rows if r["budget"]}, key=BUDGET_ORDER.index)
    methods = [
        m for m in (*ENCODER_METHODS, *DECODER_METHODS) if any(r["method"] == m for r in rows)
    ]
    metric = rows[0]["metric"]
    header = ["method", *(_budget_label(rows, b) for b in budgets), "fixed size", "weights changed"]
    lines = [
        f"### {Path(task).stem} ({metric} on the test split, %, mean ± std (seeds))",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for m in dict.fromkeys(methods):
        mine = [r for r in rows if r["method"] == m]
        cells = [_mean_std([r["value"] for r in mine if r["budget"] == b]) for b in budgets]
        fixed = [r for r in mine if r["budget"] is None]
        changed = sorted({r["weights_changed"] for r in fixed})
        cells += [
            _mean_std([r["value"] for r in fixed]) if fixed else "",
            ", ".join(f"{c:,}" for c in changed),
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


# The paper's claims as (claim, method a, budget a, method b, budget b, kind). "beats": a's mean
# is above b's; "matches": a is not clearly below b. Budget None = the method's own fixed size.
CLAIMS = (
    ("ID3 beats PaFi", "id3", "*", "pafi", "*", "beats"),
    ("ID3 beats random", "id3", "*", "random", "*", "beats"),
    ("ID3 beats FISH", "id3", "*", "fish", "*", "beats"),
    ("ID3 beats BitFit (0.1% vs BitFit's own count)", "id3", "0.1%", "bitfit", None, "beats"),
    ("increment beats repeat (ID3 vs id3-repeat)", "id3", "*", "id3-repeat", "*", "beats"),
    ("increment beats static (increment-PaFi vs PaFi)", "increment-pafi", "*", "pafi", "*",
     "beats"),
    ("ID3 inside LoRA beats PaFi inside LoRA", "id3+lora", "*", "pafi+lora", "*", "beats"),
    ("ID3 at 0.1% matches full fine-tuning", "id3", "0.1%", "full", None, "matches"),
    ("ID3 at LoRA's count matches LoRA", "id3", "lora", "lora", None, "matches"),
    ("ID3 at a quarter of LoRA's count matches LoRA", "id3", "lora/4", "lora", None, "matches"),
    # Issue 14's targets for the new selection.
    ("id3-snr beats random", "id3-snr", "*", "random", "*", "beats"),
    ("id3-snr beats PaFi", "id3-snr", "*", "pafi", "*", "beats"),
    ("id3-snr beats FISH", "id3-snr", "*", "fish", "*", "beats"),
    ("id3-snr beats ID3", "id3-snr", "*", "id3", "*", "beats"),
    ("id3-snr at LoRA's count matches LoRA", "id3-snr", "lora", "lora", None, "matches"),
    ("id3-snr at a quarter of LoRA's count matches LoRA", "id3-snr", "lora/4", "lora", None,
     "matches"),
)  # fmt: skip


def claims_table(records: list[dict]) -> list[str]:
    """Each claim per task and budget: difference of means (points) and a verdict at 2 SE.

    SE combines the seed-to-seed variance of each mean (0 with one seed, so one-seed verdicts are
    marked) with the binomial sampling error of each accuracy on the eval set.
    """
    rows = [r for r in records if r["phase"] == "main"]
    lines = [
        "### The paper's claims, tested (test split; difference in points, a − b)",
        "",
        "| claim | task | budget | a | b | a − b | 2 SE | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    found = False
    for claim, a, budget_a, b, budget_b, kind in CLAIMS:
        for task in sorted({r["task"] for r in rows}):
            budgets = BUDGET_ORDER if budget_a == "*" else (budget_a,)
            for budget in budgets:
                va = _values(rows, task, a, budget)
                vb = _values(rows, task, b, budget if budget_b == "*" else budget_b)
                if not va or not vb:
                    continue
                found = True
                n_eval = next(r["task_sizes"]["eval"] for r in rows if r["task"] == task)
                diff, se = _difference(va, vb, n_eval)
                lines.append(
                    f"| {claim} | {Path(task).stem} | {budget} | {_mean_std(va)} | "
                    f"{_mean_std(vb)} | {100 * diff:+.1f} | {200 * se:.1f} | "
                    f"{_verdict(diff, se, kind, min(len(va), len(vb)))} |"
                )
    return lines + [""] if found else []


def _values(rows: list[dict], task: str, method: str, budget: str | None) -> list[float]:
    return [
        r["value"] for r in rows if r["task"] == task and r["method"] == method
        and r["budget"] == budget
    ]  # fmt: skip


def _difference(a: list[float], b: list[float], n_eval: int) -> tuple[float, float]:
    """Difference of means and its standard error (seed variance + eval-set sampling)."""
    var = 0.0
    for values in (a, b):
        mean = statistics.fmean(values)
        if len(values) > 1:
            var += statistics.variance(values) / len(values)
        var += mean * (1 - mean) / n_eval
    return statistics.fmean(a) - statistics.fmean(b), math.sqrt(var)


def _verdict(diff: float, se: float, kind: str, seeds: int) -> str:
    if diff > 2 * se:
        verdict = "holds" if kind == "beats" else "holds (a above b)"
    elif diff < -2 * se:
        verdict = "does not hold (b clearly better)"
    else:
        verdict = "no clear difference" if kind == "beats" else "holds (within 2 SE)"
    return verdict + (" (1 seed)" if seeds == 1 else "")


def tuning_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["phase"] == "tune"]
    if not rows:
        return []
    chosen = tuned_lrs(records)
    lines = [
        "### Learning-rate search (validation split, seed 0)",
        "",
        "| setting | task | method | budget | lr: validation % | chosen |",
        "|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_key[(r["setting"], r["task"], r["method"], r["budget"])].append(r)
    for (setting, task, method, budget), group in by_key.items():
        tried = ", ".join(
            f"{r['lr']:g}: {100 * r['value']:.1f}" for r in sorted(group, key=lambda r: r["lr"])
        )
        best = chosen.get((setting, method, budget))
        rates = sorted(r["lr"] for r in group)
        edge = " (edge of the search)" if best in (rates[0], rates[-1]) and len(rates) > 1 else ""
        lines.append(
            f"| {setting} | {Path(task).stem} | {method} | {budget or '–'} | {tried} | "
            f"{best:g}{edge} |"
        )
    return lines + [""]


def ablation_table(records: list[dict]) -> list[str]:
    """ID3's variants against its default at one task and budget, with the difference in points
    and 2 SE (as in `claims_table`)."""
    ablations = [r for r in records if r["phase"] == "ablation"]
    if not ablations:
        return []
    task, budget = ablations[0]["task"], ablations[0]["budget"]
    n_eval = ablations[0]["task_sizes"]["eval"]
    default = _values([r for r in records if r["phase"] == "main"], task, "id3", budget)
    lines = [
        f"### ID3 ablations ({task}, budget {budget}, test %, mean ± std (seeds))",
        "",
        "| variant | options | test % | − default | 2 SE |",
        "|---|---|---|---|---|",
        "| default | eps=1e-3, exp=1, adam-step=per-weight, schedule=uniform | "
        f"{_mean_std(default)} | | |",
    ]
    for name, options in ABLATIONS.items():
        values = [r["value"] for r in ablations if r["ablation"] == name]
        versus = ["", ""]
        if values and default:
            diff, se = _difference(values, default, n_eval)
            versus = [f"{100 * diff:+.1f}", f"{200 * se:.1f}"]
        lines.append(f"| {name} | {options} | {_mean_std(values)} | " + " | ".join(versus) + " |")
    return lines + [""]


def cost_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["phase"] == "main" and r["budget"] in (None, "0.1%", "lora/4")]
    if not rows:
        return []
    lines = [
        "### Cost per run (median over runs; budget 0.1% / lora/4 where the method takes one)",
        "",
        "| setting | method | step s | train s | peak RSS MB | delta bytes |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["setting"], r["method"])].append(r)
    for (setting, method), group in groups.items():
        med = {
            k: statistics.median(r[k] for r in group)
            for k in ("step_seconds_median", "train_seconds", "peak_rss_mb", "delta_bytes")
        }
        lines.append(
            f"| {setting} | {method} | {med['step_seconds_median']:.3f} | "
            f"{med['train_seconds']:.0f} | {med['peak_rss_mb']:.0f} | {med['delta_bytes']:,.0f} |"
        )
    return lines + [""]


def plot_metric_vs_budget(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = list(dict.fromkeys((*ENCODER_METHODS, *DECODER_METHODS)))
    colors = plt.get_cmap("tab20").colors
    tasks = sorted({(r["setting"], r["task"]) for r in records if r["phase"] == "main"})
    for _, task in tasks:
        rows = [r for r in records if r["phase"] == "main" and r["task"] == task]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in dict.fromkeys(r["method"] for r in rows):
            points: dict[int, list[float]] = defaultdict(list)
            for r in rows:
                if r["method"] == method:
                    points[r["weights_changed"]].append(100 * r["value"])
            xs = sorted(points)
            ys = [statistics.fmean(points[x]) for x in xs]
            # Distinct colour per method; ID3 drawn thicker, methods inside LoRA dashed.
            fixed = method in FIXED_SIZE
            ax.plot(
                xs, ys, marker="s" if fixed else "o", label=method,
                color=colors[2 * methods.index(method) % 20],
                linewidth=2.5 if method == "id3" else 1.2,
                linestyle="none" if fixed else "--" if method.endswith("+lora") else "-",
            )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("weights changed (log)")
        ax.set_ylabel(f"test {rows[0]['metric']} (%)")
        ax.set_title(f"{task}: metric vs budget (mean over seeds)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / f"quality_{Path(task).stem}.png"
        _save(fig, path)
        written.append(path)
    return written


def plot_allocation(records: list[dict], out: Path, setting: str) -> Path | None:
    """Share of the budget per module kind and per layer: ID3 vs PaFi (the setting's first main
    task, seed 0, at the first budget in ALLOCATION_BUDGETS that has both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = [
        r for r in records
        if r["phase"] == "main" and r["setting"] == setting and r["seed"] == 0
        and r["method"] in ("id3", "pafi") and r["allocation"]
    ]  # fmt: skip
    for budget in ALLOCATION_BUDGETS:
        # reversed: the first task's record is the one kept
        pick = {r["method"]: r for r in reversed(candidates) if r["budget"] == budget}
        if len(pick) == 2:
            break
    else:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    # The roles of unmask.module_types that either method changed (a BERT has no "attn qkv").
    found = {module_role(name) for r in pick.values() for name in r["allocation"]}
    kinds = [k for k in ROLES if k in found]
    for shift, (method, r) in enumerate(sorted(pick.items())):
        total = sum(r["allocation"].values())
        by_kind: dict[str, int] = defaultdict(int)
        by_layer: dict[int, int] = defaultdict(int)
        for name, count in r["allocation"].items():
            by_kind[module_role(name)] += count
            layer = layer_index(name)
            if layer is not None:
                by_layer[layer] += count
        xs = range(len(kinds))
        left.bar(
            [x + 0.4 * shift for x in xs],
            [by_kind[k] / total for k in kinds],
            width=0.4,
            label=method,
        )
        layers = sorted(by_layer)
        right.bar(
            [x + 0.4 * shift for x in layers],
            [by_layer[i] / total for i in layers],
            width=0.4,
            label=method,
        )
    left.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    left.set_ylabel("share of changed weights")
    left.set_title(f"per module kind ({r['task'].rsplit('/', 1)[-1]}, {r['budget']})")
    right.set_xlabel("layer")
    right.set_title("per layer")
    left.legend()
    fig.tight_layout()
    suffix = "" if setting == "encoder" else f"_{setting}"
    path = out / f"allocation_id3_vs_pafi{suffix}.png"
    _save(fig, path)
    return path


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from unmask.store.files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_report(out: Path, declared: list[Cell] | None = None) -> Path:
    """Write OUT/report.md and the plots from OUT/records; returns the report's path.

    With `declared` (the grid's cells) the header also says how much of the grid is done.
    """
    from unmask.store.files import atomic_write_text

    everything = load_records(out)
    records = current(everything, declared)
    if not records:
        raise SystemExit(f"no records in {out / 'records'}: run the grid first")
    lines = _header(records, declared or [], {r["id"] for r in everything})
    # The encoder's tables first: its grid is the larger and ran first.
    for setting, task in sorted(
        {(r["setting"], r["task"]) for r in records if r["phase"] == "main"},
        key=lambda pair: (pair[0] != "encoder", pair),
    ):
        lines += _marked(Path(task).stem, main_table(records, setting, task))
    lines += _marked("claims", claims_table(records))
    lines += _marked("ablations", ablation_table(records))
    lines += _marked("tuning", tuning_table(records)) + _marked("cost", cost_table(records))
    plots = plot_metric_vs_budget(records, out)
    plots += [
        plot_allocation(records, out, s) for s in dict.fromkeys(r["setting"] for r in records)
    ]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def current(
    records: list[dict[str, Any]], declared: list[Cell] | None = None
) -> list[dict[str, Any]]:
    """Leave out runs that the grid would run again: a declared run whose tuning (at the budget
    `quality.tune_budget` names) is not complete, or that was trained with a rate its tuning no
    longer chooses. Runs the grid does not declare are kept if their rate is their method's
    tuned one (or no tuning is known)."""
    chosen = tuned_lrs(records)
    grid = Grid({}, declared or [])
    by_id = {c.id: c for c in grid.cells}
    kept = []
    for r in records:
        cell = by_id.get(r["id"])
        if r["phase"] == "tune":
            kept.append(r)
        elif cell is not None and cell.lr is None:
            at = tune_budget(grid, cell)
            if _tuning_complete(grid, records, r["setting"], r["method"], at) and r[
                "lr"
            ] == chosen.get((r["setting"], r["method"], at)):
                kept.append(r)
        elif r["lr"] == (rate_for(chosen, r["setting"], r["method"], r["budget"]) or r["lr"]):
            kept.append(r)
    return kept


def _header(records: list[dict[str, Any]], declared: list[Cell], done: set[str]) -> list[str]:
    settings = {r["setting"]: r["training"] for r in records}
    lines = [
        "# Quality benchmark",
        "",
        f"{len(records)} runs; generated by `python -m benchmarks.quality_report` from "
        "`records/*.json`.",
        "",
    ]
    for name, s in settings.items():
        lines.append(
            f"- {name}: model `{Path(s['model']).name}`, {s['steps']} steps of batch "
            f"{s['batch_size']}, max length {s['max_length']} tokens, at most "
            f"{s['train_size']} training examples, eval size {s['eval_size'] or 'full split'}."
        )
    hardware = sorted({r.get("hardware", "?") for r in records})
    threads = sorted({r["torch_threads"] for r in records})
    lines.append(f"- hardware: {', '.join(hardware)}; torch threads {threads}.")
    median = {}
    for name in settings:
        seconds = [r["train_seconds"] for r in records if r["setting"] == name]
        median[name] = statistics.median(seconds)
        lines.append(
            f"- {name} training time (loading and evaluation not included): median "
            f"{median[name]:.0f} s per run, {sum(seconds) / 3600:.1f} h in {len(seconds)} runs."
        )
    total = sum(r["train_seconds"] for r in records) / 3600
    lines.append(f"- training time in all: {total:.1f} h in {len(records)} runs.")
    # How much of the declared grid is done, and the training the rest needs at the median.
    for name in dict.fromkeys(c.setting for c in declared):
        cells = [c for c in declared if c.setting == name]
        todo = sum(c.id not in done for c in cells)
        hours = todo * median.get(name, float("nan")) / 3600
        progress = f"- {name} grid: {len(cells) - todo} of {len(cells)} declared runs done"
        if todo:
            progress += f"; the {todo} left need about {hours:.1f} h of training at the median"
        lines.append(progress + ".")
    return lines + [""]


# A named table block in report.md and in the documents it is copied into.
TABLE_BLOCK = re.compile(
    r"<!-- table: (?P<name>[\w.+-]+) -->\n(?P<body>.*?)<!-- end table -->", re.DOTALL
)


def _marked(name: str, section: list[str]) -> list[str]:
    """A report section (heading, blank, table rows, blank) with its table between the markers
    `sync_tables` finds by `name`; the heading stays outside, so documents keep their own."""
    if not section:
        return []
    heading, blank, *rows, _ = section
    return [heading, blank, f"<!-- table: {name} -->", "", *rows, "", "<!-- end table -->", ""]


def sync_tables(doc: Path, report: Path) -> int:
    """Copy report.md's tables, verbatim, into `doc`'s table blocks of the same names; returns
    how many blocks changed (0: `doc` already agrees with the report, and is not rewritten).

    A block naming a table the report lacks, or a `doc` without blocks, fails loudly and leaves
    `doc` as it was: a table is never dropped or put in the wrong place silently.
    """
    from unmask.store.files import atomic_write_text

    tables = {m["name"]: m["body"] for m in TABLE_BLOCK.finditer(report.read_text())}
    text = doc.read_text()
    blocks = list(TABLE_BLOCK.finditer(text))
    if not blocks:
        raise SystemExit(f"{doc} has no '<!-- table: NAME -->' ... '<!-- end table -->' blocks")
    unknown = [m["name"] for m in blocks if m["name"] not in tables]
    if unknown:
        raise SystemExit(
            f"{doc} names tables {unknown} that {report} does not have; it has {sorted(tables)}"
        )
    changed = sum(m["body"] != tables[m["name"]] for m in blocks)
    if changed:
        atomic_write_text(
            doc,
            TABLE_BLOCK.sub(
                lambda m: f"<!-- table: {m['name']} -->\n{tables[m['name']]}<!-- end table -->",
                text,
            ),
        )
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="the grid's output folder")
    parser.add_argument("--grid", choices=("full", "smoke"), default="full")
    parser.add_argument(
        "--sync",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="copy the report's tables into FILE's table blocks (repeatable)",
    )
    args = parser.parse_args(argv)
    declared = full_grid() if args.grid == "full" else smoke_grid(args.out)
    path = write_report(args.out, declared.cells)
    for doc in args.sync:
        print(f"{doc}: {sync_tables(doc, path)} tables changed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
