"""unmask: selective parameter-efficient fine-tuning with ID3 incremental unmasking.

opt = unmask.SelectiveOptimizer(model, method="id3", budget="0.1%", total_steps=T, lr=1e-4)
... loss.backward(); opt.step(); opt.zero_grad() ...
opt.delta().save_pretrained("out")            # or .push_to_hub("owner/name")
model = unmask.load("base-model", "out")       # the base with the delta applied
unmask.export_peft("out", "adapter")           # a folder that peft's PeftModel loads
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
from unmask.store.loading import load
from unmask.store.peft_export import export_peft, peft_exportable

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
    "export_peft",
    "load",
    "make_method",
    "peft_exportable",
    "resolve_budget",
    "update_count",
]
