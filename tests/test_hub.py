"""Deltas and the Hugging Face hub, offline: loading by hub id from a local cache, a local folder
winning, push_to_hub (HfApi patched, no network), the model card, and `unmask.load`."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import make_batches, tiny_bert, tiny_llama, train_id3

import unmask
from unmask import SparseDelta
from unmask.store.delta_format import CONFIG_FILE, TENSORS_FILE
from unmask.store.model_card import CARD_FILE, MARKER

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and a fresh hub cache (HF_HUB_CACHE) under tmp_path: nothing online."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_repo(cache, repo_id: str, delta: SparseDelta, tmp_path) -> None:
    """Put `delta` into the hub cache as repository `repo_id`'s main branch, the layout
    snapshot_download leaves (refs/main -> commit, snapshots/<commit>/<files>)."""
    folder = tmp_path / "saved"
    delta.save_pretrained(folder)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in (CONFIG_FILE, TENSORS_FILE):
        shutil.copyfile(folder / name, snapshot / name)


@pytest.fixture(scope="module")
def delta_and_model():
    model = tiny_bert()
    return train_id3(model).delta(), model


def same(a: SparseDelta, b: SparseDelta) -> bool:
    return a.base_hashes == b.base_hashes and all(
        torch.equal(a.sparse[n][1], b.sparse[n][1]) for n in a.sparse
    )


def test_from_pretrained_reads_a_hub_id_from_the_cache_offline(offline, delta_and_model, tmp_path):
    delta, model = delta_and_model
    cache_repo(offline, "alice/polarity-delta", delta, tmp_path)
    loaded = SparseDelta.from_pretrained("alice/polarity-delta")
    assert same(loaded, delta)
    fresh = tiny_bert()
    loaded.apply_(fresh)
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())


def test_an_explicit_cache_dir_and_revision_are_used(offline, delta_and_model, tmp_path):
    delta, _ = delta_and_model
    other = tmp_path / "elsewhere"
    cache_repo(other, "alice/d", delta, tmp_path)
    assert same(SparseDelta.from_pretrained("alice/d", revision=COMMIT, cache_dir=other), delta)
    with pytest.raises(unmask.DeltaError, match="not a local folder"):
        SparseDelta.from_pretrained("alice/d")  # not in the default cache


def test_a_local_folder_wins_over_a_hub_id(offline, delta_and_model, tmp_path, monkeypatch):
    delta, _ = delta_and_model
    cache_repo(offline, "alice/d", delta, tmp_path)
    model = tiny_bert(seed=2)
    local = train_id3(model, steps=2).delta()
    monkeypatch.chdir(tmp_path)
    local.save_pretrained("alice/d")  # a relative folder spelled like the hub id
    loaded = SparseDelta.from_pretrained("alice/d")
    assert same(loaded, local) and not same(loaded, delta)


def test_a_hub_id_missing_offline_says_what_to_do(offline):
    with pytest.raises(unmask.DeltaError) as err:
        SparseDelta.from_pretrained("nobody/no-such-delta")
    message = str(err.value)
    assert "not a local folder" in message and "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("name", ["delta", "runs/default/delta", "./alice/d"])
def test_a_missing_name_that_is_no_hub_id_is_a_missing_folder(offline, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(unmask.DeltaError, match=r"not found: a delta folder holds"):
        SparseDelta.from_pretrained(name)


def test_push_to_hub_creates_the_repo_and_uploads_the_delta(delta_and_model, monkeypatch):
    delta, _ = delta_and_model
    calls, uploaded = [], {}

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, kwargs))
        uploaded["delta"] = SparseDelta.from_pretrained(folder_path)
        uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        uploaded["card"] = (Path(folder_path) / CARD_FILE).read_text()
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert delta.push_to_hub("alice/polarity-delta", private=True) == "commit-info"
    assert [c[:2] for c in calls] == [
        ("create_repo", "alice/polarity-delta"),
        ("upload_folder", "alice/polarity-delta"),
    ]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert uploaded["files"] == sorted([CARD_FILE, CONFIG_FILE, TENSORS_FILE])
    assert same(uploaded["delta"], delta)
    assert 'unmask.load("' in uploaded["card"] and "alice/polarity-delta" in uploaded["card"]
    with pytest.raises(ValueError, match="not a hub repository id"):
        delta.push_to_hub("/tmp/not-an-id")


def test_every_saved_delta_has_a_model_card_that_loading_ignores(tmp_path):
    model = tiny_bert()
    opt = train_id3(model)
    delta = opt.delta()
    delta.metadata["base_model"] = "sentence-transformers/all-MiniLM-L6-v2"
    delta.save_pretrained(tmp_path / "d")
    card = (tmp_path / "d" / CARD_FILE).read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card  # the hub's YAML field
    assert "`id3`" in card and f"{delta.num_weights:,}" in card and f"{opt.total_budget:,}" in card
    assert "PeftModel.from_pretrained" in card and "unmask export" in card
    (tmp_path / "d" / CARD_FILE).write_text(MARKER + "\n\0 not markdown at all \xff")
    assert same(SparseDelta.from_pretrained(tmp_path / "d"), delta)


def test_a_readme_of_the_users_own_is_kept(tmp_path):
    delta = train_id3(tiny_bert()).delta()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / CARD_FILE).write_text("# my notes\n")
    delta.save_pretrained(tmp_path / "d")
    assert (tmp_path / "d" / CARD_FILE).read_text() == "# my notes\n"
    (tmp_path / "e").mkdir()
    delta.save_pretrained(tmp_path / "e")
    delta.metadata["method"] = "changed"
    delta.save_pretrained(tmp_path / "e")  # its own card is rewritten
    assert "`changed`" in (tmp_path / "e" / CARD_FILE).read_text()


def test_a_local_base_path_stays_out_of_the_cards_yaml(tmp_path):
    delta = train_id3(tiny_bert()).delta()
    delta.metadata["base_model"] = str(tmp_path / "base")
    delta.save_pretrained(tmp_path / "d")
    header = (tmp_path / "d" / CARD_FILE).read_text().split("---")[1]
    assert "base_model" not in header


# ------------------------------------------------------------------ unmask.load


def test_load_restores_a_classifier_with_its_labels(tmp_path):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    opt = unmask.SelectiveOptimizer(
        model, method="id3", budget=300, total_steps=2, lr=1e-2, dense=["classifier"]
    )
    for batch in make_batches("bert", 2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    delta = opt.delta()
    delta.metadata.update(base_model=str(tmp_path / "base"), label_names=["neg", "pos"])
    delta.save_pretrained(tmp_path / "delta")
    loaded = unmask.load(None, tmp_path / "delta")  # the recorded base, its Auto class
    assert type(loaded).__name__ == "BertForSequenceClassification"
    assert loaded.config.id2label == {0: "neg", 1: "pos"}
    assert loaded.config.label2id == {"neg": 0, "pos": 1}
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in loaded.named_parameters())
    with pytest.raises(unmask.DeltaError, match="differs from the base"):
        unmask.load(tiny_bert(seed=4), delta)


def test_load_gives_a_causal_lm_for_a_delta_without_a_head(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    opt = unmask.SelectiveOptimizer(model, method="id3", budget=200, total_steps=2, lr=1e-2)
    for batch in make_batches("llama", 2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    opt.delta().save_pretrained(tmp_path / "delta")
    loaded = unmask.load(str(tmp_path / "base"), str(tmp_path / "delta"))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = make_batches("llama", 1, seed=3)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_without_a_recorded_base_says_to_pass_one():
    delta = train_id3(tiny_bert()).delta()
    delta.metadata.pop("base_model", None)
    with pytest.raises(unmask.DeltaError, match="pass the base model"):
        unmask.load(None, delta)
