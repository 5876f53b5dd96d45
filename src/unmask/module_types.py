"""What part of a transformer a parameter belongs to, read from its name.

One taxonomy for every report of where a budget went (`unmask inspect`, the Trainer telemetry,
the quality report): a fine *role* per parameter (``attn q``, ``ffn in``, ...) and the coarse
*type* it belongs to (``attention``, ``mlp``, ...), so the same name gets the same type
everywhere. Names of BERT-, Llama- and GPT-2-style models are recognised, also inside peft's
wrappers: ``...self_attn.q_proj.lora_A.default.weight`` is the adapter of the query projection,
role ``attn q``, type ``attention``; ``classifier.modules_to_save.default.weight`` is the head.

The pooler (BERT's ``pooler.dense``) is a type of its own, not the head: it is part of the
pretrained backbone, and in sentence-transformers checkpoints it was never trained, which makes
it a notable place for a budget to go (docs/selection.md).
"""

from __future__ import annotations

import re

# Roles, tried in this order; the first match wins. So `attention.output.LayerNorm` is a norm,
# `classifier.out_proj` is the head (not an attention output), and `attn.c_proj` (GPT-2's
# attention output) is told apart from `mlp.c_proj` (its feed-forward output).
_ROLE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norm", re.compile(r"norm|(^|\.)ln(_\w+)?\.", re.IGNORECASE)),
    ("embeddings", re.compile(r"embed|(^|\.)(wte|wpe|shared)\.")),
    ("head", re.compile(r"classifier|lm_head|(^|\.)(score|qa_outputs|cls)\.")),
    ("pooler", re.compile(r"(^|\.)pooler\.")),
    ("attn q", re.compile(r"(^|\.)(query|q_proj|q_lin)\.")),
    ("attn k", re.compile(r"(^|\.)(key|k_proj|k_lin)\.")),
    ("attn v", re.compile(r"(^|\.)(value|v_proj|v_lin)\.")),
    ("attn qkv", re.compile(r"(^|\.)(c_attn|qkv_proj|query_key_value|Wqkv)\.")),
    (
        "attn out",
        re.compile(r"attention\.output\.|(^|\.)(o_proj|out_proj|out_lin)\.|attn\.c_proj\."),
    ),
    ("ffn in", re.compile(r"intermediate|(^|\.)(gate_proj|up_proj|c_fc|fc1|w1|w3|lin1)\.")),
    ("ffn out", re.compile(r"(^|\.)output\.dense\.|(^|\.)(down_proj|fc2|w2|lin2)\.|mlp\.c_proj\.")),
    ("attn other", re.compile(r"attn|attention")),
    ("ffn other", re.compile(r"mlp|feed_forward|ffn")),
)

# Role -> coarse type. Every role of _ROLE_PATTERNS is here, and "other".
ROLE_TYPES: dict[str, str] = {
    "embeddings": "embeddings",
    "attn q": "attention",
    "attn k": "attention",
    "attn v": "attention",
    "attn qkv": "attention",
    "attn out": "attention",
    "attn other": "attention",
    "ffn in": "mlp",
    "ffn out": "mlp",
    "ffn other": "mlp",
    "norm": "norm",
    "pooler": "pooler",
    "head": "head",
    "other": "other",
}

ROLES: tuple[str, ...] = tuple(ROLE_TYPES)
"""Every role, in the order of a transformer's data flow (embeddings first, head last)."""

MODULE_TYPES: tuple[str, ...] = tuple(dict.fromkeys(ROLE_TYPES.values()))
"""Every coarse type: embeddings, attention, mlp, norm, pooler, head, other."""

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks)\.(\d+)\.")


def module_role(name: str) -> str:
    """Fine role of the parameter `name`: one of `ROLES` ("other" when nothing matches)."""
    for role, pattern in _ROLE_PATTERNS:
        if pattern.search(name):
            return role
    return "other"


def module_type(name: str) -> str:
    """Coarse type of the parameter `name`: one of `MODULE_TYPES`, the type of its role.

    embeddings, attention, mlp, norm, pooler, head (classification, LM or QA head), or other.
    """
    return ROLE_TYPES[module_role(name)]


def layer_index(name: str) -> int | None:
    """Index of the transformer block the parameter `name` is in, or None outside the blocks.

    Blocks are ``layer.N`` (BERT), ``layers.N`` (Llama), ``h.N`` (GPT-2) or ``blocks.N``.
    """
    match = _LAYER.search(name)
    return None if match is None else int(match.group(1))
