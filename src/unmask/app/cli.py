"""The `unmask` command line: train, eval, merge, inspect.

Exit codes: 0 success, 2 bad usage or bad input (message on stderr), 3 a download or checksum
failed, 4 training stopped on persistent non-finite gradients, 130 interrupted (SIGINT/SIGTERM;
`unmask train` writes a resumable checkpoint first).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Any

from unmask.module_types import layer_index, module_type
from unmask.store.delta import DeltaError, SparseDelta
from unmask.store.files import atomic_write

EXIT_OK, EXIT_USAGE, EXIT_RESOURCE, EXIT_NONFINITE, EXIT_INTERRUPTED = 0, 2, 3, 4, 130

DESCRIPTION = """\
Selective fine-tuning with ID3: train only a budget of individual weights of a pretrained model
and save them as a small sparse delta.

  unmask train                      the default job: MiniLM, sentence polarity, random mask, 0.1%
  unmask train --task data.csv --model PATH_OR_HUB_NAME --method id3 --budget 50K \
      --device cuda --bf16 --lr-scheduler-type cosine --warmup-ratio 0.1 --eval-steps 50
  unmask train --method lora --lora-r 8 --lr 1e-3        plain LoRA, for comparison
  unmask eval --delta runs/default/delta --task polarity
  unmask merge --delta runs/default/delta --output merged/
  unmask export --delta runs/default/delta --format peft --output adapter/
  unmask inspect runs/default/delta --log runs/default/train_log.jsonl --plot budget.png
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from unmask.app.resources import ResourceError
    from unmask.app.train import Interrupted

    if args.command == "train":
        args.given = _given_options(argv)
    try:
        return args.handler(args)
    except ResourceError as err:
        print(f"unmask: {err}", file=sys.stderr)
        return EXIT_RESOURCE
    except Interrupted as err:
        print(f"unmask: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FloatingPointError as err:
        print(f"unmask: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except (ValueError, DeltaError, FileNotFoundError, OSError) as err:
        print(f"unmask: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("unmask: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _given_options(argv: list[str] | None) -> set[str]:
    """Destinations of the `train` options given on the command line, whatever their values.

    The arguments are parsed a second time with every default of `train` suppressed, so only
    the options actually given appear in the result (a flag equal to its default included).
    """
    return set(vars(_parser(suppress_defaults=True).parse_args(argv)))


def _parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    from unmask.app.train_config import CHOICES, TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="unmask", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="fine-tune a model and save its sparse delta",
        description="Fine-tune a model with a selective method on the Hugging Face Trainer. "
        "With no options: the default job (MiniLM, sentence polarity, random mask, 0.1%%).",
    )
    _model_task_args(train, defaults)
    train.add_argument(
        "--method",
        default=defaults.method,
        choices=CHOICES["method"],
        help="selection method, or 'lora' for plain peft LoRA (default: %(default)s)",
    )
    train.add_argument(
        "--budget",
        default=defaults.budget,
        help="weights that may change: a count (50000, 50K) or a fraction "
        "(0.1%%, 0.001) of the trainable weights (default: %(default)s)",
    )
    train.add_argument(
        "--epochs",
        type=float,
        default=defaults.epochs,
        help="passes over the training set (default: %(default)s)",
    )
    train.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (overrides --epochs)"
    )
    train.add_argument(
        "--lr", type=float, default=defaults.lr, help="learning rate (default: %(default)s)"
    )
    train.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="pulls changed weights back towards the pretrained ones",
    )
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument(
        "--train-size", type=int, default=None, help="use only the first N training examples"
    )
    train.add_argument(
        "--score-eps",
        type=float,
        default=defaults.score_eps,
        help="ε of the D3 score |g| / (|θ| + ε)^exp",
    )
    train.add_argument(
        "--score-exp", type=float, default=defaults.score_exp, help="exponent of the D3 score"
    )
    train.add_argument("--adam-step", default=defaults.adam_step, choices=CHOICES["adam_step"])
    train.add_argument(
        "--schedule",
        default=defaults.schedule,
        choices=CHOICES["schedule"],
        help="how a growing mask (id3, increment-pafi, ...) spends its budget over the steps",
    )
    _trainer_args(train, defaults, CHOICES)
    train.add_argument(
        "--output", default=defaults.output, help="folder for delta/, train_log.jsonl, report.json"
    )
    train.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML or YAML file with any of these options, named with _ or - (flags override it)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="write a resumable checkpoint every N steps (always on SIGINT/SIGTERM)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in OUTPUT/checkpoints (same options as the "
        "first run)",
    )
    train.set_defaults(handler=_train)
    if suppress_defaults:
        for action in train._actions:
            action.default = argparse.SUPPRESS

    ev = sub.add_parser("eval", help="evaluate a base model plus a delta on a task")
    _model_task_args(ev, defaults, recorded_model=True)
    ev.add_argument("--delta", required=True, help="delta folder (from unmask train)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--seed", type=int, default=defaults.seed)
    ev.set_defaults(handler=_eval)

    for name in ("merge", "apply"):
        merge = sub.add_parser(
            name, help="write base model + delta as a model folder that from_pretrained loads"
        )
        merge.add_argument(
            "--model", default=None, help="base model (default: the one recorded in the delta)"
        )
        merge.add_argument("--delta", required=True)
        merge.add_argument("--output", required=True)
        merge.add_argument(
            "--num-labels",
            type=int,
            default=None,
            help="classifier heads: number of labels (default: from the delta)",
        )
        merge.set_defaults(handler=_merge)

    export = sub.add_parser(
        "export", help="write a delta as an adapter folder that stock peft loads"
    )
    export.add_argument("--delta", required=True, help="delta folder or hub id")
    export.add_argument("--format", required=True, choices=["peft"])
    export.add_argument("--output", required=True, help="adapter folder to write")
    export.add_argument(
        "--model", default=None, help="base model (default: the one recorded in the delta)"
    )
    export.set_defaults(handler=_export)

    inspect = sub.add_parser("inspect", help="where the budget went, per layer and module type")
    inspect.add_argument("delta", help="delta folder")
    inspect.add_argument("--log", type=Path, default=None, help="train_log.jsonl of the run")
    inspect.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    inspect.set_defaults(handler=_inspect)
    return parser


