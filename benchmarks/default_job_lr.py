"""Learning-rate search for the default job, on the validation split (never the test split).

Runs `unmask train`'s default job (MiniLM, sentence polarity, 0.1%) once per method and learning
rate with evaluation on the 400-sentence validation split, and adds one record per run to OUT
(records of other methods and rates are kept; a record without a method is ID3's). The best
method and rate become the defaults of `unmask train` (`TrainConfig.method`, `TrainConfig.lr`).

    .venv/bin/python -m benchmarks.default_job_lr --method id3-snr --lrs 3e-3,1e-2,3e-2 \
        --out benchmarks/results/default_job_lr.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from unmask.app.train import run
from unmask.app.train_config import TrainConfig
from unmask.store.files import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="id3")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = json.loads(args.out.read_text()) if args.out.is_file() else []
    for lr in [float(x) for x in args.lrs.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            config = TrainConfig(
                method=args.method, lr=lr, eval_split="validation", output=folder, progress=False
            )
            report = run(config)
        records = [r for r in records if (r.get("method", "id3"), r["lr"]) != (args.method, lr)]
        records.append(
            {
                "method": args.method,
                "lr": lr,
                "validation_accuracy": report["accuracy"],
                "train_seconds": report["train_seconds"],
                "steps": report["steps"],
                "weights_changed": report["weights_changed"],
            }
        )
        print(json.dumps(records[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(records, indent=1))  # after every run


if __name__ == "__main__":
    main()
