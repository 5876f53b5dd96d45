"""`unmask.delta_format`: a delta folder on disk is read only when every check passes, and is
never seen half written.

Each refusal is a `DeltaError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from safetensors.torch import load_file, save_file

from unmask import DeltaError, SparseDelta


def test_delta_file_with_nan_in_a_replaced_tensor(trained_delta, tmp_path):
    base, delta = trained_delta
    delta.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "delta.safetensors"))
    tensors["classifier.weight:replace"][0, 0] = math.nan
    save_file(
        tensors, str(tmp_path / "delta.safetensors"), metadata={"format": "unmask.SparseDelta"}
    )
    config = json.loads((tmp_path / "delta_config.json").read_text())
    config["tensors_sha256"] = hashlib.sha256(
        (tmp_path / "delta.safetensors").read_bytes()
    ).hexdigest()
    (tmp_path / "delta_config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"classifier\.weight.*NaN or infinity"):
        SparseDelta.from_pretrained(tmp_path)


def test_delta_config_over_the_size_limit(trained_delta, tmp_path):
    """A hostile delta_config.json is refused by its size, before it is parsed."""
    _, delta = trained_delta
    delta.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "delta_config.json").read_text())
    config["metadata"]["padding"] = "x" * (16 * 2**20)
    (tmp_path / "delta_config.json").write_text(json.dumps(config))
    with pytest.raises(DeltaError, match=r"delta_config\.json is larger than 16777216 bytes"):
        SparseDelta.from_pretrained(tmp_path)