def _trainer_args(train: argparse.ArgumentParser, defaults, choices) -> None:
    """The Trainer's options (TrainingArguments' names) and the candidate patterns."""
    train.add_argument(
        "--device",
        default=defaults.device,
        choices=choices["device"],
        help="where to train (default: %(default)s: the accelerator when there is one)",
    )
    train.add_argument(
        "--bf16", action="store_true", default=defaults.bf16, help="bf16 mixed precision"
    )
    train.add_argument(
        "--lr-scheduler-type",
        default=defaults.lr_scheduler_type,
        choices=choices["lr_scheduler_type"],
        help="learning-rate schedule (default: %(default)s)",
    )
    train.add_argument(
        "--warmup-ratio",
        type=float,
        default=defaults.warmup_ratio,
        help="share of the steps with a linear warm-up (default: %(default)s)",
    )
    train.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=defaults.gradient_accumulation_steps,
        help="batches per optimizer step (default: %(default)s)",
    )
    train.add_argument(
        "--max-grad-norm",
        type=float,
        default=defaults.max_grad_norm,
        help="clip the gradient norm to this (default: %(default)s: no clipping)",
    )
    train.add_argument(
        "--eval-steps",
        type=int,
        default=defaults.eval_steps,
        help="evaluate on the validation split every N steps; keeps OUTPUT/best_delta",
    )
    train.add_argument(
        "--report-to",
        default=defaults.report_to,
        choices=choices["report_to"],
        help="a logger for the Trainer's logs (default: %(default)s)",
    )
    train.add_argument(
        "--low-memory",
        action="store_true",
        default=defaults.low_memory,
        help="rank gradients tensor by tensor during backward (see docs/design.md)",
    )
    train.add_argument(
        "--sparse-backward",
        action=argparse.BooleanOptionalAction,
        default=defaults.sparse_backward,
        help="once the mask is final, compute only the selected weights' gradients "
        "(docs/sparse_backward.md; default: on for masks chosen before training, such as "
        "random and pafi, off for growing ones such as id3)",
    )
    train.add_argument(
        "--unmask-every",
        type=int,
        default=defaults.unmask_every,
        metavar="K",
        help="a growing mask (id3, ...) unmasks K steps' worth on every K-th step; with "
        "--sparse-backward the steps between run sparse (default: %(default)s, the paper)",
    )
    for name, what in (
        ("include", "only parameters matching one of these regexes are candidates"),
        ("exclude", "parameters matching one of these regexes are not trained"),
        ("dense", "parameters matching these regexes are trained whole (the new head always is)"),
    ):
        train.add_argument(f"--{name}", nargs="+", default=None, metavar="REGEX", help=what)
    train.add_argument(
        "--dense-in-budget",
        action=argparse.BooleanOptionalAction,
        default=defaults.dense_in_budget,
        help="dense weights count against the budget (default: %(default)s)",
    )
    train.add_argument(
        "--lora-r",
        type=int,
        default=defaults.lora_r,
        help="LoRA rank: with --method lora, plain LoRA; with a selective method, ID3+LoRA "
        "(the candidates are the LoRA weights)",
    )


