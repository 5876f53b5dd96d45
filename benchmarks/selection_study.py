"""Selection study (issue 14): controlled experiments on why ID3 loses to a random mask.

    .venv/bin/python -m benchmarks.selection_study run            # missing experiments, in order
    .venv/bin/python -m benchmarks.selection_study run --list     # what is done and what is not

Every experiment is one training run of benchmarks.quality's harness (same model, data, batch
order and evaluation) on a *validation* split, never the test split; it writes one JSON record
to benchmarks/results/selection/records/<id>.json. Runs go one at a time, each in its own
process, so they can be stopped and resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.quality import Cell, Setting, full_grid, run_cell

RESULTS = Path("benchmarks/results/selection")


def _register_study_methods() -> None:
    """Diagnostic methods of this study only (not library methods): see SNRStatic."""
    import torch

    from unmask.choose.methods import ID3SNR, METHODS

    class SNRStatic(ID3SNR):
        """Static mask: the top-B accumulated SNR over the calibration batches.

        key = |Σ_b g_b| / sqrt(Σ_b Σ_t g_{b,t}²) over every token of every calibration batch:
        the same statistic as id3-snr, with 8 batches of evidence instead of one. Holds two
        dense float32 accumulators (a diagnosis of score noise, not a method to ship).
        """

        name = "snr-static"
        kind = "static"
        needs_calibration = True

        def __post_init__(self) -> None:
            super().__post_init__()
            self._sum_g: dict[int, torch.Tensor] = {}
            self._sum_s: dict[int, torch.Tensor] = {}

        def clear(self) -> None:
            if self._sum_g and getattr(self, "_ranked", False):
                self._sum_g, self._sum_s = {}, {}
                self.detach()  # the mask is chosen: no more statistics during training
                return
            # calibrate() clears before every batch and once after the last, while the
            # previous batch's gradients are still there: add them to the accumulators.
            if self._moments is not None:
                for p in self._params.values():
                    s = self._moments.moments(p)
                    if p.grad is not None and s is not None:
                        key = id(p)
                        if key not in self._sum_g:
                            self._sum_g[key] = torch.zeros_like(p, dtype=torch.float32)
                            self._sum_s[key] = torch.zeros_like(p, dtype=torch.float32)
                        self._sum_g[key].add_(p.grad.detach())
                        self._sum_s[key].add_(s)
            super().clear()

        def shard_keys(self, name, shard, signal, out, start, numel):
            keys = out[: shard.numel()]
            self._ranked = True
            key = id(self._params[name])
            if key not in self._sum_g:
                return keys.zero_()
            g = self._sum_g[key].reshape(-1)[start : start + shard.numel()]
            s = self._sum_s[key].reshape(-1)[start : start + shard.numel()]
            torch.div(g.abs(), s.sqrt(), out=keys)
            return keys.nan_to_num_(nan=0.0, posinf=0.0)

    METHODS.setdefault(SNRStatic.name, SNRStatic)


_register_study_methods()
ENCODER = full_grid().settings["encoder"]


@dataclass(frozen=True)
class Experiment:
    """One run: a quality cell, its training setting and SelectiveOptimizer options."""

    study: str
    cell: Cell
    setting: Setting = ENCODER
    options: dict[str, Any] = field(default_factory=dict)
    variant: str = ""

    @property
    def id(self) -> str:
        c = self.cell
        parts = [self.study, c.task, c.method, self.variant, f"s{c.seed}", f"b{c.budget}"]
        parts += [f"lr{c.lr:g}", f"n{self.setting.steps}"]
        return "_".join(p for p in parts if p).replace("%", "pct").replace("+", "-plus-")


def _cell(method: str, lr: float, seed: int = 0, task: str = "polarity", budget="0.1%") -> Cell:
    return Cell("study", "encoder", task, method, budget, seed, "validation", lr)


def experiments() -> list[Experiment]:
    """Every experiment of the study, most informative first."""
    out: list[Experiment] = []
    # 1. id3-snr's learning rate: the quality grid's tuning cells are these runs
    # (tune_polarity_id3-snr_s0_b*_lr*), so the study does not repeat them.
    # 2. Untrained pretrained modules: the pooler as a candidate (default), excluded (frozen),
    # or dense outside the budget (148K more trained weights: a diagnosis, not a fair method).
    pooler_dense = {"dense_extra": ["pooler"], "dense_in_budget": False}
    for lr in (3e-3, 1e-3):
        out.append(Experiment("pooler", _cell("id3", lr), variant="id3-rerun"))
        out.append(
            Experiment("pooler", _cell("id3", lr), options={"exclude": ["pooler"]},
                       variant="pooler-excluded")
        )  # fmt: skip
    out.append(
        Experiment("pooler", _cell("id3", 3e-3), options=pooler_dense, variant="pooler-dense-out")
    )
    # 3. Seeds: the three selections at their best validation rate of seed 0.
    for seed in (1, 2):
        for method, lr in (("id3-snr", 1e-2), ("random", 3e-2), ("id3", 3e-3)):
            out.append(Experiment("seeds", _cell(method, lr, seed)))
    # 3c. Score noise: the same statistic from 8 batches (a static mask) instead of one.
    for seed in (0, 1, 2):
        for lr in (1e-2, 3e-2):
            out.append(Experiment("evidence", _cell("snr-static", lr, seed)))
    # 3b. Allocation: id3-snr with every tensor given a random mask's expected share.
    proportional = {"method_options": {"allocation": "proportional"}}
    # (rates: id3-snr's best at 0.1% after the key fix of 32679a1, and the next one up)
    for seed, lr in ((0, 3e-3), (0, 1e-2), (1, 3e-3), (1, 1e-2)):
        out.append(
            Experiment("allocation", _cell("id3-snr", lr, seed), options=proportional,
                       variant="proportional")
        )  # fmt: skip
    # 4. Training length: is 100 steps (one epoch) long enough to rank the methods?
    # (each method at its tuned 100-step rate of the quality grid, 0.1%)
    for steps in (200, 400):
        longer = replace(ENCODER, steps=steps)
        for method, lr in (("id3-snr", 3e-3), ("random", 3e-2), ("id3", 3e-3)):
            out.append(Experiment("length", _cell(method, lr), setting=longer))
    # 5. Concentration of the static masks (and a check that reruns reproduce the tuning).
    for method, lr in (("random", 3e-2), ("pafi", 3e-2), ("fish", 1e-3)):
        out.append(Experiment("masks", _cell(method, lr)))
    # 6. The second task's validation split: does the rate and the ranking carry over?
    for method, lrs in (("id3-snr", (3e-3, 1e-2, 3e-2)), ("random", (1e-2, 3e-2, 1e-1)),
                        ("id3", (1e-3, 3e-3, 1e-2))):  # fmt: skip
        out += [Experiment("task2", _cell(method, lr, task="uncertainty")) for lr in lrs]
    # 7. unmask_every (issue 18): ID3 unmasking every 10th step, with the sparse backward in
    # between, against the paper's every step; both rerun here, at ID3's tuned rate.
    for seed in (0, 1, 2):
        for every in (1, 10):
            options = {"unmask_every": every, "sparse_backward": every > 1}
            out.append(Experiment("every", _cell("id3", 3e-3, seed), options=options,
                                  variant=f"every{every}"))  # fmt: skip
    return out


def score_noise(batches: int = 6, threads: int = 2) -> dict[str, Any]:
    """How much one mini-batch decides each score's choice, on the pretrained model.

    For each of `batches` training batches (polarity, the harness's seed-0 order), rank every
    candidate weight (all but the new head) by each score and keep the top k, for k = one
    step's quota (B/T) and k = B. Reports the mean Jaccard overlap of the top-k over pairs of
    batches (1 = the batch does not matter, about k/N = chance), and where the top-B of one
    batch sits: share in the pooler, in the embeddings, and in the top 1% of each weight
    matrix's input columns (see quality._Trainer.concentration).
    """
    import itertools
    import math

    import torch

    from benchmarks.quality import budget_count
    from unmask.app.models import load_model
    from unmask.app.tasks import load_task
    from unmask.app.tasks.batches import batch_order, encode
    from unmask.choose import scores
    from unmask.choose.token_moments import TokenMoments

    torch.set_num_threads(threads)
    setting = ENCODER
    task = load_task("polarity", seed=0, train_size=setting.train_size)
    torch.manual_seed(0)
    model, tokenizer = load_model(setting.model, task)
    model.train()
    total = sum(p.numel() for p in model.parameters())
    budget = budget_count("0.1%", model, total)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("classifier")]
    moments = TokenMoments(model, [p for _, p in named])
    order = batch_order(len(task.train), setting.batch_size, setting.steps, 0)[:batches]
    ks = {"step_quota": budget // setting.steps, "budget": budget}
    tops: dict[str, dict[str, list]] = {}
    where: dict[str, list[dict[str, float]]] = {}
    for idx in order:
        model.zero_grad()
        moments.clear()
        inputs = encode(tokenizer, task, [task.train[i] for i in idx], setting.max_length)
        model(**inputs).loss.backward()
        keys = {}
        for name, p in named:
            g = p.grad.reshape(-1)
            out = torch.empty(p.numel())
            keys[name] = {
                "id3": scores.d3(p, p.grad, out.clone(), 1e-3, 1.0),
                "gradient": g.abs(),  # exp = 0 (and FISH on one batch: g² ranks the same)
                "id3-snr": (g.abs() / moments.moments(p).reshape(-1).sqrt()).nan_to_num_(
                    nan=0.0, posinf=0.0
                ),
            }
        for score in ("id3", "gradient", "id3-snr"):
            flat = torch.cat([keys[n][score] for n, _ in named])
            top = flat.topk(budget).indices
            for k_name, k in ks.items():
                tops.setdefault(score, {}).setdefault(k_name, []).append(set(top[:k].tolist()))
            where.setdefault(score, []).append(_placement(top, named))
    result: dict[str, Any] = {
        "batches": batches,
        "k": ks,
        "weights": sum(p.numel() for _, p in named),
    }
    for score in tops:
        overlap = {
            k_name: round(
                sum(len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2))
                / math.comb(len(sets), 2),
                4,
            )
            for k_name, sets in tops[score].items()
        }
        mean = {
            key: round(sum(w[key] for w in where[score]) / batches, 4) for key in where[score][0]
        }
        result[score] = {"jaccard_top_k": overlap, "placement_of_top_B": mean}
    return result


def _placement(top, named) -> dict[str, float]:
    import math

    import torch

    offsets, start = [], 0
    for _, p in named:
        offsets.append(start)
        start += p.numel()
    bounds = torch.tensor(offsets[1:])
    which = torch.bucketize(top, bounds, right=True)
    pooler = embeddings = in_top_cols = two_d = 0
    for i, (name, p) in enumerate(named):
        local = top[which == i] - offsets[i]
        n = local.numel()
        pooler += n * ("pooler" in name)
        embeddings += n * ("embeddings" in name)
        if p.dim() == 2 and n:
            cols = p.shape[1]
            counts = (local % cols).bincount(minlength=cols).sort(descending=True).values
            in_top_cols += int(counts[: math.ceil(cols / 100)].sum())
            two_d += n
    total = top.numel()
    return {
        "pooler": pooler / total,
        "embeddings": embeddings / total,
        "top1pct_columns": in_top_cols / max(two_d, 1),
    }


STUDY_TITLES = {
    "pooler": "The untrained pooler: candidate, excluded, or dense outside the budget (ID3)",
    "seeds": "Seeds 1 and 2 at each selection's best seed-0 rate",
    "allocation": "id3-snr with each tensor's share of a random mask first (proportional)",
    "evidence": "More evidence: the SNR of 8 calibration batches as a static mask",
    "length": "Training length (seed 0, the 100-step rates)",
    "masks": "Static masks at their tuned rates",
    "task2": "Uncertainty's validation split",
    "every": "ID3 unmasking every step or every 10th (sparse backward in between)",
}


def report(out: Path) -> Path:
    """report.md: one table per study from the records, and the score-noise measurement."""
    from unmask.store.files import atomic_write_text

    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    order = {e.id: n for n, e in enumerate(experiments())}
    records.sort(key=lambda r: order.get(r["id"], len(order)))
    lines = [
        "# Selection study (validation splits only)",
        "",
        f"{len(records)} runs; generated by `python -m benchmarks.selection_study report` from "
        "`records/*.json`. Setting: benchmarks.quality's encoder (MiniLM, batch 16, 64 tokens, "
        "1,600 training sentences); accuracy on the 400-sentence validation split. "
        "top-1% columns / rows: the share of the selected 2-D weights in the 1% of each "
        "matrix's input columns (output rows) holding the most of them (uniform: about 0.01 "
        "plus sampling noise). pooler: selected weights in `bert.pooler`.",
        "",
    ]
    for study, title in STUDY_TITLES.items():
        rows = [r for r in records if r.get("study") == study]
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            "| task | method | variant | seed | lr | steps | accuracy % | top-1% columns | "
            "top-1% rows | pooler | median step s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            conc = r.get("concentration") or {}
            pooler = sum(v for k, v in (r.get("allocation") or {}).items() if "pooler" in k)
            lines.append(
                f"| {r['task']} | {r['method']} | {r['variant'] or '–'} | {r['seed']} | "
                f"{r['lr']:g} | {r['training']['steps']} | {100 * r['value']:.2f} | "
                f"{conc.get('top1pct_columns', '–')} | {conc.get('top1pct_rows', '–')} | "
                f"{pooler:,} | {r['step_seconds_median']:.3f} |"
            )
        lines.append("")
    noise = out / "score_noise.json"
    if noise.is_file():
        data = json.loads(noise.read_text())
        lines += [
            "## One mini-batch's choice, on the pretrained model (`selection_study noise`)",
            "",
            f"{data['batches']} training batches; top-k by each score over all "
            f"{data['weights']:,} candidate weights, k = one step's quota "
            f"({data['k']['step_quota']}) or the budget ({data['k']['budget']:,}).",
            "",
            "| score | Jaccard of top quota between batches | Jaccard of top-B | "
            "top-B in pooler | top-B in embeddings | top-B in top-1% columns |",
            "|---|---|---|---|---|---|",
        ]
        for score in ("id3", "gradient", "id3-snr"):
            d = data[score]
            j, w = d["jaccard_top_k"], d["placement_of_top_B"]
            lines.append(
                f"| {score} | {j['step_quota']:.3f} | {j['budget']:.3f} | {w['pooler']:.3f} | "
                f"{w['embeddings']:.3f} | {w['top1pct_columns']:.3f} |"
            )
        lines.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def run_experiment(exp: Experiment, threads: int) -> dict[str, Any]:
    record = run_cell(exp.cell, exp.setting, None, threads, exp.options)
    return {**record, "id": exp.id, "study": exp.study, "variant": exp.variant}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the missing experiments, one at a time")
    run.add_argument("--out", type=Path, default=RESULTS)
    run.add_argument("--list", action="store_true")
    run.add_argument("--limit", type=int, default=None)
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--study", action="append", help="only this study's experiments")
    rep = sub.add_parser("report", help="write report.md from the records")
    rep.add_argument("--out", type=Path, default=RESULTS)
    noise = sub.add_parser("noise", help="score noise from one mini-batch (no training)")
    noise.add_argument("--out", type=Path, default=RESULTS)
    one = sub.add_parser("one", help=argparse.SUPPRESS)
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--threads", type=int, default=2)
    one.add_argument("id")
    args = parser.parse_args(argv)
    todo = {e.id: e for e in experiments()}
    records = args.out / "records"
    if args.command == "report":
        print(report(args.out))
        return 0
    if args.command == "noise":
        from unmask.store.files import atomic_write_text

        result = score_noise()
        atomic_write_text(args.out / "score_noise.json", json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 0
    if args.command == "one":
        from unmask.store.files import atomic_write_text

        record = run_experiment(todo[args.id], args.threads)
        atomic_write_text(records / f"{args.id}.json", json.dumps(record, indent=1))
        return 0
    records.mkdir(parents=True, exist_ok=True)
    missing = [i for i in todo if not (records / f"{i}.json").is_file()]
    if args.study:
        missing = [i for i in missing if todo[i].study in args.study]
    if args.list:
        for i in todo:
            print(("todo  " if i in missing else "done  ") + i)
        print(f"{len(todo) - len(missing)} of {len(todo)} done")
        return 0
    failed = 0
    for n, i in enumerate(missing[: args.limit]):
        t0 = time.time()
        code = subprocess.run(
            [sys.executable, "-m", "benchmarks.selection_study", "one", "--out", str(args.out),
             "--threads", str(args.threads), i],
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        ).returncode  # fmt: skip
        value = json.loads((records / f"{i}.json").read_text())["value"] if code == 0 else None
        print(f"[{n + 1}/{len(missing)}] {i}: {value} in {time.time() - t0:.0f} s", flush=True)
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
