"""SelectiveOptimizer on FSDP2-sharded models (`torch.distributed.fsdp.fully_shard`).

Under FSDP2 every parameter is a DTensor with placement Shard(0) on a 1-D device mesh: rank r
holds the dim-0 rows [r·c, min((r+1)·c, d0)) of each tensor, c = ceil(d0 / world) (a later rank
may hold fewer rows, or none), and FSDP has already averaged the gradients over the ranks
(reduce-scatter) when the optimizer steps. Those rows are one contiguous run of the flattened
full tensor, starting at flat offset start_row · (numel / d0).

Invariants the optimizer relies on:

- The global index space is the unsharded one: tensor offsets sum the *full* tensors' numel, so
  a global index, the selection and the delta mean the same as in a single process.
- Selection is exact and identical on every rank: each rank takes the top-k of its own shards
  (`select_top_keys`, ties to the lowest global index), one all_gather pools the (key, global
  index) pairs, and the same lexicographic top-k decides on every rank. The global top-k lies in
  the union of the ranks' top-k's, so this equals what one process would choose from the same
  keys.
- Slots are rank-local: a rank assigns slots (and keeps optimizer state) only for the chosen
  weights inside its own shards, so the optimizer state is sharded with the weights. Every rank
  also keeps the ascending global indices of all chosen weights (`chosen`, 8 bytes per selected
  weight), from which the global count, `selected()` and `allocation()` are answered without
  communication.

Every function here that communicates says so; all ranks must call it in the same order.

What this means for `SelectiveOptimizer`: build it on every rank, on the sharded model. Per
rank: the slots, the wrapped optimizers' state, and `state_dict()` / `load_state_dict()` (each
rank saves and loads its own, with the same number of ranks). Global (the same on every rank):
`num_selected`, `num_changed`, `selected()`, `allocation()`, the schedule, and `delta()` (every
rank must call it; all get the same delta, rank 0 saves it). The construction of a static
method, `calibrate()`, `step()`, `delta()` and `clip_grad_norm_()` communicate, so every rank
calls them equally often. Not available under FSDP: `low_memory`, `freeze_unselected`, methods
without `supports_fsdp` ("id3-repeat").
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from unmask.choose.selection import KeySource, lexicographic_top, select_top_keys
from unmask.optimize.index_space import split_by_tensor

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_DTENSOR_MODULE = "torch.distributed.tensor"


def world_size() -> int:
    """Processes in the default torch.distributed group (1 without an initialised group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_sharded(t: Tensor) -> bool:
    """Whether `t` is a DTensor (its data is spread over several processes)."""
    # Importing torch.distributed.tensor takes about a second, and no DTensor can exist before
    # it is imported: look it up instead of importing it with unmask.
    module = sys.modules.get(_DTENSOR_MODULE)
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """This process's part of `t`: a DTensor's local shard (same storage), else `t` itself.

    In-place writes into a DTensor parameter's local shard are what FSDP2's next all-gather
    (the next forward) and `full_tensor()` see.
    """
    return t.to_local() if is_sharded(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor's `full_tensor()` (collective: every rank calls it), else `t`."""
    return t.full_tensor() if is_sharded(t) else t


class Shards:
    """Where this rank's shards of the candidate tensors lie in the global index space.

    starts[i]: flat offset of this rank's shard of candidate i within its full tensor.
    sizes[i]: the shard's numel (0 for an empty shard).
    chosen: ascending global indices of every weight selected on any rank (the same everywhere).
    """

    def __init__(
        self, params: list[Tensor], offsets: list[int], mesh: DeviceMesh, device: torch.device
    ) -> None:
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self.device = device
        self.starts: list[int] = []
        self.sizes: list[int] = []
        for p in params:
            first, count = _rows(p.shape[0], self.world, self.rank)
            row = p.numel() // p.shape[0] if p.shape[0] else 0
            self.starts.append(first * row)
            self.sizes.append(count * row)
        origins = [o + s for o, s in zip(offsets, self.starts, strict=True)]
        self._offsets = torch.tensor(offsets, dtype=torch.long, device=device)
        self._offsets_list = list(offsets)
        self._origins = torch.tensor(origins, dtype=torch.long, device=device)
        self._sizes = torch.tensor(self.sizes, dtype=torch.long, device=device)
        self.chosen = torch.zeros(0, dtype=torch.long, device=device)

    @classmethod
    def detect(
        cls, named: list[tuple[str, Tensor]], params: list[Tensor], offsets: list[int]
    ) -> Shards | None:
        """Shards for the candidates `params` (global `offsets`) if the trained parameters
        `named` (candidates and dense) are DTensors.

        Returns None when none is a DTensor (the ordinary, unsharded path). Raises ValueError for
        layouts other than FSDP2's: a mix of DTensors and plain tensors, several meshes, a mesh
        of more than one dimension (HSDP, tensor parallelism), or a placement other than Shard(0).
        """
        sharded = [(n, p) for n, p in named if is_sharded(p)]
        if not sharded:
            return None
        plain = [n for n, p in named if not is_sharded(p)]
        if plain:
            raise ValueError(
                f"some trained parameters are sharded DTensors and some are not ({plain[:3]}); "
                "unmask supports FSDP2 with every trained parameter sharded: call fully_shard on "
                "the root module too"
            )
        mesh = sharded[0][1].device_mesh
        shard0 = sys.modules[_DTENSOR_MODULE].Shard(0)
        for name, p in sharded:
            if p.device_mesh != mesh:
                raise ValueError(
                    f"parameter {name} lives on another device mesh than {sharded[0][0]}; "
                    "unmask supports one FSDP2 mesh for the whole model"
                )
            if mesh.ndim != 1 or tuple(p.placements) != (shard0,):
                raise ValueError(
                    f"parameter {name} has placements {tuple(p.placements)} on a "
                    f"{mesh.ndim}-D mesh; unmask supports FSDP2's Shard(0) on a 1-D mesh only "
                    "(not HSDP, tensor parallelism or other shard dimensions)"
                )
        shards = cls(params, offsets, mesh, sharded[0][1].device)
        for p, size in zip(params, shards.sizes, strict=True):
            shard = local(p)
            if shard.numel() != size or tuple(shard.shape[1:]) != tuple(p.shape[1:]):
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} has a local shard of shape "
                    f"{tuple(shard.shape)} on rank {shards.rank}, not the dim-0 rows FSDP2 makes "
                    "by default (rank r holds rows [r*c, (r+1)*c), c = ceil(d0 / world)); "
                    "custom shard_placement_fn layouts are not supported"
                )
            if not shard.is_contiguous():
                raise ValueError("a parameter's local shard is not contiguous")
        return shards

    # ------------------------------------------------------------------ selection

    def select(self, sources: list[KeySource], k: int, floor: float) -> Tensor:
        """The at most `k` best keys above `floor` over all ranks' shards, as ascending global
        indices, identical on every rank (ties: lowest global index). Collective.

        `sources` are this rank's shards, their offsets global (tensor offset + shard start).
        """
        index, keys = select_top_keys(sources, k, floor)
        # One all_gather of fixed size: k (key, index) rows per rank, padded with (-inf, -1).
        # float64 holds float32 keys and indices below 2^53 exactly.
        rows = torch.full((k, 2), float("-inf"), dtype=torch.float64, device=self.device)
        rows[:, 1] = -1
        rows[: index.numel(), 0] = keys.to(device=self.device, dtype=torch.float64)
        rows[: index.numel(), 1] = index.to(device=self.device, dtype=torch.float64)
        pooled = torch.empty((self.world * k, 2), dtype=torch.float64, device=self.device)
        dist.all_gather(list(pooled.chunk(self.world)), rows, group=self.group)
        keep = pooled[:, 0] > floor  # drops the padding (-inf is never above a floor)
        values, indices = pooled[keep, 0], pooled[keep, 1].long()
        if values.numel() > k:
            indices = lexicographic_top(values, indices, k)[0]
        return indices.sort().values

    def take(self, chosen: Tensor) -> Tensor:
        """Record `chosen` (global, ascending, the same on every rank); return the part of it
        that lies in this rank's shards, for which this rank assigns slots."""
        chosen = chosen.to(self.device)
        self.chosen = torch.cat([self.chosen, chosen]).sort().values
        tensor_of = torch.searchsorted(self._offsets, chosen, right=True) - 1
        position = chosen - self._origins[tensor_of]
        mine = (position >= 0) & (position < self._sizes[tensor_of])
        return chosen[mine]

    def chosen_by_tensor(self) -> list[tuple[int, Tensor]]:
        """Per candidate holding selected weights: (its position, ascending full-tensor flat
        indices of all its selected weights, on every rank)."""
        return [
            (i, self.chosen[lo:hi] - self._offsets_list[i])
            for i, lo, hi in split_by_tensor(self.chosen, self._offsets)
        ]

    # ------------------------------------------------------------------ agreement and results

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank. Collective."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())

    def total_norm(self, grads: list[Tensor]) -> Tensor:
        """L2 norm of the whole (unsharded) gradients from their Shard(0) pieces. Collective."""
        square = torch.zeros(1, dtype=torch.float64, device=self.device)
        for g in grads:
            square += local(g).detach().double().square().sum()
        dist.all_reduce(square, group=self.group)
        return square.sqrt()[0].float().cpu()

    def gather_selected(
        self, index: Tensor, delta: Tensor, base: Tensor
    ) -> list[tuple[int, Tensor, Tensor, Tensor]]:
        """Every rank's slots, merged: per candidate holding selected weights, (its position,
        ascending full-tensor flat indices, deltas, base values) — what one unsharded process
        would hold. `index` are this rank's slots' global indices. Collective."""
        count = torch.tensor([index.numel()], dtype=torch.long, device=self.device)
        counts = torch.empty(self.world, dtype=torch.long, device=self.device)
        dist.all_gather(list(counts.chunk(self.world)), count, group=self.group)
        counts_list = counts.tolist()
        width = max(counts_list)
        if width == 0:
            return []
        gathered = []
        for column in (index, delta, base):
            padded = torch.zeros(width, dtype=column.dtype, device=self.device)
            padded[: column.numel()] = column
            everyone = torch.empty(self.world * width, dtype=column.dtype, device=self.device)
            dist.all_gather(list(everyone.chunk(self.world)), padded, group=self.group)
            rows = everyone.view(self.world, width)
            gathered.append(torch.cat([rows[r, :c] for r, c in enumerate(counts_list)]))
        index, delta, base = gathered
        index, order = index.sort()  # ranks own disjoint indices
        delta, base = delta[order], base[order]
        return [
            (i, index[lo:hi] - self._offsets_list[i], delta[lo:hi], base[lo:hi])
            for i, lo, hi in split_by_tensor(index, self._offsets)
        ]


def _rows(d0: int, world: int, rank: int) -> tuple[int, int]:
    """First row and number of rows of `rank`'s Shard(0) piece of `d0` rows (torch.chunk's
    split: c = ceil(d0 / world) rows each, the last ranks fewer or none)."""
    c = math.ceil(d0 / world)
    first = min(rank * c, d0)
    return first, min(first + c, d0) - first
