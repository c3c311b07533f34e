"""The low-rank term of a mixed-adapter batch: one adapted layer, a different LoRA adapter per row.

For each adapted layer the LoRA adapters it holds are stacked once (and cached until they change)::

    A_stack: (S, k, R)   A_s^T, ranks zero-padded to the largest R   (embedding: (S, V, R), A_s^T)
    B_stack: (S, R, d)   scaling_s * B_s^T (rsLoRA's alpha/sqrt(r) folded in the same way)

with one extra all-zero slot for the plain base. Zero padding is exact: padded rank columns contribute 0.
A batch is then computed in *bins* of n rows, bin g using slot ``slot[g]``, and the low-rank term of every
row comes from two batched matmuls::

    t = bmm(x_bins, A_stack[slot])      x_bins: (G, n*s, k) -> (G, n*s, R)
    y = bmm(t, B_stack[slot])           -> (G, n*s, d), read back into row order

With one bin per row, rows in place (n = 1), this is the per-row gather form of Punica's SGMV / S-LoRA (Chen
et al. 2023, https://arxiv.org/abs/2310.18547; Sheng et al. 2023, https://arxiv.org/abs/2311.03285): best for
long rows. With the rows grouped by adapter (n = the largest group, padded), the factors are read straight
from the stack, a view without any copy, and each matmul is a real matrix product instead of b tiny ones:
best at one token per row. ``plan_bins`` picks the layout from a cost estimate; ``bins_for`` remembers it.
An embedding gathers rows, never tables: t = A_stack[slot, token id], read from the flat (S*V, R) table.

The cache cannot serve a deleted or changed adapter. It is checked against the layer's generation (bumped by
every add, remove, merge and unmerge, never reused); it holds the adapters and tensors it was built from, so
their identity is never confused with a new object at a reused address (and a layer's adapters are compared
by identity when a batch is laid out); it compares the tensors' ``_version`` (in-place updates such as
optimizer steps), their ``data_ptr`` (``.to()``, ``.data =``) and each scaling on every routed forward, for
the slots that forward reads; and a parameter registered anywhere (a tensor swapped into an adapter by
``setattr`` or ``load_state_dict(assign=True)``) makes every layout re-check. Only changes made behind
autograd's back (``tensor.data.copy_``) are not seen.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.lora import LoraEmbedding, LoraLinear
from lorakit.surgery.layer import AdaptedLayer

# layer -> its stacks; outside the layer so that deepcopy and pickle of a model never carry them
_STACKS: weakref.WeakKeyDictionary[AdaptedLayer, Stacks] = weakref.WeakKeyDictionary()
_registrations = 0  # parameters registered on any module since import


def _count_registration(module: nn.Module, name: str, param: Any) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


def registrations() -> int:
    """How many parameters were registered on any module so far: a swapped adapter tensor is one."""
    return _registrations


def supported(adapter: nn.Module) -> bool:
    """Adapters the stacks can express: LoRA and rsLoRA on linear and embedding layers."""
    # exact types: DoRA subclasses LoraLinear but rescales the output, which the stacks cannot express
    return type(adapter) in (LoraLinear, LoraEmbedding)


def _factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a LoRA adapter: (r, k) and (d, r) for linear; (r, V) and (d, r) for embedding.

    Read from the module dicts (what ``adapter.lora_A.weight`` resolves to, without nn.Module's
    ``__getattr__`` fallback): this runs for every adapter of a layer on every routed forward."""
    if type(adapter) is LoraEmbedding:
        params = adapter._parameters
        return params["lora_embedding_A"], params["lora_embedding_B"]
    modules = adapter._modules
    return modules["lora_A"]._parameters["weight"], modules["lora_B"]._parameters["weight"]


def _source(adapter: nn.Module) -> tuple:
    a, b = _factors(adapter)
    return (adapter, a, b, a._version, b._version, a.data_ptr(), b.data_ptr(), adapter.scaling)


def unchanged(sources: Sequence[tuple]) -> bool:
    """No tensor of these slots was modified in place or moved, and no scaling changed (cheap: this runs for
    the slots a forward reads on every routed forward)."""
    for adapter, a, b, va, vb, pa, pb, scaling in sources:
        if a._version != va or b._version != vb or a.data_ptr() != pa or b.data_ptr() != pb:
            return False
        if adapter.scaling != scaling:
            return False
    return True


