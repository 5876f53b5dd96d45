"""The quality benchmark harness end to end on its smoke grid (tiny model, nothing downloaded)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from benchmarks import quality
from benchmarks.quality_report import (
    TABLE_BLOCK,
    _marked,
    claims_table,
    sync_tables,
    write_report,
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    assert (
        quality.main(
            ["run", "--grid", "smoke", "--out", str(out), "--in-process", "--threads", "0"]
        )
        == 0
    )
    return out


def test_every_cell_writes_one_complete_record(smoke):
    grid = quality.smoke_grid(smoke)
    records = {r["id"]: r for r in quality.load_records(smoke)}
    # Every declared cell, plus the extra tuning rates of methods whose best rate was at an edge.
    assert set(records) >= {c.id for c in grid.cells}
    extra = [records[i] for i in set(records) - {c.id for c in grid.cells}]
    assert extra and all(r["phase"] == "tune" for r in extra)
    per_method = {}
    for r in records.values():
        if r["phase"] == "tune":
            per_method.setdefault(r["method"], []).append(r["lr"])
    for method, rates in per_method.items():
        assert 2 <= len(rates) <= 2 + quality.MAX_EXTRA_RATES, method
    for r in records.values():
        assert 0.0 <= r["value"] <= 1.0
        assert r["weights_changed"] > 0 and r["delta_bytes"] > 0
        assert r["train_seconds"] >= 0 and r["step_seconds_median"] > 0 and r["peak_rss_mb"] > 0
        assert r["unmask_version"] and r["git_commit"] is not None
        if r["budget"] is not None and r["method"] != "id3-repeat":
            # Exact budget: never more weights changed than the budget allows.
            assert r["weights_changed"] <= r["budget_weights"]
        if r["phase"] != "tune":
            assert r["split"] == "test"


def test_tuned_rate_is_the_best_on_validation(smoke):
    records = quality.load_records(smoke)
    for r in records:
        if r["phase"] == "tune":
            assert r["split"] == "validation"
    chosen = quality.tuned_lrs(records)
    for r in records:
        if r["phase"] == "main":
            tried = [t for t in records if t["phase"] == "tune" and t["method"] == r["method"]]
            best = max(tried, key=lambda t: (t["value"], -t["lr"]))
            assert r["lr"] == best["lr"] == quality.rate_for(chosen, "encoder", r["method"], "5%")


def test_budgets_resolve_against_the_whole_model_and_lora(smoke):
    records = quality.load_records(smoke)
    total = records[0]["weights_total"]
    one = next(r for r in records if r["phase"] == "main" and r["budget"] == "1%")
    assert one["budget_weights"] == total // 100
    lora = next(r for r in records if r["method"] == "lora")
    at_lora = next(r for r in records if r["method"] == "id3" and r["budget"] == "lora")
    assert at_lora["budget_weights"] == lora["weights_changed"]


def test_rerun_resumes_without_training_again(smoke, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (smoke / "records").iterdir()}
    victim = next(iter(sorted(before)))
    (smoke / "records" / victim).unlink()
    assert (
        quality.main(
            ["run", "--grid", "smoke", "--out", str(smoke), "--in-process", "--threads", "0"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    started = [line for line in printed.splitlines() if line.startswith("[")]
    assert started == [f"[1] {victim.removesuffix('.json')} ..."]
    after = {p.name: p.stat().st_mtime_ns for p in (smoke / "records").iterdir()}
    assert {k: v for k, v in after.items() if k != victim} == {
        k: v for k, v in before.items() if k != victim
    }


def test_report_has_tables_and_plots(smoke):
    cells = quality.smoke_grid(smoke).cells
    missing = dataclasses.replace(cells[-1], seed=99)
    path = write_report(smoke, [*cells, missing])
    text = path.read_text()
    settings = {c.setting for c in cells}
    assert len(settings) == 1
    n = sum(c.setting == missing.setting for c in cells)
    assert f"{missing.setting} grid: {n} of {n + 1} declared runs done; the 1 left" in text
    runs = re.search(r"(\d+) runs; generated", text)[1]
    assert re.search(rf"- training time in all: \d+\.\d h in {runs} runs\.", text)
    complete = write_report(smoke, cells).read_text()
    assert f"{missing.setting} grid: {n} of {n} declared runs done.\n" in complete
    for method in quality.ENCODER_METHODS:
        assert f"| {method} |" in text
    assert "ID3 ablations" in text and "Learning-rate search" in text
    assert "claims, tested" in text and "encoder training time (loading" in text
    for png in ("quality_sentiment.png", "allocation_id3_vs_pafi.png"):
        data = (smoke / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_rate_ladder_and_edge_extension():
    assert [quality.next_rate(x, up=True) for x in (1e-3, 3e-3, 1e-2)] == [3e-3, 1e-2, 3e-2]
    assert [quality.next_rate(x, up=False) for x in (1e-3, 3e-4, 1e-4)] == [3e-4, 1e-4, 3e-5]
    grid = quality.Grid(
        {},
        [
            quality.Cell("tune", "s", "t", "id3", "1%", 0, "validation", lr)
            for lr in (1e-3, 3e-3, 1e-2)
        ],
    )

    def record(lr, value):
        return {
            "phase": "tune", "setting": "s", "method": "id3", "budget": "1%", "lr": lr,
            "value": value,
        }  # fmt: skip

    middle = [record(1e-3, 0.6), record(3e-3, 0.8), record(1e-2, 0.7)]
    assert quality.tuning_extension(grid, middle, "s", "id3", "1%") is None
    top = [record(1e-3, 0.6), record(3e-3, 0.7), record(1e-2, 0.8)]
    assert quality.tuning_extension(grid, top, "s", "id3", "1%").lr == 3e-2
    assert quality.tuning_extension(grid, top[:2], "s", "id3", "1%") is None  # base rates first
    capped = top + [record(3e-2, 0.9), record(1e-1, 0.95)]
    assert quality.tuning_extension(grid, capped, "s", "id3", "1%") is None  # at most 2 extra rates
    # Rates an earlier search tried below the declared ones do not use up the upward extensions.
    earlier = top + [record(1e-4, 0.5), record(3e-4, 0.55)]
    assert quality.tuning_extension(grid, earlier, "s", "id3", "1%").lr == 3e-2
    # Another budget's search is another search.
    other = [dict(r, budget="2%") for r in top]
    assert quality.tuning_extension(grid, other, "s", "id3", "1%") is None


def _main_record(method, budget, value, seed=0, n_eval=800):
    return {
        "phase": "main", "task": "polarity", "method": method, "budget": budget,
        "value": value, "seed": seed, "task_sizes": {"eval": n_eval},
    }  # fmt: skip


def _claim_rows(records, claim):
    return [line for line in claims_table(records) if line.startswith(f"| {claim} |")]


def test_claims_verdict_uses_seed_variance_and_eval_sampling():
    # Three seeds each, 10 points apart with tiny seed spread: clearly holds.
    clear = [_main_record("id3", "0.1%", 0.80 + d, s) for s, d in enumerate((0, 0.01, -0.01))]
    clear += [_main_record("pafi", "0.1%", 0.70 + d, s) for s, d in enumerate((0, 0.01, -0.01))]
    (row,) = _claim_rows(clear, "ID3 beats PaFi")
    assert "| +10.0 |" in row and row.endswith("| holds |")
    # The same 10-point gap on a 40-example eval set is within sampling noise.
    small = [dict(r, task_sizes={"eval": 40}) for r in clear]
    (row,) = _claim_rows(small, "ID3 beats PaFi")
    assert row.endswith("| no clear difference |")
    # Large seed spread on the eval set of 800 also hides it.
    spread = [_main_record("id3", "0.1%", v, s) for s, v in enumerate((0.95, 0.8, 0.65))]
    spread += [_main_record("pafi", "0.1%", v, s) for s, v in enumerate((0.55, 0.7, 0.85))]
    (row,) = _claim_rows(spread, "ID3 beats PaFi")
    assert row.endswith("| no clear difference |")
    # A single seed is flagged; a clearly lower ID3 reverses the claim.
    reversed_ = [_main_record("id3", "0.1%", 0.6), _main_record("pafi", "0.1%", 0.8)]
    (row,) = _claim_rows(reversed_, "ID3 beats PaFi")
    assert row.endswith("does not hold (b clearly better) (1 seed) |")


def test_claims_compare_fixed_size_methods_at_the_stated_budget():
    records = [
        _main_record("id3", "0.1%", 0.78), _main_record("id3", "0.03%", 0.5),
        _main_record("full", None, 0.79),
    ]  # fmt: skip
    (row,) = _claim_rows(records, "ID3 at 0.1% matches full fine-tuning")
    assert "| 0.1% |" in row and "| -1.0 |" in row and "holds (within 2 SE)" in row
    assert claims_table([_main_record("id3", "0.1%", 0.78)]) == []


def test_count_zeros_counts_exact_zeros_per_tensor():
    from benchmarks.zero_weights import count_zeros

    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 1.0, -0.0, 2.0]] * 3))
        model.bias.fill_(1e-30)  # tiny is not zero
    assert count_zeros(model) == {"weights": 15, "zeros": 6, "zeros_per_tensor": {"weight": 6}}


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_committed_docs_tables_are_report_tables(tmp_path, doc):
    """README's headline table and docs/results.md's tables must be report.md's, verbatim: a
    sync of the committed files changes nothing, and a hand edit to a number is caught and
    undone."""
    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / Path(doc).name
    copy.write_text((root / doc).read_text())
    report = root / quality.RESULTS / "report.md"
    assert sync_tables(copy, report) == 0
    edited = copy.read_text().replace("| full | – |", "| full | 99.9 |", 1)
    assert edited != copy.read_text()
    copy.write_text(edited)
    assert sync_tables(copy, report) == 1
    assert copy.read_text() == (root / doc).read_text()


def test_readme_holds_only_the_headline_table():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert [m["name"] for m in TABLE_BLOCK.finditer(readme)] == ["polarity"]
    assert len(readme.splitlines()) <= 200


def test_sync_places_tables_by_name_and_refuses_unknown_names(tmp_path):
    report = tmp_path / "report.md"
    sections = [[f"### {n}", "", f"| {n} | x |", "|---|---|", f"| a | {i} |", ""]
                for i, n in enumerate("ABCDEF")]  # fmt: skip
    report.write_text("\n".join(line for i, sec in enumerate(sections)
                                for line in _marked("ABCDEF"[i], sec)))  # fmt: skip

    def block(name, body="| old |\n"):
        return f"<!-- table: {name} -->\n{body}<!-- end table -->\n"

    doc = tmp_path / "doc.md"
    # Blocks in another order than the report's, with prose between: each gets its own table.
    doc.write_text("intro\n" + block("B") + "prose\n" + block("A") + "end\n")
    assert sync_tables(doc, report) == 2
    text = doc.read_text()
    assert text.index("| B | x |") < text.index("prose") < text.index("| A | x |")
    assert "| old |" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert sync_tables(doc, report) == 0  # idempotent
    before = "x\n" + block("A") + block("Z")
    doc.write_text(before)
    with pytest.raises(SystemExit, match="does not have"):
        sync_tables(doc, report)
    assert doc.read_text() == before  # nothing written
    doc.write_text("no blocks\n")
    with pytest.raises(SystemExit, match="no '<!-- table"):
        sync_tables(doc, report)


def test_every_declared_run_has_declared_tuning():
    grid = quality.full_grid()
    tunes = {(c.setting, c.method, c.budget) for c in grid.cells if c.phase == "tune"}
    for cell in grid.cells:
        if cell.lr is None:
            assert (cell.setting, cell.method, quality.tune_budget(grid, cell)) in tunes, cell.id


def test_report_keeps_only_runs_whose_own_budget_tuning_chose_their_rate():
    from benchmarks.quality_report import current

    tune = [quality.Cell("tune", "s", "t", "id3", b, 0, "validation", lr)
            for b in ("1%", "2%") for lr in (1e-3, 3e-3, 1e-2)]  # fmt: skip
    main = [quality.Cell("main", "s", "t", "id3", b, 0, "test") for b in ("1%", "2%")]

    def record(cell, lr, value=0.5):
        return {"id": cell.id if cell.lr is None else cell.id, "phase": cell.phase,
                "setting": "s", "method": "id3", "budget": cell.budget, "lr": lr,
                "split": cell.split, "value": value}  # fmt: skip

    # Tuning at 1% is complete (best 3e-3 in the middle); at 2% only one rate has run.
    records = [record(c, c.lr, 0.8 if c.lr == 3e-3 else 0.6) for c in tune if c.budget == "1%"]
    records.append(record(tune[3], tune[3].lr))
    records += [record(main[0], 3e-3), record(main[1], 3e-3)]
    kept = {r["id"] for r in current(records, tune + main)}
    assert main[0].id in kept  # its own budget's tuning chose its rate
    assert main[1].id not in kept  # 2%'s tuning is not complete: not the 1% rate either
    records[-2]["lr"] = 1e-2
    assert main[0].id not in {r["id"] for r in current(records, tune + main)}


def test_the_grid_does_not_import_its_report():
    """The report reads the grid's declarations; the grid never imports the report (no cycle)."""
    import ast

    tree = ast.parse(Path(quality.__file__).read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not any("quality_report" in (name or "") for name in imported)
