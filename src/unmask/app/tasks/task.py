"""The Task: three splits of examples, their kind and the metric that scores them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["classification", "generation"]
KINDS = ("classification", "generation")
METRICS = {"classification": "accuracy", "generation": "exact_match"}


@dataclass
class Task:
    """A dataset ready for fine-tuning (see the module docstring for the example formats).

    label_names: classification only, index -> label name (built-ins: "negative"/"positive",
        "uncertain"/"certain"; files: the original label value as a string).
    metric: "accuracy" (classification) or "exact_match" (generation).
    """

    name: str
    kind: TaskKind
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    label_names: list[str] | None
    metric: str

    @property
    def num_labels(self) -> int | None:
        """Number of classes (classification), else None."""
        return None if self.label_names is None else len(self.label_names)

    def __repr__(self) -> str:  # the default would print every example
        labels = f", label_names={self.label_names}" if self.label_names is not None else ""
        return (
            f"Task(name={self.name!r}, kind={self.kind!r}, train={len(self.train)}, "
            f"validation={len(self.validation)}, test={len(self.test)}{labels}, "
            f"metric={self.metric!r})"
        )
