"""`unmask.store.fingerprints`: a delta fingerprints the base tensors it changes and those its
changes depend on, and refuses a model whose tensors differ.

Early in LoRA training ID3 selects only lora_B entries (B = 0 gives A no gradient), so a delta
that fingerprints only the tensors it changes cannot tell LoRA models with other lora_A
initialisations apart: their lora_B are all zeros. So the delta also records a fingerprint of
every tensor sharing a module with a changed one (a LoRA layer's lora_A, lora_B and base weight).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_batches, tiny_llama

from unmask import DeltaError, SelectiveOptimizer, SparseDelta
from unmask.store.delta_format import CONFIG_FILE
from unmask.store.fingerprints import dependent_parameters

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

LORA_A = r"lora_A\.default\.weight of this model differs from the base model"


def lora_model(lora_seed: int):
    """Tiny LLaMA (always the same backbone) with LoRA on down_proj, lora_A drawn from a seed."""
    base = tiny_llama(0)
    torch.manual_seed(lora_seed)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config)


def lora_b_only_delta(lora_seed: int, data_seed: int = 0):
    """One ID3 step within the lora_B count: the delta changes lora_B entries only."""
    model = lora_model(lora_seed)
    opt = SelectiveOptimizer(model, method="id3", budget=50, total_steps=1, lr=1e-2)
    batch = make_batches("llama", 1, seed=1 + data_seed)[0]
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    delta = opt.delta()
    assert delta.sparse and all("lora_B" in name for name in delta.sparse)
    return model, delta


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_two_lora_models_differ_only_in_lora_a():
    one, two = params(lora_model(1)), params(lora_model(2))
    differ = {n for n in one if not torch.equal(one[n], two[n])}
    assert differ and all("lora_A" in n for n in differ)


def test_a_lora_b_only_delta_refuses_a_model_with_another_lora_a_init(tmp_path):
    _, delta = lora_b_only_delta(lora_seed=1)
    delta.save_pretrained(tmp_path / "delta")
    for candidate in (delta, SparseDelta.from_pretrained(tmp_path / "delta")):
        other = lora_model(2)
        before = params(other)
        with pytest.raises(DeltaError, match=LORA_A):
            candidate.apply_(other)
        assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    assert any("lora_A" in n for n in delta.dependency_hashes)
    assert any("base_layer.weight" in n for n in delta.dependency_hashes)


def test_a_lora_b_only_delta_still_applies_to_its_base_bit_identically(tmp_path):
    trained, delta = lora_b_only_delta(lora_seed=1)
    delta.save_pretrained(tmp_path / "delta")
    fresh = lora_model(1)
    SparseDelta.from_pretrained(tmp_path / "delta").apply_(fresh)
    expected = params(trained)
    assert all(torch.equal(p, expected[n]) for n, p in fresh.named_parameters())


def test_a_changed_base_layer_weight_is_refused_too():
    _, delta = lora_b_only_delta(lora_seed=1)
    other = lora_model(1)
    name = next(n for n in delta.dependency_hashes if "base_layer.weight" in n)
    with torch.no_grad():
        dict(other.named_parameters())[name].view(-1)[0] += 1.0
    with pytest.raises(DeltaError, match=r"base_layer\.weight of this model differs"):
        delta.apply_(other)


def test_adding_deltas_of_different_lora_inits_is_refused():
    _, one = lora_b_only_delta(lora_seed=1)
    _, two = lora_b_only_delta(lora_seed=2)
    assert set(one.base_hashes) & set(two.base_hashes)  # lora_B: all zeros in both bases
    assert all(one.base_hashes[n] == two.base_hashes[n] for n in one.base_hashes)
    with pytest.raises(DeltaError, match="different base models"):
        one + two
    with pytest.raises(DeltaError, match="different base models"):
        two + one


def test_adding_deltas_of_one_base_keeps_the_dependency_fingerprints():
    _, one = lora_b_only_delta(lora_seed=1, data_seed=0)
    _, other = lora_b_only_delta(lora_seed=1, data_seed=1)
    total = one + other
    assert total.dependency_hashes == {**one.dependency_hashes, **other.dependency_hashes}
    with pytest.raises(DeltaError, match=LORA_A):
        total.apply_(lora_model(2))
    total.apply_(lora_model(1))


def test_dependents_are_the_rest_of_a_lora_layer():
    model = lora_model(1)
    name = next(n for n, _ in model.named_parameters() if "lora_B" in n)
    layer = name.removesuffix(".lora_B.default.weight")
    assert dependent_parameters(model, [name]) == sorted(
        n for n, _ in model.named_parameters() if n.startswith(layer + ".")
    )
    # Outside adapters a change depends on no other tensor.
    linear = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, bias=False))
    assert dependent_parameters(linear, ["0.weight", "1.weight"]) == []


def test_an_old_delta_file_without_dependency_fingerprints_still_loads(tmp_path):
    trained, delta = lora_b_only_delta(lora_seed=1)
    delta.save_pretrained(tmp_path / "delta")
    path = tmp_path / "delta" / CONFIG_FILE
    config = json.loads(path.read_text())
    del config["dependency_sha256"]
    path.write_text(json.dumps(config))
    old = SparseDelta.from_pretrained(tmp_path / "delta")
    assert old.dependency_hashes == {}
    fresh = lora_model(1)
    old.apply_(fresh)
    expected = params(trained)
    assert all(torch.equal(p, expected[n]) for n, p in fresh.named_parameters())
    old.apply_(lora_model(2))  # the old check only: what such a file cannot tell apart


@pytest.mark.parametrize("value", [[], "abc", {"x": 1}, None])
def test_malformed_dependency_fingerprints_are_refused_on_load(tmp_path, value):
    _, delta = lora_b_only_delta(lora_seed=1)
    delta.save_pretrained(tmp_path / "delta")
    path = tmp_path / "delta" / CONFIG_FILE
    config = json.loads(path.read_text())
    config["dependency_sha256"] = value
    path.write_text(json.dumps(config))
    with pytest.raises(DeltaError, match="dependency_sha256"):
        SparseDelta.from_pretrained(tmp_path / "delta")


def test_deltas_of_an_ordinary_model_record_no_dependencies_and_apply_in_sequence():
    model = tiny_llama()
    assert dependent_parameters(model, [n for n, _ in model.named_parameters()]) == []
    deltas = []
    for part in ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"):
        trained = tiny_llama()
        opt = SelectiveOptimizer(trained, method="pafi", budget=20, include=part, lr=1e-2)
        trained(**make_batches("llama", 1)[0]).loss.backward()
        opt.step()
        deltas.append(opt.delta())
    assert not deltas[0].dependency_hashes and not deltas[1].dependency_hashes
    for delta in deltas:  # Llama's bias-free projections: still one after the other
        delta.apply_(model)
