"""A fixed-seed run of every method, recorded so that a restructure can prove it changed nothing.

`python tests/behaviour_snapshot.py record` writes tests/golden/behaviour.json: for every method in
METHODS, on the tiny BERT and Llama models, in the standard mode and (where the method allows it)
low-memory mode, the weights selected after every step and the final values of every weight that
changed, as sha256 fingerprints (see `fingerprint`). `test_behaviour_snapshot.py` replays the
runs and compares selections and the set of changed weights exactly, and their values bit for bit
where the float path matches the recording machine's, and to a tolerance where it does not (a
CPU with other SIMD kernels, e.g. AVX2 against AVX-512, rounds a GEMM differently; see
test_behaviour_snapshot.ROUNDING; `python tests/behaviour_snapshot.py compare` prints how far
this machine is from the recording).

It also writes tests/golden/checkpoint_v0_1.pt, an optimizer checkpoint in the layout written by
unmask 0.1, which later versions must keep loading.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import MODELS, make_batches, snapshot  # noqa: E402

from unmask import METHODS, SelectiveOptimizer  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
STEPS = 5
LR = 1e-2


def _configs() -> list[tuple[str, str, bool]]:
    out = []
    for method in sorted(METHODS):
        for kind in sorted(MODELS):
            if method == "bitfit" and kind == "llama":
                continue  # no bias terms
            out.append((method, kind, False))
            if METHODS[method].supports_low_memory:
                out.append((method, kind, True))
    return out


def run(method: str, kind: str, low_memory: bool) -> dict:
    """Train STEPS steps; returns {"selected": [per-step {name: indices}], "changed": {...}}."""
    model = MODELS[kind]()
    base = snapshot(model)
    options: dict = dict(method=method, lr=LR, weight_decay=0.01, low_memory=low_memory)
    if METHODS[method].takes_budget:
        options.update(budget="2%", total_steps=STEPS)
    if kind == "bert":
        options["dense"] = ["classifier"]
    opt = SelectiveOptimizer(model, **options)
    batches = make_batches(kind, STEPS + 2)
    if METHODS[method].needs_calibration:
        opt.calibrate(batches[STEPS:])
    selected = []
    for batch in batches[:STEPS]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        selected.append(_selection_sha(opt.selected()))
    changed = _changed(model, base)
    opt.close()
    return {"selected": selected, "changed": changed}


def _changed(model: torch.nn.Module, base: dict) -> dict[str, dict]:
    """{name: fingerprint of the weights that differ from `base`}: their flat indices, the sha256
    of their values' bytes (bit-identity) and 4 fixed random projections of the values in float64
    (a comparison to a tolerance, for machines that round differently)."""
    out = {}
    for name, p in model.named_parameters():
        where = (p.detach() != base[name]).flatten().nonzero().flatten()
        if where.numel():
            out[name] = fingerprint(where, p.detach().flatten()[where])
    return out


def _changed_values(model: torch.nn.Module, base: dict) -> dict[str, tuple]:
    """{name: (flat indices that differ from `base`, their values)}."""
    out = {}
    for name, p in model.named_parameters():
        where = (p.detach() != base[name]).flatten().nonzero().flatten()
        if where.numel():
            out[name] = (where, p.detach().flatten()[where].clone())
    return out


def _selection_sha(selected: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, idx in sorted(selected.items()):
        h.update(name.encode() + b"\0" + idx.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def fingerprint(where: torch.Tensor, values: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(values.numel(), 4, generator=g, dtype=torch.float64)
    return {
        "indices": _sha(where),
        "sha256": _sha(values),
        "projections": (values.double() @ directions).tolist(),
        "count": values.numel(),
    }


def deviation(have: dict, want: dict) -> float:
    """How far two fingerprints' values are apart, as a share of the most the weights can move
    (about LR per step, Adam's update being lr * m / sqrt(v)): the largest projection difference
    over LR * STEPS * sqrt(count), which bounds it when every weight moves by at most that."""
    diff = max(abs(a - b) for a, b in zip(have["projections"], want["projections"], strict=True))
    return diff / (LR * STEPS * math.sqrt(have["count"]))


def compare() -> None:
    """Print the largest `deviation`s of this machine's runs from the recording."""
    recorded = json.loads((GOLDEN / "behaviour.json").read_text())
    found = []
    for method, kind, low in _configs():
        key = f"{method}/{kind}/{'low' if low else 'std'}"
        for name, have in run(method, kind, low)["changed"].items():
            want = recorded[key]["changed"].get(name)
            if want is not None and have["sha256"] != want["sha256"]:
                found.append((deviation(have, want), key, name))
    print(f"{len(found)} tensors differ in bits from the recording; the largest deviations:")
    for share, key, name in sorted(found, reverse=True)[:10]:
        print(f"  {share:.1e}  {key}  {name}")


def record() -> None:
    GOLDEN.mkdir(exist_ok=True)
    runs = {f"{m}/{k}/{'low' if low else 'std'}": run(m, k, low) for m, k, low in _configs()}
    (GOLDEN / "behaviour.json").write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    # A checkpoint of 0.1's layout: the weights and optimizer state after 2 of 4 steps, and
    # where the uninterrupted run ends.
    model = MODELS["bert"]()
    base = snapshot(model)
    opt = SelectiveOptimizer(model, method="id3", budget=300, total_steps=4, lr=1e-2)
    batches = make_batches("bert", 4)
    for t, batch in enumerate(batches):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if t == 1:
            # state_dict() holds live references (as torch's optimizers' do): copy it now.
            checkpoint = {
                "optimizer": copy.deepcopy(opt.state_dict()),
                "weights": _changed_values(model, base),
            }
    checkpoint["final"] = _changed(model, base)
    torch.save(checkpoint, GOLDEN / "checkpoint_v0_1.pt")


if __name__ == "__main__":
    if sys.argv[1:] == ["record"]:
        record()
    elif sys.argv[1:] == ["compare"]:
        compare()
    else:
        raise SystemExit("usage: python tests/behaviour_snapshot.py record|compare")
