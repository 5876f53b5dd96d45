"""Integrations of unmask with the Hugging Face training stack.

- `unmask.integrations.trainer`: `UnmaskTrainer` (a `transformers.Trainer` whose optimizer is a
  `SelectiveOptimizer`), `make_optimizer`, and `UnmaskCallback` (deltas in every checkpoint,
  selection telemetry in the logs). Needs `transformers`.
- `unmask.integrations.peft`: `peft_candidates`, the candidate patterns for a peft model
  (LoRA, IA3, LoHa, ...). Needs nothing beyond torch.

The names below are imported lazily, so `import unmask.integrations` does not import
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it, relative to the `unmask` package
_EXPORTS = {
    "UnmaskCallback": ".integrations.trainer",
    "UnmaskTrainer": ".integrations.trainer",
    "make_optimizer": ".integrations.trainer",
    "module_type": ".module_types",
    "telemetry": ".integrations.trainer",
    "unwrap_optimizer": ".integrations.trainer",
    "peft_candidates": ".integrations.peft",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], package="unmask")
    return getattr(module, name)
