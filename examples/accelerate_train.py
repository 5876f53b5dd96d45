"""ID3 fine-tuning in a plain training loop driven by accelerate.

    accelerate launch --num_processes 1 --cpu examples/accelerate_train.py --out /tmp/acc-run

A tiny randomly initialised BERT classifier learns a synthetic task (is token 7 in the sequence?),
so the script downloads nothing and runs in seconds on a CPU. It prints the loss and the number of
unmasked weights, then saves the sparse delta and checks that it rebuilds the trained model.
"""

from __future__ import annotations

import argparse
import copy

import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification

import unmask

VOCAB, LENGTH = 100, 16


def synthetic_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    labels = (ids == 7).any(dim=1).long()
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="accelerate-run", help="folder for the delta")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--budget", default="2%")
    args = parser.parse_args()

    accelerator = Accelerator()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    base = copy.deepcopy(model)
    # SelectiveOptimizer keeps its slot buffers on the device of the parameters it is given:
    # move the model first, then build the optimizer.
    model.to(accelerator.device)
    opt = unmask.SelectiveOptimizer(
        model,
        method="id3",
        budget=args.budget,
        total_steps=args.steps,
        lr=3e-3,
        weight_decay=0.0,
        dense=["classifier"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / args.steps)
    loader = torch.utils.data.DataLoader(synthetic_data(16 * args.steps, 1), batch_size=16)
    model, opt, loader, scheduler = accelerator.prepare(model, opt, loader, scheduler)

    model.train()
    for step, batch in enumerate(loader):
        loss = model(**batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()  # accelerate's AcceleratedOptimizer forwards to SelectiveOptimizer.step
        scheduler.step()
        opt.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            selective = opt.optimizer  # the SelectiveOptimizer inside the wrapper
            accelerator.print(
                f"step {step:3d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                f"selected {selective.num_selected}/{selective.budget}"
            )

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        delta = opt.optimizer.delta()
        delta.save_pretrained(args.out)
        rebuilt = unmask.SparseDelta.from_pretrained(args.out).apply_(base)
        trained = accelerator.unwrap_model(model)
        same = all(
            torch.equal(p.cpu(), q)
            for p, q in zip(trained.parameters(), rebuilt.parameters(), strict=True)
        )
        accelerator.print(
            f"saved {delta.num_weights} changed weights to {args.out}; "
            f"delta rebuilds the trained model bit for bit: {same}"
        )


if __name__ == "__main__":
    main()