@dataclass(eq=False)
class Stacks:
    generation: int  # the layer's generation when built
    names: list[str]  # slot -> adapter name; slot len(names) is the zero (base) slot
    slots: dict[str, int]
    sources: list[tuple]  # per slot: the adapter, A, B, their versions and addresses, the scaling
    a: torch.Tensor  # linear: (S, k, R); embedding: (S, V, R)
    b: torch.Tensor  # (S, R, d), scaling folded in
    embedding: bool
    count: int  # adapters the layer held (supported or not)
    layouts: dict = field(default_factory=dict)  # (row slots, tokens) -> Bins, see ``bins_for``

    @property
    def zero(self) -> int:
        return len(self.names)

    def fresh(self, layer: AdaptedLayer) -> bool:
        """True while ``layer`` holds the very adapters and tensors the stacks were built from, unchanged."""
        if layer.generation != self.generation:
            return False
        adapters = layer.adapters._modules
        if len(adapters) != self.count:
            return False
        for name, (adapter, a, b, *_) in zip(self.names, self.sources):
            if adapters.get(name) is not adapter:
                return False
            now_a, now_b = _factors(adapter)
            if now_a is not a or now_b is not b:
                return False
        return unchanged(self.sources)


def layer_stacks(layer: AdaptedLayer) -> Stacks:
    """The (cached, fully checked) stacked, rank-padded A and scaled B of the LoRA adapters ``layer`` holds."""
    cached = _STACKS.get(layer)
    if cached is not None and cached.fresh(layer):
        return cached
    with torch.inference_mode(False), torch.no_grad():  # normal tensors: usable outside inference mode too
        stacks = _build(layer)
    _STACKS[layer] = stacks
    return stacks


def _build(layer: AdaptedLayer) -> Stacks:
    names = [n for n, ad in layer.adapters.items() if supported(ad)]
    adapters = [layer.adapters[n] for n in names]
    a_list = [_factors(ad)[0].t() for ad in adapters]  # (k, r), or (V, r) for an embedding
    b_list = [_factors(ad)[1].t() * ad.scaling for ad in adapters]  # (r, d)
    p0 = next(next(iter(layer.adapters.values())).parameters())
    k, d = layer.access.in_features, layer.access.out_features
    rank = max([t.shape[1] for t in a_list], default=1)
    a = torch.zeros(len(names) + 1, k, rank, dtype=p0.dtype, device=p0.device)
    b = torch.zeros(len(names) + 1, rank, d, dtype=p0.dtype, device=p0.device)
    for i, (ta, tb) in enumerate(zip(a_list, b_list)):
        a[i, :, : ta.shape[1]] = ta
        b[i, : tb.shape[0]] = tb
    return Stacks(
        generation=layer.generation,
        names=names,
        slots={n: i for i, n in enumerate(names)},
        sources=[_source(ad) for ad in adapters],
        a=a,
        b=b,
        embedding=layer.access.kind == "embedding",
        count=len(layer.adapters),
    )


@dataclass(eq=False)
class Bins:
    """Rows regrouped into ``count`` bins of ``n`` rows; bin g uses stack slot ``slot[g]``.

    ``src`` (count*n,): the row read at each bin position (padding repeats a row of the bin; its result is
    never read); ``pos`` (b,): the bin position of each row; ``None`` for either means the identity.
    ``a``/``b``: the bins' factors when they are exactly a run of stack slots (a view, no copy), else None.
    """

    n: int
    count: int
    slot: torch.Tensor  # (count,) long
    src: torch.Tensor | None
    pos: torch.Tensor | None
    a: torch.Tensor | None
    b: torch.Tensor | None
    offset: torch.Tensor | None  # embedding: (count, 1) first row of each bin's table in the flat stack


# Relative costs of a layout (CPU, measured with benchmarks/bench_mixed.py at 1 and 128 tokens per row): one
# token through one bin position (the two small matmuls), moving one token's activations into bin order and
# back, and the fixed cost of a bin whose factors are a view of the stack or must be copied out of it.
_TOKEN, _PERMUTE, _VIEW_BIN, _COPY_BIN = 1, 3, 4, 16


def _grouped(row_slots: Sequence[int], n: int) -> tuple[list[int], list[int], list[int]]:
    """Rows grouped by slot (slots ascending), in bins of n rows padded by repeating a row of the bin:
    (slot per bin, row read at each bin position, bin position of each row)."""
    groups: dict[int, list[int]] = {}
    for row, slot in enumerate(row_slots):
        groups.setdefault(slot, []).append(row)
    slot, src, pos = [], [], [0] * len(row_slots)
    for s in sorted(groups):
        rows = groups[s]
        for start in range(0, len(rows), n):
            chunk = rows[start : start + n]
            for j, row in enumerate(chunk):
                pos[row] = len(src) + j
            src.extend(chunk + [chunk[0]] * (n - len(chunk)))
            slot.append(s)
    return slot, src, pos


