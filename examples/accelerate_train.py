"""ID3 fine-tuning in a plain training loop driven by accelerate.

    accelerate launch --num_processes 1 --cpu examples/accelerate_train.py --out /tmp/acc-run
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --out /tmp/acc-run

A tiny randomly initialised BERT classifier learns a synthetic task (is token 7 in the sequence?),
so the script downloads nothing and runs in seconds on a CPU. It prints the loss and the number of
unmasked weights, then saves the sparse delta (main process only) and checks that it rebuilds the
trained model. With several processes each one trains on its shard of every batch and every
process runs `--steps` optimizer steps; the script checks that all of them selected the same
weights. On a machine without CUDA the processes run on the CPU with gloo (`accelerate launch
--cpu` itself starts only one process unless it is given an mpirun hostfile).
"""

from __future__ import annotations

import argparse
import copy
import hashlib

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
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

    # Without cpu=True, accelerate 1.15 on a machine without CUDA gives each launched process
    # DistributedType.NO: every process would train alone and call itself the main process.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
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
    # `steps` batches of 16 for every process: the prepared loader gives each its own shard.
    data = synthetic_data(16 * args.steps * accelerator.num_processes, 1)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    # The scheduler is stepped here, once per optimizer step, and not prepared: accelerate's
    # prepared scheduler steps num_processes times per call, which would end this schedule
    # (and make the learning rate negative) after steps / num_processes steps.
    model, opt, loader = accelerator.prepare(model, opt, loader)

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

    selected = sorted(opt.optimizer.selected().items())
    digest = hashlib.sha256(b"".join(n.encode() + i.cpu().numpy().tobytes() for n, i in selected))
    same_selection = len(set(gather_object([digest.hexdigest()]))) == 1
    accelerator.print(
        f"selection identical on all {accelerator.num_processes} processes: {same_selection}"
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # every process holds the same delta; one writes it
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
