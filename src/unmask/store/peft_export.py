"""Export a SparseDelta as an adapter folder that stock peft loads (`PeftModel.from_pretrained`).

The mapping, per changed tensor of the base model (all exact in fp32):
- sparse entries of an ``nn.Linear`` weight: peft's SHiRA stores per layer a values vector and
  its (row, col) indices. SHiRA holds r·(in + out) entries in every layer, one r for the whole
  adapter (ShiraConfig has no per-layer count), so each layer is padded with zero-valued entries
  at positions the delta does not change; r is chosen to make the folder smallest, and a layer
  that SHiRA cannot hold at that r is stored whole instead. SHiRA adds the values to the weight
  in its dtype (``W + values``), the expression `SparseDelta.apply_` uses: forward passes and
  `merge_and_unload()` equal the trained model bit for bit.
- entries of the input embedding (``get_input_embeddings()``, tied to the LM head or not):
  peft's trainable tokens store whole rows, here the trained rows that hold any changed entry
  (their other entries equal the base). SHiRA has no ``trainable_token_indices``, so such a delta
  is exported as LoRA instead: each changed Linear weight D becomes B·A with A (or B) made of
  one-hot rows picking D's non-zero columns (rows), rank the number of those, and
  ``lora_alpha = r`` (scale 1). Every product then has one non-zero term, so B·A = D exactly and
  `merge_and_unload()` is bit-identical; an unmerged forward computes ``base(x) + B(A(x))`` and
  differs by float rounding only (about 1e-7 relative). LoRA stores r·(in + out) numbers per
  layer, about dense size for scattered entries: keep the embedding out of training
  (`peft_exportable`) for SHiRA's compact form.
- anything else (biases, norms, a new classification head, other embeddings, non-Linear
  layers): the owning module is stored whole through ``modules_to_save`` (trained values; its
  unchanged tensors equal the base).
peft needs at least one adapted layer: a delta without Linear or embedding entries gets one
Linear layer with an all-zero adapter, which changes nothing.

Refused (DeltaError, listing the tensors): tensors the base model does not have (e.g. a delta of
a peft model's own adapter weights, ID3+LoRA: apply that to its peft model and save it with
peft), tensors shared by several modules other than a tied input embedding, and parameters of
the root module, which no peft wrapper can hold.
"""

from __future__ import annotations

import copy
import math
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unmask.store.delta import DeltaError, SparseDelta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md")
ADAPTER = "default"  # peft's adapter name inside a model; the folder does not record it
SHIRA_ENTRY_BYTES = 12  # a value (fp32) and its two int32 indices


@dataclass
class PeftPlan:
    """How a delta's tensors map onto peft (see the module doc).

    tuner: "SHIRA" or "LORA". sparse: Linear module name -> (flat indices, values), its weight's
    entries. tokens: input embedding module name -> ascending rows. dense: modules stored whole.
    rank: SHiRA's r (LORA: per-module ranks are in `lora_ranks`). carrier: the Linear module
    given an all-zero adapter when nothing else is adapted, else None.
    """

    tuner: str
    sparse: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    rank: int = 0
    lora_ranks: dict[str, int] = field(default_factory=dict)
    carrier: str | None = None

    def summary(self) -> dict[str, Any]:
        """Counts of what the adapter stores, for reports: tuner, layers, rows, modules."""
        return {
            "tuner": self.tuner.lower(),
            "sparse_layers": len(self.sparse),
            "shira_r": self.rank if self.tuner == "SHIRA" else None,
            "token_rows": sum(len(r) for r in self.tokens.values()),
            "dense_modules": list(self.dense),
        }


def peft_exportable(model: nn.Module) -> dict[str, list[str]]:
    """`SelectiveOptimizer` keywords that keep a delta exportable to peft in SHiRA's compact form.

    Returns ``{"include": [pattern]}``: the weights of the model's ``nn.Linear`` layers that
    share their weight with no other module (so not a tied LM head), as one anchored regex.
    Dense parameters (``dense=[...]``, e.g. a new head) stay allowed: they are exported whole.
    """
    shared = _shared_parameters(model)
    names = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and id(module.weight) not in shared
    ]
    if not names:
        raise ValueError("the model has no nn.Linear layer, so nothing maps onto peft's SHiRA")
    return {"include": ["^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"]}


