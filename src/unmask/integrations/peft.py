"""ID3 on top of peft adapters (LoRA, IA3, LoHa, ...).

A peft model freezes the backbone and leaves only the adapter weights trainable, so
`SelectiveOptimizer(peft_model, method="id3", budget=...)` already selects among adapter weights
only, and the budget counts scalars inside the adapters (ID3 + LoRA in the paper). What it cannot
tell by itself is that peft's ``modules_to_save`` copies (e.g. the classification head that
``task_type="SEQ_CLS"`` makes trainable) are freshly trained layers that belong in ``dense=``:

    opt = SelectiveOptimizer(peft_model, method="id3", budget=320_000, total_steps=T,
                             **peft_candidates(peft_model))

The delta's tensor names are the peft model's parameter names
(``base_model.model....lora_A.default.weight``): apply it to a peft model built with the same
base model, config and seed, whose adapter initialisation is then identical.

This module only reads parameter names; it does not import peft.
"""

from __future__ import annotations

import re

from torch import nn

# peft's ModulesToSaveWrapper keeps the frozen layer as `original_module` and the trainable copy
# under `modules_to_save.<adapter>`; only the copy has requires_grad=True.
MODULES_TO_SAVE = r"\.modules_to_save\."


def peft_candidates(model: nn.Module) -> dict[str, list[str]]:
    """Keyword arguments for `SelectiveOptimizer` that fit a peft model.

    Returns ``{"dense": [...]}`` when the model has trainable ``modules_to_save`` copies (they
    are trained whole and, with the default ``dense_in_budget=True``, charged to the budget),
    else ``{}``. Every other trainable parameter (the adapter weights) stays a candidate.
    """
    pattern = re.compile(MODULES_TO_SAVE)
    if any(p.requires_grad and pattern.search(n) for n, p in model.named_parameters()):
        return {"dense": [MODULES_TO_SAVE]}
    return {}
