"""benchmarks/memory.py at a tiny size: it runs, and writes the fields its README promises."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
        [
            sys.executable,
            "-m",
            "benchmarks.memory",
            *TINY,
            "--variants",
            "id3,adamw",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
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
    umask = os.umask(0)
    os.umask(umask)
    for name in ("memory.json", "memory.md"):  # as open() makes them: no permission patching
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_parent_does_not_import_torch() -> None:
    # A parent holding torch would inflate every child's ru_maxrss (see benchmarks/harness.py).
    code = "import sys; import benchmarks.memory; print('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    assert proc.stdout.strip() == "False"


def test_parent_writes_results_only_after_its_children(tmp_path: Path) -> None:
    # Writing the results imports unmask (and so torch): that must wait for the last child.
    code = f"""
import sys
import benchmarks.memory as memory
seen = []
def fake_child(variant, cfg, timeout_s):
    seen.append("torch" in sys.modules)
    return {{"median_step_s": 1.0, "peak_rss_mb": 1.0}}
memory.run_variant_in_child = fake_child
memory.markdown_report = lambda report: "report"
memory.main(["--variants", "adamw,id3", "--out", {str(tmp_path)!r}])
print(seen, "torch" in sys.modules)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
        check=True,
    )  # fmt: skip
    assert proc.stdout.split("\n")[-2] == "[False, False] True"
    assert (tmp_path / "memory.json").is_file() and (tmp_path / "memory.md").is_file()


@pytest.mark.parametrize("argv", [["--sizes", "2,x"], ["--sizes", "--model", "minilm"]])
def test_bad_sizes_are_rejected(argv: list[str]) -> None:
    from benchmarks import memory

    with pytest.raises(SystemExit) as exc:
        memory.parse_args(argv)
    assert exc.value.code == 2
