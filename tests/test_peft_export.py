"""Export to peft: stock `PeftModel.from_pretrained` reproduces base + delta (SHiRA, LoRA with
trainable tokens, modules_to_save), merges, round-trips through peft's own save, or is refused."""

from __future__ import annotations

import copy
import json
import os
import re
import stat

import pytest
import torch
from conftest import assert_clear, cli, make_batches, tiny_bert, tiny_llama
from safetensors.torch import load_file
from torch import nn

import unmask
from unmask.store.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft, plan_export

peft = pytest.importorskip("peft")

pytestmark = [
    # peft 0.21 calls a transformers helper that transformers 5.24 deprecates, and SHiRA builds
    # sparse tensors without invariant checks; neither is ours to fix.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks"),
]

MAKE = {"bert": tiny_bert, "llama": tiny_llama}


def trained(kind: str, steps: int = 3, budget: int = 300, **options):
    """(base, trained model, delta) of ID3 on a tiny model of `kind` (a dense head for BERT)."""
    base = MAKE[kind]()
    model = copy.deepcopy(base)
    if kind == "bert":
        options.setdefault("dense", ["classifier"])
    opt = unmask.SelectiveOptimizer(
        model, method="id3", budget=budget, total_steps=steps, lr=1e-2, **options
    )
    for batch in make_batches(kind, steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return base, model, opt.delta()


def logits(model, kind: str) -> torch.Tensor:
    ids = make_batches(kind, 1, seed=9, batch=3)[0]["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def differing(model: nn.Module, reference: nn.Module) -> list[str]:
    """Names of `reference`'s parameters that `model` lacks or holds other values for."""
    mine = dict(model.named_parameters())
    return [
        n for n, p in reference.named_parameters() if n not in mine or not torch.equal(mine[n], p)
    ]


def check_round_trip(base, model, kind: str, folder, tmp_path, exact_unmerged: bool) -> None:
    """Stock peft loads `folder` onto a fresh base: equal logits, a bit-identical merge, and
    peft's own save_pretrained of the loaded adapter loads back the same."""
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    expected = logits(model, kind)
    got = logits(loaded, kind)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if exact_unmerged:
        assert torch.equal(got, expected)
    loaded.save_pretrained(str(tmp_path / "resaved"))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "resaved"))
    assert torch.equal(logits(again, kind), got)
    merged = again.merge_and_unload()
    assert type(merged) is type(base)
    assert differing(merged, model) == []
    assert torch.equal(logits(merged, kind), logits(model, kind))


def test_bert_with_the_preset_exports_as_shira_with_a_dense_head(tmp_path):
    base, model, delta = trained("bert", **unmask.peft_exportable(tiny_bert()))
    assert set(delta.replace) == {"classifier.weight", "classifier.bias"}
    report = export_peft(delta, tmp_path / "adapter", copy.deepcopy(base))
    assert report["tuner"] == "shira" and report["dense_modules"] == ["classifier"]
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "SHIRA" and config["modules_to_save"] == ["classifier"]
    # SHiRA holds r(in + out) entries per layer: the delta's, padded with zeros elsewhere.
    tensors = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    for name, (indices, values) in delta.sparse.items():
        layer = name.removesuffix(".weight")
        stored = tensors[f"base_model.model.{layer}.shira_weight"]
        rows, cols = tensors[f"base_model.model.{layer}.shira_indices"].long()
        shape = delta.shapes[name]
        assert stored.numel() == config["r"] * sum(shape) >= indices.numel()
        flat = rows * shape[1] + cols
        assert torch.unique(flat).numel() == flat.numel()
        at = {int(i): float(v) for i, v in zip(flat, stored, strict=True)}
        assert [at[int(i)] for i in indices] == values.tolist()
        assert sum(v != 0 for v in at.values()) <= indices.numel()  # the padding is zero
    check_round_trip(base, model, "bert", tmp_path / "adapter", tmp_path, exact_unmerged=True)


