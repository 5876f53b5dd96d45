#!/usr/bin/env bash
# GPU readiness check, for a machine with CUDA (none of ours has one; CI neither).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (default OUT_DIR: runs/gpu_check)
#
# 1. Runs the tests parametrised over the devices present on their CUDA cases (`-k cuda`:
#    tests/test_train_options.py, tests/test_trainer.py and any other test with a cuda id).
# 2. Measures, on the SmolLM2-135M shape (LlamaForCausalLM from its config, random init,
#    nothing downloaded; batch 8 x 256 tokens, bf16 autocast), the median step time and the
#    peak CUDA memory of ID3 (budget 0.1%), dense AdamW and peft LoRA r 8 (q_proj, v_proj).
# Writes OUT_DIR/gpu_check.json (the measurements, the test outcome, the machine) and
# OUT_DIR/pytest.log. Exits 1 with a message when no CUDA device is present; otherwise with
# the tests' exit code (the measurements are written either way).
#
# GPU_CHECK_SMOKE=1 runs step 2 on the CPU with a tiny shape and skips step 1: a check that
# the script itself works, on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_check}"
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if [ "${GPU_CHECK_SMOKE:-0}" != "1" ]; then
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False);" \
            "run this on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
        exit 1
    fi
    "$PY" -m pytest -q -k cuda tests >"$OUT/pytest.log" 2>&1
    TESTS_RC=$?
    tail -n 3 "$OUT/pytest.log"
else
    TESTS_RC=-1
fi

GPU_CHECK_OUT="$OUT" TESTS_RC="$TESTS_RC" "$PY" - <<'EOF'
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.memory import PRESETS, Config, build_model, build_optimizer, make_batches

smoke = os.environ.get("GPU_CHECK_SMOKE") == "1"
device = torch.device("cpu" if smoke else "cuda")
shape = dict(PRESETS["smollm2"])
cfg = Config(
    model="smollm2", layers=shape["layers"], hidden=shape["hidden"], heads=shape["heads"],
    kv_heads=shape["kv_heads"], intermediate=shape["intermediate"], vocab=shape["vocab"],
    num_labels=2, steps=12, warmup=3, total_steps=1000, batch=8, seq_len=256, budget="0.1%",
    lr=1e-5, seed=0, threads=os.cpu_count() or 1,
)
if smoke:
    cfg = replace(cfg, layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=100,
                  steps=3, warmup=1, batch=2, seq_len=16)


def measure(variant: str) -> dict:
    """Median step time (s) after warm-up and peak CUDA memory (bytes) of one variant."""
    model = build_model(cfg).to(device).train()
    model, opt, info = build_optimizer(variant, model, cfg)
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(cfg)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    result = {
        "median_step_s": statistics.median(seconds[cfg.warmup:]),
        "peak_cuda_memory_bytes": peak,
        "num_weights": sum(p.numel() for p in model.parameters()),
        "trainable_weights": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "optimizer_info": {k: v for k, v in info.items() if isinstance(v, (int, float, str, list))},
    }
    del model, opt, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


results = {variant: measure(variant) for variant in ("id3", "adamw", "lora")}
for name, r in results.items():
    base = results["adamw"]
    r["step_time_vs_adamw"] = r["median_step_s"] / base["median_step_s"]
    if r["peak_cuda_memory_bytes"] is not None:
        r["peak_memory_vs_adamw"] = r["peak_cuda_memory_bytes"] / base["peak_cuda_memory_bytes"]
report = {
    "benchmark": "gpu_check",
    "smoke": smoke,
    "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
    "torch_version": torch.__version__,
    "cuda_version": torch.version.cuda,
    "config": cfg.__dict__ | {"autocast": "bfloat16"},
    "tests_exit_code": int(os.environ["TESTS_RC"]),
    "results": results,
}
out = Path(os.environ["GPU_CHECK_OUT"]) / "gpu_check.json"
out.write_text(json.dumps(report, indent=2))
for name, r in results.items():
    peak = r["peak_cuda_memory_bytes"]
    mem = f"{peak / 2**20:,.0f} MiB" if peak is not None else "n/a"
    print(f"{name:6s} step {r['median_step_s'] * 1e3:8.1f} ms  peak {mem}", file=sys.stderr)
print(f"wrote {out}", file=sys.stderr)
EOF
BENCH_RC=$?
if [ "$BENCH_RC" -ne 0 ]; then
    echo "gpu_check: the step-time / memory comparison failed (exit $BENCH_RC)" >&2
    exit "$BENCH_RC"
fi
if [ "$TESTS_RC" -gt 0 ]; then
    echo "gpu_check: the CUDA tests failed; see $OUT/pytest.log" >&2
    exit "$TESTS_RC"
fi
exit 0
