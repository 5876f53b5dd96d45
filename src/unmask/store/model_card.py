"""The README.md model card of a delta folder: what the delta is and how to load it.

`SparseDelta.save_pretrained` writes it with the delta's files (as peft writes one next to an
adapter), so a folder pushed to the Hugging Face hub explains itself. Loading never reads it. A
README.md that unmask did not write (no `MARKER` line) is left alone.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unmask.store.delta import SparseDelta

CARD_FILE = "README.md"
MARKER = "<!-- unmask model card: save_pretrained rewrites it; delete this line to keep edits -->"
# A hub repository id (``name`` or ``owner/name``); anything else (a local path) is not put
# into the card's YAML header, where the hub expects an id.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub repository id (``owner/name`` or ``name``)."""
    return bool(HUB_ID.match(name)) and ".." not in name and not name.endswith(".")


def model_card(delta: SparseDelta, location: str = "PATH_OR_HUB_ID") -> str:
    """The card's Markdown: base model, method, budget, weights changed, how to load it.

    location: how a reader names this delta (its folder or hub id) in the loading snippets.
    """
    meta = delta.metadata
    base = meta.get("base_model")
    method = meta.get("method", "unknown")
    budget = meta.get("budget")
    header = ["---", "library_name: unmask", "tags:", "- unmask", "- sparse-delta"]
    if isinstance(method, str) and method != "unknown":
        header.append(f"- {method}")
    if isinstance(base, str) and is_hub_id(base):
        header.append(f"base_model: {base}")
    header.append("---")
    base_text = f"`{base}`" if base else "its base model (not recorded)"
    base_arg = base if base else "BASE_MODEL"
    rows = [
        ("base model", base_text),
        ("method", f"`{method}`"),
        ("budget", f"{budget:,} weights" if isinstance(budget, int) else str(budget)),
        ("weights changed", f"{delta.num_weights:,} in {len(delta.shapes)} tensors"),
        ("trained steps", str(meta.get("steps_done", "unknown"))),
    ]
    table = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(
        [
            *header,
            MARKER,
            "",
            "# Sparse fine-tuning delta",
            "",
            f"Made with unmask (selective fine-tuning): it changes {delta.num_weights:,} "
            f"individual weights of {base_text} and stores only those (indices and changes, "
            "`delta.safetensors`; `delta_config.json` records the training run and a fingerprint "
            "of every base tensor it depends on).",
            "",
            *table,
            "",
            "## Load with unmask",
            "",
            "```python",
            "import unmask",
            f'model = unmask.load("{base_arg}", "{location}")   # the base with the delta applied',
            "```",
            "",
            "## Load with peft",
            "",
            "```bash",
            f"unmask export --delta {location} --format peft --output adapter",
            "```",
            "",
            "```python",
            "from peft import PeftModel",
            'model = PeftModel.from_pretrained(base, "adapter")   # base: the model above',
            "```",
            "",
        ]
    )


def is_unmask_card(text: str) -> bool:
    """Whether a README.md's text is a card unmask wrote (and may rewrite)."""
    return MARKER in text
