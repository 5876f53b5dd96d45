"""The selected entries' gradients of a Linear weight and of an Embedding, without the dense one.

A weight W (out x in) with selected entries S = {(r_i, c_i)} needs

    g_i = Σ_t dY[t, r_i] · X[t, c_i]            (t over every token of the batch)

a sampled dense-dense matrix product (SDDMM, `torch.sparse.sampled_addmm`, on CPU and CUDA) over
S's pattern: T·|S| multiply-adds instead of the dense dYᵀX's T·out·in. The product reads rows of
dYᵀ and Xᵀ, but autograd hands over dY and X token-major (T x out, T x in), so most of the cost
is transposing them, not the arithmetic (docs/sparse_backward.md). Three things keep that cheap:

- only the rows of W that hold entries are transposed (`EntryPattern` compacts W to them), unless
  more than half of them do: then a plain transpose of the whole is cheaper than a gather;
- a transpose copies into a `Scratch` buffer that lives as long as the sparse backward, so the
  large ones are not fresh allocations (each fresh large block is page-faulted in again on every
  backward; measured 2.5x slower for the tied head's dLogits on CPU);
- modules fed the same input (q/k/v, gate/up) transpose it once per backward (`Scratch`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

# Used rows of W whose entries are computed at a time: one (ROW_BLOCK x T) copy of dY's columns.
ROW_BLOCK = 4096


@dataclass
class EntryPattern:
    """Where a matrix's entries sit, compacted to the rows and columns that hold any of them.

    `used_rows` (R,) / `used_cols` (C,): the matrix rows / columns that are gathered, ascending:
    the ones holding entries, or every one (`all_rows` / `all_cols`) when more than half hold
    entries. `blocks`: per block of at most ROW_BLOCK of `used_rows`, (first, end) into
    `used_rows` and the block's entries as a CSR pattern of zeros over (end - first) x C in these
    coordinates, in entry order.
    """

    used_rows: Tensor
    used_cols: Tensor
    blocks: list[tuple[int, int, Tensor]]
    all_rows: bool
    all_cols: bool


def _compact(index: Tensor, size: int) -> tuple[Tensor, Tensor, bool]:
    """(gathered indices, each entry's position among them, whether they are all `size`)."""
    used, local = torch.unique(index, sorted=True, return_inverse=True)
    if 2 * used.numel() > size:
        return torch.arange(size, device=index.device), index, True
    return used, local, False


def entry_pattern(
    rows: Tensor, cols: Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> EntryPattern:
    """The `EntryPattern` of entries (rows ascending, then columns) of a `shape` matrix."""
    used_rows, local_rows, all_rows = _compact(rows, shape[0])
    used_cols, local_cols, all_cols = _compact(cols, shape[1])
    blocks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        for r0 in range(0, used_rows.numel(), ROW_BLOCK) if rows.numel() else ():
            r1 = min(r0 + ROW_BLOCK, used_rows.numel())
            edges = torch.arange(r0, r1 + 1, device=rows.device)
            crow = torch.searchsorted(local_rows, edges)
            lo, hi = int(crow[0]), int(crow[-1])
            if lo == hi:
                continue  # a block of uncompacted rows holding no entry
            values = torch.zeros(hi - lo, dtype=dtype, device=rows.device)
            csr = torch.sparse_csr_tensor(
                crow - lo, local_cols[lo:hi], values, size=(r1 - r0, used_cols.numel()),
                check_invariants=False,
            )  # fmt: skip
            blocks.append((r0, r1, csr))
    return EntryPattern(used_rows, used_cols, blocks, all_rows, all_cols)


class Scratch:
    """Buffers for the transposed copies, reused from one backward to the next.

    Holds at most 2 x ROW_BLOCK x T + 4 x (max in) x T elements for the largest T seen,
    allocated on first use and grown when a longer batch comes. `forget()` drops the shared
    transposed input (call it whenever the inputs may change: every forward). One backward at
    a time: two threads running backward through the same model would share the buffers.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._input: tuple[Tensor, tuple, Tensor] | None = None

    def take(self, name: str, shape: tuple[int, int], dtype: torch.dtype, device) -> Tensor:
        """A `shape` buffer called `name` (its old contents are garbage)."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)  # free it before allocating the larger one
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def forget(self) -> None:
        self._input = None

    def transposed_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """xᵀ (in x T, contiguous, `dtype`), transposed once for every module fed this x.

        The cache holds x's storage (detached: x's autograd history would reach the module's
        plan, whose owner holds this, a cycle through autograd nodes that gc cannot free), so
        it cannot be freed and reused by another tensor with the same address while the copy
        is kept; `_version` (shared with the detached view) catches in-place changes.
        """
        key = (x.data_ptr(), x.shape, x.stride(), x._version, x.dtype, dtype)
        if self._input is not None and self._input[1] == key:
            return self._input[2]
        self._input = None
        out = transposed_rows(x, None, 0, x.shape[1], dtype, self, "input")
        self._input = (x.detach(), key, out)
        return out


def transposed_rows(
    a: Tensor,
    index: Tensor | None,
    start: int,
    end: int,
    dtype: torch.dtype,
    scratch: Scratch | None,
    name: str,
) -> Tensor:
    """Rows `start:end` of aᵀ (index None), or rows `index` of aᵀ, as a contiguous (n x T).

    A token-major gather or slice first, then one transposing copy of a contiguous tensor:
    on CPU that copy is torch's blocked transpose, where index_select on aᵀ reads a strided
    column per row (measured 1.6x slower on the tied head's 49152 columns).
    """

    def buffer(part: str, shape: tuple[int, int], kind: torch.dtype) -> Tensor:
        if scratch is None:
            return torch.empty(shape, dtype=kind, device=a.device)
        return scratch.take(f"{name}.{part}", shape, kind, a.device)

    width = end - start if index is None else index.numel()
    if index is None and width == a.shape[1] and a.is_contiguous():
        token_major = a
    elif index is None:
        token_major = buffer("gather", (a.shape[0], width), a.dtype).copy_(a[:, start:end])
    else:
        token_major = buffer("gather", (a.shape[0], width), a.dtype)
        torch.index_select(a, 1, index, out=token_major)
    return buffer("t", (width, a.shape[0]), dtype).copy_(token_major.t())


def linear_entry_grads(
    dy: Tensor,
    x: Tensor,
    pattern: EntryPattern,
    dtype: torch.dtype,
    scratch: Scratch | None = None,
) -> Tensor:
    """g_i = Σ_t dy[t, rows_i] · x[t, cols_i] for every entry i of `pattern`, without forming
    dyᵀx: a sampled matrix product (SDDMM, `torch.sparse.sampled_addmm`) per block of rows.

    Args:
        dy: (T, out) output gradient; x: (T, in) input.
        pattern: `entry_pattern` of the entries; dtype: the result's and arithmetic's dtype.
        scratch: buffers for the transposes (None: fresh ones).

    Returns:
        (n,) in `dtype`, in entry order. Temporaries: (C + 2 x ROW_BLOCK) x T elements at most,
        C <= in the gathered columns, besides the n results (in `scratch` when given).
    """
    if not pattern.blocks:
        return torch.zeros(0, dtype=dtype, device=dy.device)
    if pattern.all_cols and scratch is not None:
        x_used = scratch.transposed_input(x, dtype)
    else:
        index = None if pattern.all_cols else pattern.used_cols
        x_used = transposed_rows(x, index, 0, x.shape[1], dtype, scratch, "cols")
    parts = []
    for r0, r1, csr in pattern.blocks:
        index = None if pattern.all_rows else pattern.used_rows[r0:r1]
        dy_used = transposed_rows(dy, index, r0, r1, dtype, scratch, "rows")
        # The product wants mat2's transpose contiguous: x_used (C x T) is passed as its view.
        parts.append(torch.sparse.sampled_addmm(csr, dy_used, x_used.t(), beta=0.0).values())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def embedding_entry_grads(
    dout: Tensor,
    ids: Tensor,
    rows: Tensor,
    cols: Tensor,
    padding_idx: int | None,
    dtype: torch.dtype,
) -> Tensor:
    """g_i = Σ_{t: ids[t] = rows_i} dout[t, cols_i] for every entry i (0 for the padding row).

    Args:
        dout: (N, H) gradient of the looked-up rows; ids: (N,) the token ids.
        rows, cols: (n,) int64 entry coordinates (token, column).

    Returns:
        (n,) in `dtype`; temporaries O(N · H + n) (a sum per distinct token of the batch).
    """
    if ids.numel() == 0:  # an empty batch: every entry's sum is over no position
        return torch.zeros(rows.numel(), dtype=dtype, device=dout.device)
    tokens, where = torch.unique(ids, sorted=True, return_inverse=True)
    compact = torch.zeros(tokens.numel(), dout.shape[1], dtype=dtype, device=dout.device)
    compact.index_add_(0, where, dout.to(dtype))
    pos = torch.searchsorted(tokens, rows).clamp_(max=tokens.numel() - 1)
    hit = tokens[pos] == rows
    if padding_idx is not None:
        hit &= rows != padding_idx
    return torch.where(hit, compact[pos, cols], torch.zeros((), dtype=dtype, device=dout.device))
