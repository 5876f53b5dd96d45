"""One module-type taxonomy: every name gets one role and one type, and `unmask inspect`, the
Trainer telemetry and the quality report count the same weights under the same type."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from conftest import tiny_bert, tiny_llama

import unmask
from unmask.app.cli import main
from unmask.module_types import (
    MODULE_TYPES,
    ROLE_TYPES,
    ROLES,
    layer_index,
    module_role,
    module_type,
)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("bert.embeddings.word_embeddings.weight", "embeddings"),
        ("bert.embeddings.LayerNorm.weight", "norm"),
        ("bert.encoder.layer.0.attention.self.query.weight", "attention"),
        ("bert.encoder.layer.0.attention.output.dense.bias", "attention"),
        ("bert.encoder.layer.0.intermediate.dense.weight", "mlp"),
        ("bert.encoder.layer.0.output.dense.weight", "mlp"),
        ("bert.encoder.layer.1.output.LayerNorm.bias", "norm"),
        # Was "head" in the telemetry: the pooler is part of the backbone (see module_types).
        ("bert.pooler.dense.weight", "pooler"),
        ("classifier.weight", "head"),
        ("model.embed_tokens.weight", "embeddings"),
        ("model.layers.0.self_attn.o_proj.weight", "attention"),
        ("model.layers.0.mlp.down_proj.weight", "mlp"),
        ("model.layers.0.post_attention_layernorm.weight", "norm"),
        ("model.norm.weight", "norm"),
        ("lm_head.weight", "head"),
        ("transformer.h.0.ln_1.weight", "norm"),
        ("base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight", "attention"),
        ("base_model.model.classifier.modules_to_save.default.weight", "head"),
        ("some.unknown.tensor", "other"),
    ],
)
def test_module_type(name, kind):
    assert module_type(name) == kind


@pytest.mark.parametrize(
    ("name", "role"),
    [
        # BERT
        ("bert.embeddings.position_embeddings.weight", "embeddings"),
        ("bert.encoder.layer.0.attention.self.query.bias", "attn q"),
        ("bert.encoder.layer.0.attention.self.key.weight", "attn k"),
        ("bert.encoder.layer.0.attention.self.value.weight", "attn v"),
        ("bert.encoder.layer.0.attention.output.dense.weight", "attn out"),
        ("bert.encoder.layer.0.attention.output.LayerNorm.weight", "norm"),
        ("bert.encoder.layer.0.intermediate.dense.weight", "ffn in"),
        ("bert.encoder.layer.0.output.dense.weight", "ffn out"),
        ("bert.pooler.dense.bias", "pooler"),
        ("classifier.bias", "head"),
        # Llama
        ("model.layers.3.self_attn.q_proj.weight", "attn q"),
        ("model.layers.3.self_attn.k_proj.weight", "attn k"),
        ("model.layers.3.self_attn.v_proj.weight", "attn v"),
        ("model.layers.3.self_attn.o_proj.weight", "attn out"),
        ("model.layers.3.mlp.gate_proj.weight", "ffn in"),
        ("model.layers.3.mlp.up_proj.weight", "ffn in"),
        ("model.layers.3.mlp.down_proj.weight", "ffn out"),
        ("model.layers.3.input_layernorm.weight", "norm"),
        ("score.weight", "head"),
        # GPT-2: c_proj is the attention output under attn, the feed-forward output under mlp
        ("transformer.wte.weight", "embeddings"),
        ("transformer.wpe.weight", "embeddings"),
        ("transformer.h.0.attn.c_attn.weight", "attn qkv"),
        ("transformer.h.0.attn.c_proj.weight", "attn out"),
        ("transformer.h.0.mlp.c_fc.weight", "ffn in"),
        ("transformer.h.0.mlp.c_proj.weight", "ffn out"),
        ("transformer.ln_f.weight", "norm"),
        # peft: the adapter takes the role of the layer it adapts; modules_to_save is the head
        ("base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight", "attn q"),
        ("base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight", "attn v"),
        ("base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight", "ffn out"),
        ("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight",
         "attn q"),
        ("base_model.model.classifier.modules_to_save.default.weight", "head"),
        ("base_model.model.classifier.original_module.weight", "head"),
        ("base_model.model.score.modules_to_save.default.weight", "head"),
        ("some.unknown.tensor", "other"),
    ],
)  # fmt: skip
def test_module_role(name, role):
    assert module_role(name) == role
    assert module_type(name) == ROLE_TYPES[role]


def test_every_role_has_a_type_and_every_type_a_role():
    assert set(ROLES) == set(ROLE_TYPES)
    assert set(MODULE_TYPES) == set(ROLE_TYPES.values())
    assert MODULE_TYPES == ("embeddings", "attention", "mlp", "norm", "pooler", "head", "other")


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("bert.encoder.layer.11.attention.self.query.weight", 11),
        ("model.layers.3.mlp.up_proj.weight", 3),
        ("transformer.h.0.attn.c_attn.weight", 0),
        ("vit.blocks.7.mlp.fc1.weight", 7),
        ("base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight", 1),
        ("bert.embeddings.word_embeddings.weight", None),
        ("bert.pooler.dense.weight", None),
    ],
)
def test_layer_index(name, index):
    assert layer_index(name) == index


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_inspect_telemetry_and_report_agree(build, tmp_path, capsys):
    """One fully trained model (the pooler included): the three users count the same types."""
    pytest.importorskip("transformers")
    from benchmarks.quality_report import module_role as report_role
    from unmask.integrations.trainer import telemetry

    model = build()
    opt = unmask.SelectiveOptimizer(model, method="full", total_steps=1, lr=1e-3)
    expected = Counter()
    for name, count in opt.allocation().items():
        expected[module_type(name)] += count
    assert len(expected) >= 4  # several types, the BERT's pooler among them
    assert build is not tiny_bert or expected["pooler"] > 0

    logs = telemetry(opt)
    assert {t: logs[f"unmask/alloc/{t}"] for t in expected} == dict(expected)
    assert sum(logs[f"unmask/alloc/{t}"] for t in MODULE_TYPES) == opt.num_changed

    opt.delta().save_pretrained(tmp_path / "delta")
    assert main(["inspect", str(tmp_path / "delta")]) == 0
    table = capsys.readouterr().out.split("module type", 1)[1]
    shown = {
        m[1]: int(m[2].replace(",", "")) for m in re.finditer(r"^(\w+) +([\d,]+) ", table, re.M)
    }
    assert shown == dict(expected)

    # The quality report counts the fine roles of the same module (its allocation plot).
    assert report_role is module_role
    by_type = Counter()
    for name, count in opt.allocation().items():
        by_type[ROLE_TYPES[report_role(name)]] += count
    assert by_type == expected