def _model_task_args(
    parser: argparse.ArgumentParser, defaults, recorded_model: bool = False
) -> None:
    """--model, --task and the column and size options; with `recorded_model` (eval) --model
    defaults to the base model recorded in the delta, else to TrainConfig's."""
    parser.add_argument(
        "--model",
        default=None if recorded_model else defaults.model,
        help="'minilm', 'smollm2', a local folder or a hub name (default: "
        + ("the base model recorded in the delta)" if recorded_model else "%(default)s)"),
    )
    parser.add_argument(
        "--task",
        default=defaults.task,
        help="polarity, uncertainty, addition, plurals, a .csv/.jsonl file, or "
        "a datasets hub name (default: %(default)s)",
    )
    parser.add_argument("--text-column", default=defaults.text_column)
    parser.add_argument("--label-column", default=defaults.label_column)
    parser.add_argument("--prompt-column", default=defaults.prompt_column)
    parser.add_argument("--answer-column", default=defaults.answer_column)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--eval-split", default=defaults.eval_split, choices=["test", "validation"])
    parser.add_argument(
        "--eval-size", type=int, default=None, help="evaluate on the first N examples of the split"
    )


def _train(args: argparse.Namespace) -> int:
    from unmask.app.train import run
    from unmask.app.train_config import TrainConfig, check_config, check_given_options

    names = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(_read_config(args.config, names))
    # Every flag given on the command line overrides the config file, whatever its value (even
    # its default); options given nowhere keep TrainConfig's defaults, which are the parser's.
    given = getattr(args, "given", None)
    values.update(
        {k: v for k, v in vars(args).items() if k in names and (given is None or k in given)}
    )
    explicit = set(values)
    if args.no_progress or "progress" not in values:
        values["progress"] = not args.no_progress
    config = TrainConfig(**values)
    check_config(config)  # a value of the wrong type is named before the method is looked at
    check_given_options(config.method, explicit)
    report = run(config)
    if report["delta_bytes"] is None:  # under torchrun: process zero wrote and reports the run
        return EXIT_OK
    metric = "accuracy" if "accuracy" in report else "exact_match"
    print(
        f"{metric} on {report['task']['eval_split']} ({report['task']['eval']} examples): "
        f"{report[metric]:.4f}"
    )
    print(
        f"weights changed: {report['weights_changed']:,} of {report['weights_total']:,} "
        f"({100 * report['weights_changed'] / report['weights_total']:.3f}%); "
        f"delta on disk: {report['delta_bytes']:,} bytes"
    )
    print(f"wrote {Path(values.get('output', 'runs/default'))}/delta, train_log.jsonl, report.json")
    return EXIT_OK


