"""benchmarks/sparse_backward.py: its LoRA-modules variant trains where LoRA trains, and its
rounds are merged as its README says (medians; ratios against each round's own references)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import sparse_backward as bench
from benchmarks.memory import LORA_TARGETS, Config, build_model
from unmask import resolve_budget

REPO = Path(__file__).resolve().parents[1]
TINY = Config(
    model="smollm2", layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=100,
    num_labels=2, steps=2, warmup=1, total_steps=2, batch=2, seq_len=8, budget="1%", lr=1e-3,
    seed=0, threads=1,
)  # fmt: skip


@pytest.mark.parametrize("model", ["smollm2", "minilm"])
def test_lora_modules_variant_draws_the_same_count_only_from_lora_targets(model):
    cfg = replace(TINY, model=model, heads=4 if model == "minilm" else TINY.heads)
    net = build_model(cfg)
    num_weights = sum(p.numel() for p in net.parameters())
    opt, kwargs = bench._selective("random-sparse-lora-modules", net, cfg, 1)
    assert kwargs["sparse_backward"] and kwargs["method"] == "random"
    assert opt.num_selected == resolve_budget(cfg.budget, num_weights)
    target = re.compile(rf"\.({'|'.join(LORA_TARGETS[model])})\.weight$")
    # The candidates (the sparse backward turns their requires_grad off) and what else trains.
    trainable = set(opt.selected()) | {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(target.search(n) for n in trainable)
    assert sum(i.numel() for i in opt.selected().values()) == opt.num_selected


def _round(step_s: float, lora_s: float, rss: float) -> dict:
    result = {"median_step_s": step_s, "peak_rss_mb": rss, "kernel_share": 0.1,
              "gradient_entries_per_step": 10, "num_selected": 5}  # fmt: skip
    bench._ratios(result, {"lora": {"median_step_s": lora_s, "peak_rss_mb": 100.0}})
    return result


def test_rounds_merge_to_medians_of_per_round_ratios():
    rounds = [_round(2.0, 1.0, 90.0), _round(3.0, 3.0, 110.0), _round(9.0, 2.0, 100.0)]
    merged = bench._over_rounds(rounds)
    assert merged["median_step_s"] == 3.0
    assert merged["peak_rss_mb"] == 100.0
    # Per round 2.0, 1.0, 4.5: the median of the ratios, not the ratio of the medians (1.5).
    assert merged["step_vs_lora"] == 2.0
    assert [r["median_step_s"] for r in merged["rounds"]] == [2.0, 3.0, 9.0]
    failed = {"error": "timed out"}
    assert bench._over_rounds([rounds[0], failed]) is failed
    assert bench._over_rounds([rounds[0]]) is rounds[0]


def test_tiny_grid_with_rounds_writes_every_variant(tmp_path):
    args = [
        "--models", "smollm2", "--layers", "1", "--hidden", "32", "--vocab", "100",
        "--batches", "2", "--budgets", "1%", "--steps", "2", "--warmup", "1", "--rounds", "2",
        "--variants", "random-sparse,random-sparse-lora-modules", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sparse_backward", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "sparse_backward.json").read_text())
    assert report["rounds"] == 2
    cell = next(c for c in report["cells"] if c["budget"] == "1%")
    for name in ("random-sparse", "random-sparse-lora-modules"):
        result = cell["variants"][name]
        assert "error" not in result, result
        assert len(result["rounds"]) == 2 and result["step_vs_lora"] > 0
    assert "random-sparse-lora-modules" in (tmp_path / "sparse_backward.md").read_text()
