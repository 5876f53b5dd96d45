"""benchmarks/memory.py at a tiny size: it runs, and writes the fields its README promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
TINY = [
    "--model", "minilm", "--layers", "1", "--hidden", "32", "--vocab", "100",
    "--steps", "2", "--warmup", "1", "--batch", "2", "--seq-len", "8",
]  # fmt: skip
MEASURED = (
    "median_step_s",
    "peak_rss_mb",
    "peak_rss_before_steps_mb",
    "ratio_step_vs_adamw",
    "ratio_peak_rss_vs_adamw",
)


def test_tiny_run_writes_json_and_markdown(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--variants", "id3,adamw", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "memory.json").read_text())
    for key in ("torch_version", "cpu_count", "platform", "git_commit"):
        assert key in report["machine"]
    assert report["config"]["threads"] == 2
    (run,) = report["runs"]
    variants = run["variants"]
    assert list(variants) == ["adamw", "id3"]  # run in the fixed order, not the given one
    for name, result in variants.items():
        assert "error" not in result and "skipped" not in result, name
        for key in MEASURED:
            assert result[key] > 0, (name, key)
        assert result["threads"] == 2
        # No LoRA run, so nothing to compare with.
        assert result["ratio_peak_rss_vs_lora"] is None
    assert variants["adamw"]["ratio_step_vs_adamw"] == 1.0
    assert variants["adamw"]["ratio_peak_rss_vs_adamw"] == 1.0
    assert variants["id3"]["optimizer"] == "SelectiveOptimizer"

    markdown = (tmp_path / "memory.md").read_text()
    assert "| variant | step median (ms) | vs AdamW | peak RSS (MB) |" in markdown
    assert "| adamw |" in markdown and "| id3 |" in markdown
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_parent_does_not_import_torch() -> None:
    # A parent holding torch would inflate every child's ru_maxrss (see optimizer_step.py).
    code = (
        f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import memory; "
        "memory.load_files_module(); print('torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("argv", [["--sizes", "2,x"], ["--sizes", "--model", "minilm"]])
def test_bad_sizes_are_rejected(argv: list[str]) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import memory
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with pytest.raises(SystemExit) as exc:
        memory.parse_args(argv)
    assert exc.value.code == 2
