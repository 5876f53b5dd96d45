"""ID3 on top of peft adapters: LoRA (with a modules_to_save head), IA3, LoHa."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_batches, snapshot, tiny_bert, tiny_llama
from transformers import TrainingArguments

import unmask
from unmask.integrations.peft import MODULES_TO_SAVE, peft_candidates

peft = pytest.importorskip("peft")

# peft 0.21 calls a transformers helper that transformers 5.24 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")


def lora_bert(seed: int = 0):
    """Tiny BERT classifier with LoRA on query/value; peft makes `classifier` a trainable copy."""
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"
    )
    return peft.get_peft_model(tiny_bert(seed), config)


def lora_llama_down_proj(seed: int = 0):
    # down_proj maps 64 -> 32, so lora_A (r x 64) is twice the size of lora_B (32 x r).
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_llama(seed), config)


def train(model, opt, batches):
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def frozen_unchanged(model, before) -> bool:
    return all(
        torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad
    )


def test_peft_candidates():
    assert peft_candidates(lora_bert()) == {"dense": [MODULES_TO_SAVE]}
    assert peft_candidates(lora_llama_down_proj()) == {}


def test_id3_on_lora_selects_only_lora_weights_within_budget():
    model = lora_bert()
    before = snapshot(model)
    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    budget, steps = head + 100, 4
    opt = unmask.SelectiveOptimizer(
        model, method="id3", budget=budget, total_steps=steps, lr=1e-2, **peft_candidates(model)
    )
    assert opt.budget == 100 and opt.total_budget == budget
    # The "0.1%"-style fraction counts adapter weights (and the head), not the frozen backbone.
    share = unmask.SelectiveOptimizer(model, method="id3", budget=0.5, total_steps=steps)
    assert share.total_budget == (lora + head) // 2

    train(model, opt, make_batches("bert", steps))
    assert opt.num_selected == 100 and opt.num_changed == budget
    delta = opt.delta()
    assert set(delta.replace) == {
        n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n
    }
    assert delta.sparse and all("lora_" in name for name in delta.sparse)
    assert all(name.startswith("base_model.model.") for name in delta.shapes)
    assert frozen_unchanged(model, before)
    changed = sum(int((p != before[n]).sum()) for n, p in model.named_parameters() if "lora_" in n)
    assert 0 < changed <= 100


def test_lora_init_zero_scores_carry_over():
    # At LoRA init B = 0, so dL/dA = 0: only lora_B entries score at step 0. The quota they
    # cannot fill carries over, and the count catches up at the next step.
    model = lora_llama_down_proj()
    n_b = sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n)
    n_a = sum(p.numel() for n, p in model.named_parameters() if "lora_A" in n)
    assert (n_a, n_b) == (256, 128)
    budget, steps = 300, 2
    opt = unmask.SelectiveOptimizer(model, method="id3", budget=budget, total_steps=steps, lr=1e-2)
    quota = unmask.UniformSchedule().cumulative(0, budget, steps)
    assert quota == 150 > n_b
    batches = make_batches("llama", steps)

    train(model, opt, batches[:1])
    assert opt.num_selected == n_b < quota  # lags: every B entry, no A entry
    assert all("lora_B" in name for name in opt.selected())
    train(model, opt, batches[1:])
    assert opt.num_selected == budget  # caught up once B != 0 gives A a gradient
    assert sum(i.numel() for n, i in opt.selected().items() if "lora_A" in n) == budget - n_b


def test_lora_delta_applies_to_fresh_lora_model_bit_identically(tmp_path):
    model = lora_bert(seed=3)
    opt = unmask.SelectiveOptimizer(
        model, method="id3", budget=200, total_steps=3, lr=1e-2, **peft_candidates(model)
    )
    train(model, opt, make_batches("bert", 3))
    opt.delta().save_pretrained(tmp_path / "delta")

    fresh = lora_bert(seed=3)  # same base, config and seed: the same LoRA initialisation
    unmask.SparseDelta.from_pretrained(tmp_path / "delta").apply_(fresh)
    trained = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trained[name]), name
    with pytest.raises(unmask.DeltaError, match="differs from the base"):
        unmask.SparseDelta.from_pretrained(tmp_path / "delta").apply_(lora_bert(seed=4))


@pytest.mark.parametrize(
    ("tuner", "marker"),
    [
        (
            lambda: peft.IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"],
                feedforward_modules=["down_proj"],
                task_type="CAUSAL_LM",
            ),
            "ia3_l",
        ),
        (
            lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
            "hada_",
        ),
    ],
    ids=["ia3", "loha"],
)
def test_id3_on_other_peft_tuners(tuner, marker):
    model = peft.get_peft_model(tiny_llama(), tuner())
    before = snapshot(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(marker in n for n in trainable)
    budget, steps = 60, 3
    opt = unmask.SelectiveOptimizer(model, method="id3", budget=budget, total_steps=steps, lr=1e-2)
    train(model, opt, make_batches("llama", steps))
    assert opt.num_selected == budget
    assert all(marker in name for name in opt.selected())
    assert frozen_unchanged(model, before)


def test_unmask_trainer_on_lora_model(tmp_path):
    from unmask.integrations.trainer import DELTA_DIRNAME, UnmaskTrainer, unwrap_optimizer

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, VOCAB, (16, 12), generator=g)
            self.labels = torch.randint(0, 2, (16,), generator=g)

        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    def make_args(out):
        return TrainingArguments(
            output_dir=str(out),
            max_steps=4,
            save_steps=2,
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            seed=0,
            logging_steps=1,
            learning_rate=1e-2,
            disable_tqdm=True,
        )

    model = lora_bert()
    config = dict(method="id3", budget=166, **peft_candidates(model))
    trainer = UnmaskTrainer(
        model=model, args=make_args(tmp_path), train_dataset=Tokens(), unmask_config=config
    )
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert opt.num_changed == 166 and opt.total_steps == 4
    delta = unmask.SparseDelta.from_pretrained(tmp_path / "checkpoint-4" / DELTA_DIRNAME)
    assert delta.num_weights == 166 and all("lora_" in n for n in delta.sparse)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["unmask/alloc/head"] == 66  # the classifier copy, trained whole

    # The Trainer checkpoints a peft model as adapter weights; resuming restores them and the
    # selection, and ends where the uninterrupted run ended.
    resumed = UnmaskTrainer(
        model=lora_bert(),
        args=make_args(tmp_path / "r"),
        train_dataset=Tokens(),
        unmask_config=config,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for (name, p), q in zip(model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_lora_delta_refuses_an_adapter_initialised_otherwise_where_it_changes_nothing():
    # With a non-zero B at initialisation, a LoRA layer the delta never touches still changes
    # the output, so the delta fingerprints every adapter weight, not only the layers it changes.
    def model(value_seed: int):
        config = peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)
        lora = peft.get_peft_model(tiny_bert(), config)
        torch.manual_seed(value_seed)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if ".value.lora_" in name:
                    p.copy_(torch.randn_like(p))
        return lora

    trained = model(value_seed=1)
    opt = unmask.SelectiveOptimizer(
        trained, method="id3", budget=40, total_steps=2, lr=1e-2, include=[r"\.query\.lora_"]
    )
    train(trained, opt, make_batches("bert", 2))
    delta = opt.delta()
    assert delta.sparse and all(".query." in name for name in delta.sparse)
    assert any(".value.lora_B" in name for name in delta.dependency_hashes)
    fresh = model(value_seed=1)
    delta.apply_(fresh)
    pairs = zip(fresh.parameters(), trained.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    other = model(value_seed=2)  # the same query adapter, another value adapter
    with pytest.raises(unmask.DeltaError, match=r"value\.lora_[AB]\.default\.weight"):
        delta.apply_(other)
