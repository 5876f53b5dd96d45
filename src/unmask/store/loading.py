"""`unmask.load`: a base model with a delta applied, in one call.

Which transformers class loads the base:
- a sequence classifier (`AutoModelForSequenceClassification`) when the delta records
  ``label_names`` (`unmask train` does; the head then gets ``num_labels``, ``id2label`` and
  ``label2id`` from them), or when it stores a whole ``classifier.weight`` / ``score.weight``
  (a new head, trained dense: ``num_labels`` is its number of rows);
- a causal LM (`AutoModelForCausalLM`) otherwise;
- or the class given as ``auto_class``.
The weights are loaded in the dtype the delta was trained in, so that `apply_` accepts them.
The new head's random initialisation is overwritten by the delta's trained head.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from unmask.store.delta import DeltaError, SparseDelta

HEAD_WEIGHTS = ("classifier.weight", "score.weight")  # a new classification head, saved whole


def load_base_model(
    name_or_path: str | os.PathLike | None, delta: SparseDelta, auto_class: Any = None
) -> nn.Module:
    """The base model `delta` was trained from, loaded by transformers (see the module doc).

    name_or_path: a local folder or hub id; None uses the one the delta records
    (``metadata["base_model"]``). Raises DeltaError if neither names a model.
    """
    name = name_or_path if name_or_path is not None else delta.metadata.get("base_model")
    if not name:
        raise DeltaError(
            "the delta does not record its base model; pass the base model's folder or hub id"
        )
    import transformers

    kwargs: dict[str, Any] = {}
    dtypes = set(delta.dtypes.values())
    if len(dtypes) == 1:
        kwargs["dtype"] = getattr(torch, dtypes.pop())
    labels = delta.labels()
    head_rows = [delta.shapes[n][0] for n in delta.replace if n.endswith(HEAD_WEIGHTS)]
    if auto_class is None:
        classifier = labels is not None or bool(head_rows)
        auto_class = (
            transformers.AutoModelForSequenceClassification
            if classifier
            else transformers.AutoModelForCausalLM
        )
    if labels is not None:
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    elif head_rows:
        kwargs["num_labels"] = head_rows[0]
    return auto_class.from_pretrained(str(name), **kwargs)


def load(
    base_model: str | os.PathLike | nn.Module | None,
    delta: str | os.PathLike | SparseDelta,
    auto_class: Any = None,
) -> nn.Module:
    """The base model with the delta applied (bit-identical to the trained model).

    base_model: a model (changed in place and returned), a local folder or hub id loaded as the
        module doc says, or None for the base the delta records.
    delta: a SparseDelta, or a delta folder or hub id (`SparseDelta.from_pretrained`).
    Raises DeltaError when the delta does not fit the model (nothing is changed then).
    """
    if not isinstance(delta, SparseDelta):
        delta = SparseDelta.from_pretrained(delta)
    if not isinstance(base_model, nn.Module):
        base_model = load_base_model(base_model, delta, auto_class)
    return delta.apply_(base_model)