def plan_export(delta: SparseDelta, model: nn.Module) -> PeftPlan:
    """Map every tensor of `delta` onto a peft tuner for the base `model`; DeltaError if some
    cannot be (the message lists them and how to train an exportable delta)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    shared = _shared_parameters(model)
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    refused: list[str] = []
    sparse, tokens, dense = {}, {}, set()
    for name in delta.shapes:
        if name not in params:
            refused.append(f"{name} (not a parameter of the base model)")
            continue
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if module is embedding and attr == "weight":
            tokens[owner] = _changed_rows(delta, name)
        elif id(params[name]) in shared:
            refused.append(f"{name} (shared with another module; peft would untie it)")
        elif not owner:
            refused.append(f"{name} (a parameter of the model itself, not of a layer)")
        elif isinstance(module, nn.Linear) and attr == "weight" and name in delta.sparse:
            sparse[owner] = delta.sparse[name]
        else:
            dense.add(owner)
    if refused:
        raise DeltaError(_refusal(refused))
    # A module stored whole holds all its tensors: nothing inside it needs a tuner too.
    dense = {m for m in dense if not any(m.startswith(f"{d}.") for d in dense)}
    inside = [m for m in [*sparse, *tokens] if any(m == d or m.startswith(f"{d}.") for d in dense)]
    for m in inside:
        if m in tokens:
            raise DeltaError(_refusal([f"{m}.weight (an embedding inside the changed module)"]))
        del sparse[m]
    plan = PeftPlan("LORA" if tokens else "SHIRA", tokens=tokens)
    shapes = {m: tuple(model.get_submodule(m).weight.shape) for m in sparse}
    if plan.tuner == "SHIRA":
        plan.rank, fits = _shira_rank(model, sparse, shapes)
    else:
        plan.lora_ranks = {m: _lora_rank(sparse[m][0], shapes[m]) for m in sparse}
        fits = {m for m, r in plan.lora_ranks.items() if r * sum(shapes[m]) < math.prod(shapes[m])}
        plan.lora_ranks = {m: r for m, r in plan.lora_ranks.items() if m in fits}
    dense.update(m for m in sparse if m not in fits)
    plan.sparse = {m: sparse[m] for m in sparse if m in fits}
    plan.dense = sorted(dense)
    if not plan.sparse:
        plan.carrier = _carrier(model, shared, set(plan.dense), set(tokens))
        plan.rank = plan.rank or 1
    return plan


def export_peft(
    delta: SparseDelta | str | os.PathLike,
    output: str | os.PathLike,
    model: nn.Module | str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write `delta` as a peft adapter folder `output` that `PeftModel.from_pretrained(base,
    output)` loads; returns `PeftPlan.summary()` plus the folder's bytes.

    delta: a SparseDelta or a delta folder / hub id. model: the base model (not changed), a
    folder or hub id to load it from (`unmask.store.loading.load_base_model`), or None for the
    base the delta records. The folder is built next to `output` and renamed into place, so
    `output` is never half-written; an existing `output` is replaced only when it is empty or a
    peft adapter folder. Raises DeltaError when the delta does not fit the model or peft cannot
    represent a tensor, ValueError for an `output` in the way; needs peft.
    """
    try:
        import peft
    except ImportError as err:
        raise ValueError("exporting to peft needs peft: pip install peft") from err
    from unmask.store.loading import load_base_model

    if not isinstance(delta, SparseDelta):
        delta = SparseDelta.from_pretrained(delta)
    if isinstance(model, nn.Module):
        name = getattr(model, "name_or_path", None) or delta.metadata.get("base_model")
    else:
        name = model if model is not None else delta.metadata.get("base_model")
        model = load_base_model(model, delta)
    output = Path(output)
    _check_output(output)
    plan = plan_export(delta, model)
    trained = delta.apply_(copy.deepcopy(model))  # checks the base; the values to store
    adapted = peft.get_peft_model(copy.deepcopy(model), _config(peft, plan, model, name))
    _fill(adapted, plan, trained, model)
    del trained
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{secrets.token_hex(8)}.tmp")
    tmp.mkdir()  # the mode a new folder gets (mkdtemp's would be private, 0700)
    try:
        adapted.save_pretrained(str(tmp))
        for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (tmp / file).is_file():
                raise OSError(f"peft did not write {file} into {tmp}; check the free space")
        _replace_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    return {**plan.summary(), "bytes": size}


