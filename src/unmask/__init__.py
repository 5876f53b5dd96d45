"""unmask: selective parameter-efficient fine-tuning with ID3 incremental unmasking.

opt = unmask.SelectiveOptimizer(model, method="id3", budget="0.1%", total_steps=T, lr=1e-4)
... loss.backward(); opt.step(); opt.zero_grad() ...
opt.delta().save_pretrained("out")
"""

from unmask.choose.budget import resolve_budget
from unmask.choose.methods import METHODS, Method, make_method
from unmask.choose.schedules import (
    SCHEDULES,
    LinearDecaySchedule,
    Schedule,
    UniformSchedule,
    update_count,
)
from unmask.optimize.optimizer import SelectiveOptimizer
from unmask.optimize.slot_adamw import SlotAdamW
from unmask.store.delta import DeltaError, SparseDelta

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SCHEDULES",
    "DeltaError",
    "LinearDecaySchedule",
    "Method",
    "Schedule",
    "SelectiveOptimizer",
    "SlotAdamW",
    "SparseDelta",
    "UniformSchedule",
    "make_method",
    "resolve_budget",
    "update_count",
]