def plan_bins(stacks: Stacks, row_slots: Sequence[int], tokens: int) -> Bins:
    """The cheapest layout for rows with these stack slots, ``tokens`` tokens each: one bin per row with the
    rows in place (best for long rows), or the rows grouped by adapter into bins of n (best for one token per
    row: a few real matmuls on views of the stack instead of one tiny product per row)."""
    batch = len(row_slots)
    identity = list(range(batch))
    counts: dict[int, int] = {}
    for slot in row_slots:
        counts[slot] = counts.get(slot, 0) + 1
    biggest = max(counts.values())
    layouts = [(list(row_slots), identity, identity, 1)]  # one bin per row, rows in place
    sizes = {biggest, *counts.values(), *(2**i for i in range(biggest.bit_length()))}
    layouts += [(*_grouped(row_slots, n), n) for n in sorted(sizes)]

    def is_run(slot: list[int]) -> bool:  # bins are stack slots lo, lo+1, ...: their factors are a view
        return slot == list(range(slot[0], slot[0] + len(slot)))

    def cost(layout: tuple) -> int:
        slot, src, _, n = layout
        moved = 0 if src == identity else batch * tokens * _PERMUTE
        return len(slot) * (n * tokens * _TOKEN + (_VIEW_BIN if is_run(slot) else _COPY_BIN)) + moved

    slot, src, pos, n = min(layouts, key=cost)
    device = stacks.a.device
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    view = slice(slot[0], slot[-1] + 1) if is_run(slot) else None
    slots = as_long(slot)
    return Bins(
        n=n,
        count=len(slot),
        slot=slots,
        src=None if src == identity else as_long(src),
        pos=None if pos == identity and len(src) == batch else as_long(pos),
        a=stacks.a[view] if view is not None and not stacks.embedding else None,
        b=stacks.b[view] if view is not None else None,
        offset=(slots * stacks.a.shape[1])[:, None] if stacks.embedding else None,
    )


_MAX_LAYOUTS = 16  # layouts kept per layer's stacks (row plans seen recently)


def bins_for(stacks: Stacks, row_slots: Sequence[int], tokens: int) -> Bins:
    """``plan_bins``, remembered with the stacks: each new ``adapter_rows`` block (a server batch, a
    ``generate`` call) with rows seen before reuses the layout and its index tensors."""
    key = (tuple(row_slots), tokens)
    bins = stacks.layouts.get(key)
    if bins is None:
        if len(stacks.layouts) >= _MAX_LAYOUTS:
            stacks.layouts.pop(next(iter(stacks.layouts)))
        with torch.inference_mode(False):  # the index tensors outlive the forward that made them
            bins = stacks.layouts[key] = plan_bins(stacks, row_slots, tokens)
    return bins


def add_low_rank(stacks: Stacks, bins: Bins, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` plus the low-rank term of each row's adapter; x: (b, s, k) activations or (b, s) token ids,
    out: the base output (b, s, d)."""
    batch, g, d = x.shape[0], bins.count, out.shape[-1]
    b_bins = bins.b if bins.b is not None else stacks.b.index_select(0, bins.slot)  # (G, R, d)
    if stacks.embedding:
        ids = x.reshape(batch, -1)
        if bins.src is not None:
            ids = ids.index_select(0, bins.src)
        table = stacks.a.view(-1, stacks.a.shape[-1])  # (S*V, R)
        t = F.embedding(ids.reshape(g, -1) + bins.offset, table)  # (G, n*s, R): rows, never tables
    else:
        xs = x.reshape(batch, -1, x.shape[-1])
        if bins.src is not None:
            xs = xs.index_select(0, bins.src)
        if xs.dtype != stacks.a.dtype:
            xs = xs.to(stacks.a.dtype)
        a_bins = bins.a if bins.a is not None else stacks.a.index_select(0, bins.slot)  # (G, k, R)
        t = torch.bmm(xs.reshape(g, -1, xs.shape[-1]), a_bins)  # (G, n*s, R)
    same = out.dtype == t.dtype
    if same and bins.src is None and bins.pos is None:  # rows already in bin order: one fused matmul-add
        return torch.baddbmm(out.reshape(g, -1, d), t, b_bins).view(out.shape)
    y = torch.bmm(t, b_bins).view(g * bins.n, -1, d)  # (G*n, s, d)
    if bins.pos is not None:  # (index_select + add: index_add is as exact but several times slower on CPU)
        y = y.index_select(0, bins.pos)
    return out + y.view(out.shape).to(out.dtype)