# ------------------------------------------------------------------ the mapping


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that several modules hold (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, count in seen.items() if count > 1}


def _changed_rows(delta: SparseDelta, name: str) -> list[int]:
    """Rows of a 2-D tensor that hold an entry of the delta (all rows if it is replaced)."""
    rows, cols = delta.shapes[name]
    if name in delta.replace:
        return list(range(rows))
    indices = delta.sparse[name][0].long()
    return [int(r) for r in torch.unique(indices // cols)]


def _shira_rank(
    model: nn.Module, sparse: dict[str, tuple[Tensor, Tensor]], shapes: dict[str, tuple[int, int]]
) -> tuple[int, set[str]]:
    """(r, the layers SHiRA holds at r): the r that makes the folder smallest, where a layer
    SHiRA cannot hold (more entries than r·(in + out), or r·(in + out) above its size) is
    stored whole."""
    need, cap, whole = {}, {}, {}
    for m, (indices, _) in sparse.items():
        unit = sum(shapes[m])
        need[m] = max(1, math.ceil(indices.numel() / unit))
        cap[m] = math.prod(shapes[m]) // unit
        module = model.get_submodule(m)
        whole[m] = sum(p.numel() * p.element_size() for p in module.parameters())

    def cost(r: int) -> int:
        return sum(
            SHIRA_ENTRY_BYTES * r * sum(shapes[m]) if need[m] <= r <= cap[m] else whole[m]
            for m in sparse
        )

    options = sorted({r for r in need.values()} | {1})
    rank = min(options, key=lambda r: (cost(r), r))
    return rank, {m for m in sparse if need[m] <= rank <= cap[m]}


def _lora_rank(indices: Tensor, shape: tuple[int, int]) -> int:
    """The exact factorisation's rank: the fewer of the distinct rows and columns changed."""
    indices = indices.long()
    rows, cols = torch.unique(indices // shape[1]), torch.unique(indices % shape[1])
    return max(1, min(rows.numel(), cols.numel()))


def _carrier(model: nn.Module, shared: set[int], dense: set[str], tokens: set[str]) -> str:
    """A Linear layer outside `dense` and `tokens` to hold the all-zero adapter peft requires."""
    for name, module in model.named_modules():
        inside = any(name == d or name.startswith(f"{d}.") for d in dense | tokens)
        if (
            name
            and isinstance(module, nn.Linear)
            and not inside
            and id(module.weight) not in shared
            and module.in_features * module.out_features >= module.in_features + module.out_features
        ):
            return name
    raise DeltaError(
        "peft needs at least one adapted nn.Linear layer, and this model has none outside the "
        "modules the delta changes; it cannot be exported to peft"
    )


def _config(peft: Any, plan: PeftPlan, model: nn.Module, name: Any) -> Any:
    targets = sorted(plan.sparse) or [plan.carrier]
    common = dict(
        target_modules=targets,
        modules_to_save=plan.dense or None,
        base_model_name_or_path=str(name) if name else None,
        inference_mode=True,
    )
    if plan.tuner == "SHIRA":
        return peft.ShiraConfig(r=plan.rank, **common)
    ranks = plan.lora_ranks or {plan.carrier: 1}
    return peft.LoraConfig(
        r=1,
        lora_alpha=1,
        rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks),  # alpha = r: scale 1, so B·A is added unscaled
        lora_dropout=0.0,
        trainable_token_indices=dict(plan.tokens),
        **common,
    )


@torch.no_grad()
def _fill(adapted: nn.Module, plan: PeftPlan, trained: nn.Module, base: nn.Module) -> None:
    """Write the delta into the freshly built peft model `adapted` (see the module doc)."""
    inner = adapted.base_model.model
    for m, (indices, values) in plan.sparse.items():
        layer = inner.get_submodule(m)
        weight = base.get_submodule(m).weight
        if plan.tuner == "SHIRA":
            _fill_shira(layer, indices.long(), values, weight, plan.rank)
        else:
            _fill_lora(layer, indices.long(), values, weight, plan.lora_ranks[m])
    if plan.carrier is not None:  # the all-zero adapter: adds nothing
        layer, weight = inner.get_submodule(plan.carrier), base.get_submodule(plan.carrier).weight
        none = torch.zeros(0, dtype=torch.long)
        if plan.tuner == "SHIRA":
            _fill_shira(layer, none, none.float(), weight, plan.rank)
        else:
            layer.lora_B[ADAPTER].weight.zero_()
    for m, rows in plan.tokens.items():
        adapter = inner.get_submodule(m).token_adapter
        weight = trained.get_submodule(m).weight
        adapter.trainable_tokens_delta[ADAPTER].copy_(weight[torch.tensor(rows)])
    for m in plan.dense:
        copy_module = inner.get_submodule(m).modules_to_save[ADAPTER]
        copy_module.load_state_dict(trained.get_submodule(m).state_dict())


def _fill_shira(layer: nn.Module, indices: Tensor, values: Tensor, weight: Tensor, r: int) -> None:
    """SHiRA's values and (row, col) indices: the delta's entries plus zero-valued padding up to
    r·(in + out) entries, at the first positions the delta does not change, ascending."""
    count = r * sum(weight.shape)
    free = torch.ones(weight.numel(), dtype=torch.bool)
    free[indices] = False
    padding = free.nonzero().flatten()[: count - indices.numel()]
    flat = torch.cat([indices, padding])
    stored = torch.cat([values.to(torch.float32), torch.zeros(padding.numel())])
    order = flat.argsort()
    flat, stored = flat[order], stored[order]
    cols = weight.shape[1]
    shira = layer.shira_weight[ADAPTER]
    shira.copy_(stored.to(dtype=shira.dtype))
    layer.shira_indices[ADAPTER] = torch.stack([flat // cols, flat % cols]).to(
        dtype=torch.int, device=shira.device
    )


def _fill_lora(layer: nn.Module, indices: Tensor, values: Tensor, weight: Tensor, r: int) -> None:
    """B·A = the delta's change D exactly: one-hot A rows on D's columns (or one-hot B columns
    on D's rows, whichever is fewer), the other factor holding D's columns (rows)."""
    out_features, in_features = weight.shape
    change = torch.zeros(weight.numel(), dtype=torch.float32)
    change[indices] = values.to(torch.float32)
    change = change.view(out_features, in_features)
    rows, cols = torch.unique(indices // in_features), torch.unique(indices % in_features)
    a, b = torch.zeros(r, in_features), torch.zeros(out_features, r)
    if cols.numel() <= rows.numel():
        a[torch.arange(cols.numel()), cols] = 1.0
        b[:, : cols.numel()] = change[:, cols]
    else:
        b[rows, torch.arange(rows.numel())] = 1.0
        a[: rows.numel()] = change[rows]
    lora_a, lora_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    lora_a.copy_(a.to(lora_a.dtype))
    lora_b.copy_(b.to(lora_b.dtype))


def _refusal(tensors: list[str]) -> str:
    more = f"; and {len(tensors) - 10} more" if len(tensors) > 10 else ""
    listed = "; ".join(tensors[:10]) + more
    peft_model = any(t.startswith("base_model.model.") for t in tensors)
    hint = (
        " This is a delta of a peft model's own adapter weights (ID3 on LoRA): apply it to that "
        "peft model (same base, config and seed) and save it with peft's save_pretrained."
        if peft_model
        else ""
    )
    return (
        f"peft cannot represent {len(tensors)} tensor(s) of this delta: {listed}.{hint} Train "
        "an exportable delta by limiting the candidates to Linear weights: "
        "SelectiveOptimizer(model, ..., **unmask.peft_exportable(model)), or apply the delta "
        "with unmask (unmask.load / unmask merge) instead"
    )


# ------------------------------------------------------------------ the folder


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} exists and is not a folder; give a new path")
    if output.is_dir():
        extra = [f.name for f in output.iterdir() if f.name not in ADAPTER_FILES]
        if extra:
            raise ValueError(
                f"--output {output} is a folder holding other files ({sorted(extra)[:3]}); "
                "give a new or empty folder (an earlier peft export there is replaced)"
            )


def _replace_folder(new: Path, output: Path) -> None:
    """Rename the finished folder `new` to `output`, replacing an old export there."""
    if not output.exists():
        os.replace(new, output)
        return
    old = output.with_name(f".{output.name}.old.{os.getpid()}")
    os.replace(output, old)
    try:
        os.replace(new, output)
    except BaseException:
        os.replace(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)
