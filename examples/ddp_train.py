"""ID3 fine-tuning under torch DistributedDataParallel, launched with torchrun.

    torchrun --nproc_per_node 2 examples/ddp_train.py --out /tmp/ddp-run
    python -m torch.distributed.run --nproc_per_node 2 examples/ddp_train.py --out /tmp/ddp-run

One process per GPU with NCCL when CUDA is available, else processes on the CPU with gloo. By
default a tiny randomly initialised BERT classifier learns a synthetic task (is token 7 in the
sequence?), so nothing is downloaded; ``--model PATH`` fine-tunes a local BERT-style encoder
folder instead (a new 2-label head is trained whole). Each process trains on its own shard of
every global batch; DDP all-reduces the gradients before ``opt.step()``, so every process selects
the same weights. Rank 0 prints the loss, checks that all ranks hold the same selection, saves
the sparse delta and checks that it rebuilds the trained model bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

import unmask

VOCAB, LENGTH = 100, 16


def synthetic_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`n` random sequences labelled by whether token 7 occurs in them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    labels = (ids == 7).any(dim=1).long()
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]


def build_model(path: str | None, seed: int) -> torch.nn.Module:
    """The model to fine-tune; the same on every rank (and again for the final check)."""
    # Seeding makes the random weights (the tiny model, or a pretrained model's new head) equal on
    # every rank. DDP would broadcast rank 0's weights anyway, but the final check rebuilds the
    # base model and must get the same one.
    torch.manual_seed(seed)
    if path:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def selection_digest(opt: unmask.SelectiveOptimizer) -> str:
    """A short checksum of the selected weights' names and indices."""
    h = hashlib.sha256()
    for name, index in sorted(opt.selected().items()):
        h.update(name.encode())
        h.update(index.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local model folder (default: tiny BERT)")
    parser.add_argument("--out", default="ddp-run", help="folder for the delta (rank 0 writes)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (T)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process")
    parser.add_argument("--budget", default="2%")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = build_model(args.model, args.seed).to(device)
    ddp = DDP(model, device_ids=[local_rank] if cuda else None)
    # Build the optimizer on the unwrapped module, after DDP (which broadcasts rank 0's weights)
    # and on the final device: parameter names carry no "module." prefix and the slot buffers
    # live next to the weights.
    opt = unmask.SelectiveOptimizer(
        ddp.module,
        method="id3",
        budget=args.budget,
        total_steps=args.steps,
        lr=args.lr,
        weight_decay=0.0,
        dense=[r"^classifier\."],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / args.steps)
    # Exactly `steps` batches on every process: the global batch is batch_size * world.
    data = synthetic_data(args.steps * args.batch_size * world, seed=1)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)

    ddp.train()
    for step, batch in enumerate(loader):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = ddp(**batch).loss
        loss.backward()  # DDP averages the gradients over all processes here
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)  # same norm on every rank
        opt.step()  # every rank scores the same averaged gradients: same selection
        scheduler.step()
        opt.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # SUM (gloo has no AVG); divided below
            if rank == 0:
                print(
                    f"step {step:3d}  loss {mean_loss.item() / world:.4f}  "
                    f"selected {opt.num_selected}/{opt.budget}",
                    flush=True,
                )

    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, selection_digest(opt))
    if rank == 0:
        print(f"selection identical on all {world} ranks: {len(set(digests)) == 1}", flush=True)
        delta = opt.delta()  # only rank 0 writes: every rank holds the same delta
        delta.save_pretrained(args.out)
        rebuilt = unmask.SparseDelta.from_pretrained(args.out).apply_(
            build_model(args.model, args.seed)
        )
        same = all(
            torch.equal(p.detach().cpu(), q.detach())
            for p, q in zip(model.parameters(), rebuilt.parameters(), strict=True)
        )
        print(
            f"saved {delta.num_weights} changed weights to {args.out}; "
            f"delta rebuilds the trained model bit for bit: {same}",
            flush=True,
        )
    dist.barrier()  # the others wait until the delta is on disk before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