def _read_config(path: Path, names: set[str]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml  # PyYAML comes with transformers

        data = yaml.safe_load(text) or {}
    else:
        try:
            import tomllib
        except ImportError as err:  # Python 3.10
            raise ValueError("TOML configs need Python 3.11 or newer; use YAML") from err
        data = tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; valid: {sorted(names)}")
    return data


def _eval(args: argparse.Namespace) -> int:
    from unmask.app.models import load_model
    from unmask.app.tasks.evaluation import evaluate
    from unmask.app.train_config import load_task_for

    task = load_task_for(args)
    delta = SparseDelta.from_pretrained(args.delta)
    trained = delta.labels()
    if task.label_names and trained and task.label_names != trained:
        raise ValueError(
            f"this task's label values {task.label_names} differ from the labels it was trained "
            f"on {trained}; evaluate on data with the same labels"
        )
    base = args.model or delta.metadata.get("base_model")
    if not base:
        raise ValueError("the delta does not record its base model; pass --model")
    model, tokenizer = load_model(base, task)
    model = _with_recorded_adapter(model, delta)
    delta.apply_(model)
    split = task.test if args.eval_split == "test" else task.validation
    score = evaluate(model, tokenizer, task, split, args.batch_size, args.max_length)
    print(
        json.dumps(
            {
                "task": task.name,
                "split": args.eval_split,
                task.metric: score,
                "examples": len(split),
            }
        )
    )
    return EXIT_OK


def _with_recorded_adapter(model, delta: SparseDelta):
    """`model` with the LoRA adapter an ID3+LoRA delta was trained on (rebuilt from the rank
    and seed it records), or `model` itself for a delta of the plain model."""
    lora = delta.metadata.get("lora")
    if not lora:
        return model
    from unmask.app.models import add_lora

    return add_lora(model, lora["task_kind"], int(lora["r"]), int(lora["seed"]))


def _merge(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unmask.app.models import load_classifier, resolve_model

    delta = SparseDelta.from_pretrained(args.delta)
    name = args.model or delta.metadata.get("base_model")
    if not name:
        raise ValueError("the delta does not record its base model; pass --model")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(
            f"--output {output} exists and is not a folder; the merged model is written as a "
            "folder: give a new path or an existing folder"
        )
    path = resolve_model(name)
    labels = None if args.num_labels else delta.labels()  # checked before a model is built
    num_labels = args.num_labels or (len(labels) if labels else None)
    if num_labels:
        model = load_classifier(path, num_labels, labels)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    model = _with_recorded_adapter(model, delta)
    delta.apply_(model)
    if delta.metadata.get("lora"):
        model = model.merge_and_unload()
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(path).save_pretrained(output)
    _check_saved_model(output)
    print(f"wrote merged model ({delta.num_weights:,} weights changed) to {output}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from unmask.app.models import resolve_model
    from unmask.store.peft_export import export_peft

    model = None if args.model is None else resolve_model(args.model)
    report = export_peft(args.delta, args.output, model)
    stored = [f"{report['sparse_layers']} sparse layers"]
    if report["shira_r"] is not None:
        stored[0] += f" (SHiRA r={report['shira_r']})"
    if report["token_rows"]:
        stored.append(f"{report['token_rows']} embedding rows")
    if report["dense_modules"]:
        stored.append(f"{len(report['dense_modules'])} whole modules (modules_to_save)")
    print(
        f"wrote a peft {report['tuner']} adapter to {args.output} ({report['bytes']:,} bytes): "
        f"{', '.join(stored)}; load it with PeftModel.from_pretrained(base, {args.output!r})"
    )
    return EXIT_OK


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _check_saved_model(folder: Path) -> None:
    """Raise OSError unless `folder` holds a config.json and a weights file.

    transformers' save_pretrained logs some failures (such as a file in the way) and returns
    as if it had saved, so what it wrote is checked on disk.
    """
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append("the weights (model.safetensors)")
    if missing:
        raise OSError(
            f"saving the merged model to {folder} failed: {' and '.join(missing)} not written; "
            "check that the folder is writable and has free space, then run merge again"
        )


def _inspect(args: argparse.Namespace) -> int:
    delta = SparseDelta.from_pretrained(args.delta)
    by_layer: dict[str, int] = defaultdict(int)
    by_type: dict[str, int] = defaultdict(int)
    for name, count in delta.allocation().items():
        by_layer[_layer_of(name)] += count
        by_type[module_type(name)] += count
    total = delta.num_weights
    print(
        f"{total:,} weights changed ({delta.metadata.get('method')}, budget "
        f"{delta.metadata.get('budget')})"
    )
    for title, table in (("layer", by_layer), ("module type", by_type)):
        print(f"\n{title:<24} {'weights':>10} {'share':>7}")
        for key, count in sorted(table.items(), key=lambda kv: _natural(kv[0])):
            print(f"{key:<24} {count:>10,} {100 * count / max(total, 1):>6.1f}%")
    if args.plot is not None:
        _plot(args.plot, by_layer, by_type, args.log)
        print(f"\nwrote {args.plot}")
    return EXIT_OK


def _layer_of(name: str) -> str:
    index = layer_index(name)
    if index is not None:
        return f"layer {index:02d}"
    if "embed" in name:
        return "embeddings"
    return "head/other"


def _natural(key: str) -> tuple:
    return (not key.startswith("layer"), key)


def _plot(path: Path, by_layer: dict, by_type: dict, log: Path | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from err
    panels = 3 if log is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    layers = sorted(by_layer, key=_natural)
    axes[0].bar(range(len(layers)), [by_layer[k] for k in layers])
    axes[0].set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    axes[0].set_title("weights changed per layer")
    types = sorted(by_type)
    axes[1].bar(types, [by_type[k] for k in types])
    axes[1].set_title("per module type")
    axes[1].tick_params(axis="x", rotation=45)
    if log is not None:
        from unmask.app.train import read_train_log

        rows, _ = read_train_log(log)
        rows = [r for r in rows if "num_selected" in r]  # evaluation records have none
        axes[2].plot([r["step"] for r in rows], [r["num_selected"] for r in rows], label="selected")
        axes[2].plot(
            [r["step"] for r in rows], [r["scheduled"] for r in rows], "--", label="schedule"
        )
        axes[2].set_xlabel("step")
        axes[2].set_title("unmasked weights")
        axes[2].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
