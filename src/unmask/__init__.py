"""unmask: selective parameter-efficient fine-tuning with ID3 incremental unmasking.

opt = unmask.SelectiveOptimizer(model, method="id3", budget="0.1%", total_steps=T, lr=1e-4)
... loss.backward(); opt.step(); opt.zero_grad() ...
opt.delta().save_pretrained("out")
"""

from .budget import resolve_budget
from .delta import DeltaError, SparseDelta
from .methods import METHODS, Method, make_method
from .optimizer import SelectiveOptimizer
from .schedules import SCHEDULES, LinearDecaySchedule, Schedule, UniformSchedule, update_count
from .slot_adamw import SlotAdamW

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