def test_bert_without_the_preset_exports_embedding_rows_and_changed_modules(tmp_path):
    base, model, delta = trained("bert")
    word = "bert.embeddings.word_embeddings.weight"
    assert word in delta.sparse  # ID3 picked entries of the embedding, biases and norms too
    report = export_peft(delta, tmp_path / "adapter", copy.deepcopy(base))
    rows = torch.unique(delta.sparse[word][0].long() // delta.shapes[word][1])
    assert report["tuner"] == "lora" and report["token_rows"] == rows.numel() < 100
    assert "classifier" in report["dense_modules"]
    check_round_trip(base, model, "bert", tmp_path / "adapter", tmp_path, exact_unmerged=False)


def test_llama_with_tied_embedding_rows_exports_as_lora_with_trainable_tokens(tmp_path):
    base, model, delta = trained("llama")
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert "model.embed_tokens.weight" in delta.sparse
    report = export_peft(delta, tmp_path / "adapter", copy.deepcopy(base))
    assert report["tuner"] == "lora" and report["sparse_layers"] > 0 and report["token_rows"]
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert list(config["trainable_token_indices"]) == ["model.embed_tokens"]
    check_round_trip(base, model, "llama", tmp_path / "adapter", tmp_path, exact_unmerged=False)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
    merged = merged.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_with_the_preset_exports_as_shira_bit_exactly(dtype, tmp_path, monkeypatch):
    monkeypatch.setitem(MAKE, "llama", lambda: tiny_llama().to(dtype))
    base, model, delta = trained("llama", **unmask.peft_exportable(tiny_llama()))
    assert base.model.embed_tokens.weight.dtype == dtype
    assert all("embed" not in name for name in delta.shapes)
    report = export_peft(delta, tmp_path / "adapter", copy.deepcopy(base))
    assert report["tuner"] == "shira" and report["dense_modules"] == []
    check_round_trip(base, model, "llama", tmp_path / "adapter", tmp_path, exact_unmerged=True)


def hand_delta(base: nn.Module, changes: dict[str, tuple[list[int], list[float]]]):
    """A delta of `base` changing the given flat positions of the named tensors by the values."""
    model = copy.deepcopy(base)
    sparse, before = {}, {}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (positions, values) in changes.items():
            indices = torch.tensor(sorted(positions), dtype=torch.int32)
            change = torch.tensor(values)[torch.tensor(positions).argsort()]
            flat = params[name].view(-1)
            before[name] = flat[indices.long()].clone()
            flat[indices.long()] += change
            sparse[name] = (indices, change)
    return model, unmask.SparseDelta.from_training(model, sparse, before, {}, {})


def test_a_layer_shira_cannot_hold_at_the_chosen_r_is_stored_whole(tmp_path):
    base = tiny_bert()
    query = "bert.encoder.layer.0.attention.self.query.weight"  # 32 x 32: r(in + out) <= 1024
    pooler = "bert.pooler.dense.weight"
    many = list(range(0, 1024, 2))  # 512 entries: r = 8 holds them, r = 1 holds 64
    model, delta = hand_delta(base, {query: ([5, 9], [0.5, -0.25]), pooler: (many, [0.01] * 512)})
    plan = plan_export(delta, base)
    assert plan.tuner == "SHIRA" and plan.rank == 1
    assert list(plan.sparse) == ["bert.encoder.layer.0.attention.self.query"]
    assert plan.dense == ["bert.pooler.dense"]  # 8 x 64 x 12 bytes would exceed the layer
    export_peft(delta, tmp_path / "adapter", copy.deepcopy(base))
    check_round_trip(base, model, "bert", tmp_path / "adapter", tmp_path, exact_unmerged=True)


def test_a_delta_of_only_a_norm_gets_a_zero_carrier_adapter(tmp_path):
    base = tiny_bert()
    norm = "bert.encoder.layer.1.output.LayerNorm.weight"
    model, delta = hand_delta(base, {norm: ([0, 3], [0.5, 0.25])})
    plan = plan_export(delta, base)
    assert plan.dense == ["bert.encoder.layer.1.output.LayerNorm"] and plan.carrier
    export_peft(delta, tmp_path / "adapter", copy.deepcopy(base))
    check_round_trip(base, model, "bert", tmp_path / "adapter", tmp_path, exact_unmerged=True)


def test_a_delta_of_a_peft_model_is_refused_with_the_tensors_and_the_preset():
    config = peft.LoraConfig(r=2, target_modules=["query"])
    lora = peft.get_peft_model(tiny_bert(), config)
    name = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"
    _, delta = hand_delta(lora, {name: ([0], [0.5])})
    with pytest.raises(unmask.DeltaError) as err:
        plan_export(delta, tiny_bert())
    assert name in str(err.value)
    assert_clear(str(err.value), r"peft cannot represent 1 tensor", r"peft_exportable")
    assert "save_pretrained" in str(err.value)  # the way out for an ID3+LoRA delta


class Shared(nn.Module):
    """Two Linear layers sharing one weight, and a parameter of the module itself."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.b(self.a(x)) * self.scale


@pytest.mark.parametrize(
    ("name", "why"),
    [("a.weight", "shared with another module"), ("scale", "a parameter of the model itself")],
)
def test_tensors_peft_cannot_hold_are_refused(name, why, tmp_path):
    base = Shared()
    _, delta = hand_delta(base, {name: ([1], [0.5])})
    with pytest.raises(unmask.DeltaError, match=why):
        export_peft(delta, tmp_path / "adapter", base)
    assert not (tmp_path / "adapter").exists()


def test_export_checks_the_base_model_and_leaves_nothing_behind(tmp_path):
    _, _, delta = trained("bert", **unmask.peft_exportable(tiny_bert()))
    with pytest.raises(unmask.DeltaError, match="differs from the base model"):
        export_peft(delta, tmp_path / "adapter", tiny_bert(seed=5))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_the_previous_export(tmp_path, monkeypatch):
    base, _, delta = trained("bert", **unmask.peft_exportable(tiny_bert()))
    export_peft(delta, tmp_path / "adapter", copy.deepcopy(base))
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}

    def full_disk(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space"):
        export_peft(delta, tmp_path / "adapter", copy.deepcopy(base))
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left


def test_the_adapter_folder_follows_the_umask(tmp_path):
    base, _, delta = trained("bert", **unmask.peft_exportable(tiny_bert()))
    old = os.umask(0o022)
    try:
        export_peft(delta, tmp_path / "adapter", base)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755


def test_export_refuses_an_output_folder_holding_other_files(tmp_path):
    base, _, delta = trained("bert", **unmask.peft_exportable(tiny_bert()))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="holding other files"):
        export_peft(delta, tmp_path / "mine", base)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_peft_exportable_lists_untied_linear_weights_only():
    (pattern,) = unmask.peft_exportable(tiny_llama())["include"]
    names = [n for n, _ in tiny_llama().named_parameters() if re.search(pattern, n)]
    assert names and all(n.endswith("_proj.weight") for n in names)  # no embedding, no norm
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers


# ------------------------------------------------------------------ the command line


@pytest.fixture
def saved_base_and_delta(tmp_path):
    """(base folder, delta folder recording it, trained model) of a tiny BERT classifier."""
    base, model, delta = trained("bert", **unmask.peft_exportable(tiny_bert()))
    base.save_pretrained(tmp_path / "base")
    delta.metadata["base_model"] = str(tmp_path / "base")
    delta.save_pretrained(tmp_path / "delta")
    return tmp_path / "base", tmp_path / "delta", model


def test_cli_export_writes_an_adapter_that_peft_loads(saved_base_and_delta, tmp_path, capsys):
    base_dir, delta_dir, model = saved_base_and_delta
    argv = ["export", "--delta", str(delta_dir), "--format", "peft"]
    code, err = cli([*argv, "--output", str(tmp_path / "adapter")], capsys)
    assert code == 0, err
    base = type(model).from_pretrained(base_dir)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert torch.equal(logits(loaded, "bert"), logits(model, "bert"))
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(base_dir)


def test_cli_export_exit_codes(saved_base_and_delta, tmp_path, capsys):
    base_dir, delta_dir, _ = saved_base_and_delta
    argv = ["export", "--delta", str(delta_dir), "--format", "peft", "--output"]
    other = tmp_path / "other"
    tiny_bert(seed=7).save_pretrained(other)
    code, err = cli([*argv, str(tmp_path / "a"), "--model", str(other)], capsys)
    assert code == 2 and "differs from the base model" in err and "Traceback" not in err
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"]))
    name = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"
    _, peft_delta = hand_delta(lora, {name: ([0], [0.5])})
    peft_delta.save_pretrained(tmp_path / "peft-delta")
    code, err = cli(
        ["export", "--delta", str(tmp_path / "peft-delta"), "--format", "peft", "--output",
         str(tmp_path / "b"), "--model", str(base_dir)],
        capsys,
    )  # fmt: skip
    assert code == 2 and "peft cannot represent" in err and "peft_exportable" in err
    with pytest.raises(SystemExit) as exit_:
        cli(["export", "--delta", str(delta_dir), "--format", "onnx", "--output", "x"], capsys)
    assert exit_.value.code == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
