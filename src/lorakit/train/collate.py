"""Batching that does not compute padding: length-grouped batches and packing, deterministic and resumable.

Three modes (``BatchPlan(mode=...)`` + ``Collator(mode=...)``):

- ``pad``: random batches padded to ``max_length`` -- the plain loop, kept as the reference;
- ``group``: length-grouped batches (shuffle, sort by length inside mega-batches of ``mega_batches``
  batches, shuffle the batch order; the scheme of HF ``LengthGroupedSampler``), each padded only to its
  own longest row (dynamic padding);
- ``pack``: several examples per row (best-fit decreasing bin packing inside mega-batches), with
  ``position_ids`` restarting at 0 for each example and no 2D attention mask. Transformers 5 detects packed
  sequences from such position ids and keeps attention inside each example (``masking_utils.
  find_packed_sequence_indices``; eager, sdpa and flash-attention alike) -- **only when no KV cache is
  built, so call the model with use_cache=False** (or set ``model.config.use_cache = False``); in train
  mode with the default config it silently attends across examples. With ``pack_attention="block"`` the
  collator instead passes a 4D block-diagonal causal mask ``[B, 1, L, L]`` (bool, True = may attend),
  which works whatever the cache setting but only with sdpa attention (eager adds a mask, so a bool one
  is wrong there). ``check_packing(model)`` verifies the isolation on the actual model in a few ms; call it
  once before training with packing. Rows of similar fill are batched together (then the batch order is
  shuffled) so little padding is left. The first label of every packed example is set to -100 so that
  no example is trained to predict the next one's first token. Logits of a packed row equal each example
  run alone (tests/train/test_data_collate.py).

A plan is a pure function of (lengths, seed, epoch): ``batches(epoch)`` lists the global batches, each a
list of rows, each row a tuple of example indices (one index unless packing), so a trainer can resume at
``(epoch, batch index)`` by slicing. ``rank_batches`` gives rank ``r`` of ``world_size`` a contiguous,
disjoint slice of the rows of every global batch (``batch_size`` is the global number of rows).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import Any

import torch

from lorakit.train.data import DataError

MODES = ("pad", "group", "pack")
PACK_ATTENTION = ("position_ids", "block")
IGNORE_INDEX = -100

Row = tuple[int, ...]
Batch = list[Row]


def _pack_rows(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[Row]:
    """Best-fit decreasing bin packing of ``indices`` into rows of at most ``capacity`` tokens."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row id)
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise DataError(f"example {i} has {n} tokens, more than the packing capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            remaining, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (remaining - n, r))
    return [tuple(r) for r in rows]


class BatchPlan:
    """Which examples go in which batch, per epoch; deterministic given (seed, epoch).

    Args:
        lengths: token length of every example (``EncodedDataset.lengths``).
        batch_size: rows per global batch (per-device batch x world size).
        mode: "pad", "group" or "pack" (module docstring).
        max_length: the row capacity when packing (and the pad length for "pad"); default: longest example.
        seed: base seed; epoch ``e`` shuffles with ``seed * 1_000_003 + e``.
        shuffle: False keeps file order (evaluation); grouping and packing still apply.
        drop_last: drop a final batch with fewer than ``batch_size`` rows.
        mega_batches: batches per sorting / packing window (bigger: less padding, less randomness).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        mode: str = "group",
        max_length: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        mega_batches: int = 50,
    ) -> None:
        if mode not in MODES:
            raise DataError(f"batching mode={mode!r} is not supported; expected one of {list(MODES)}")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size!r} must be at least 1")
        if not lengths:
            raise DataError("cannot batch an empty dataset")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.mode = mode
        self.max_length = int(max_length) if max_length is not None else max(self.lengths)
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.mega_batches = max(1, mega_batches)
        self._cache: dict[int, list[Batch]] = {}

    def _rng(self, epoch: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + epoch)

    def _rows(self, epoch: int, rng: random.Random) -> list[Row]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        window = self.batch_size * self.mega_batches
        if self.mode == "pad":
            return [(i,) for i in order]
        if self.mode == "group":
            rows: list[Row] = []
            for s in range(0, len(order), window):
                chunk = sorted(order[s : s + window], key=lambda i: -self.lengths[i])  # stable
                rows += [(i,) for i in chunk]
            return rows
        packed: list[Row] = []
        tokens_per_window = window * self.max_length
        s = 0
        while s < len(order):  # windows of about `window` full rows' worth of tokens
            e, total = s, 0
            while e < len(order) and total < tokens_per_window:
                total += self.lengths[order[e]]
                e += 1
            rows_w = _pack_rows(order[s:e], self.lengths, self.max_length)
            # Rows of similar fill side by side, so a batch pads little (batch order is shuffled later).
            packed += sorted(rows_w, key=lambda r: -sum(self.lengths[i] for i in r))
            s = e
        return packed

    def batches(self, epoch: int = 0) -> list[Batch]:
        """The global batches of ``epoch``: lists of rows, each row a tuple of example indices."""
        if epoch not in self._cache:
            rng = self._rng(epoch)
            rows = self._rows(epoch, rng)
            out = [rows[s : s + self.batch_size] for s in range(0, len(rows), self.batch_size)]
            if self.drop_last and out and len(out[-1]) < self.batch_size:
                out.pop()
            if self.mode != "pad" and self.shuffle:
                rng.shuffle(out)
            self._cache = {epoch: out}
        return self._cache[epoch]

    def __len__(self) -> int:
        """Batches per epoch (epoch 0; packing can vary by a row or so between epochs)."""
        return len(self.batches(0))

    @staticmethod
    def shard(batch: Batch, rank: int, world_size: int) -> Batch:
        """Rank ``rank``'s contiguous slice of a global batch's rows (sizes differ by at most one)."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        q, r = divmod(len(batch), world_size)
        start = rank * q + min(rank, r)
        return batch[start : start + q + (rank < r)]

    def rank_batches(self, epoch: int = 0, rank: int = 0, world_size: int = 1) -> list[Batch]:
        """Rank ``rank``'s batches of ``epoch``; a global batch with fewer rows than ranks is dropped."""
        return [self.shard(b, rank, world_size) for b in self.batches(epoch) if len(b) >= world_size]

    def real_tokens(self, batch: Batch) -> int:
        """Non-padding tokens in a batch (what tokens/s should count)."""
        return sum(self.lengths[i] for row in batch for i in row)


def block_causal_mask(segment_lengths: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """``[B, 1, L, L]`` bool mask: token q may attend to k iff same segment and k <= q (True = attend).

    Padding after the last segment is its own segment (it attends only to itself and earlier padding).
    """
    seg = torch.full((len(segment_lengths), length), -1, dtype=torch.long)
    for b, lens in enumerate(segment_lengths):
        pos = 0
        for s, n in enumerate(lens):
            seg[b, pos : pos + n] = s
            pos += n
        seg[b, pos:] = len(lens)
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (same & causal)[:, None]


class Collator:
    """Turns rows of examples into model inputs (tensors).

    Args:
        pad_token_id: id written into padding (``lorakit.models.tokenizer.pad_id``); pads are masked.
        mode: "pad" (to ``max_length``), "group" (to the batch's longest row) or "pack".
        max_length: pad length for "pad".
        task: "sft" (labels are token lists) or "classification" (labels are class ids).
        pack_attention: "position_ids" (transformers' packed-sequence detection; call the model with
            use_cache=False) or "block" (an explicit 4D block-diagonal causal mask).
        pad_to_multiple_of: round the padded length up (e.g. 8 for tensor cores).
    Input: a list of rows, each a list of example dicts (what ``EncodedDataset[row_tuple]`` returns), or a
    flat list of example dicts (one per row).
    Output keys: input_ids, labels, and attention_mask (pad/group), token_type_ids (when the examples have
    them), position_ids (pack), attention_mask 4D (pack with "block").
    """

    def __init__(
        self,
        pad_token_id: int,
        mode: str = "group",
        max_length: int | None = None,
        task: str = "sft",
        pack_attention: str = "position_ids",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise DataError(f"batching mode={mode!r} is not supported; expected one of {list(MODES)}")
        if pack_attention not in PACK_ATTENTION:
            raise DataError(
                f"pack_attention={pack_attention!r} is not supported; expected one of {list(PACK_ATTENTION)}"
            )
        if mode == "pad" and max_length is None:
            raise DataError("mode='pad' pads to max_length; give max_length")
        if mode == "pack" and task != "sft":
            raise DataError("packing is for causal-LM SFT; use mode='group' for classification")
        self.pad_token_id = pad_token_id
        self.mode = mode
        self.max_length = max_length
        self.task = task
        self.pack_attention = pack_attention
        self.pad_to_multiple_of = pad_to_multiple_of

    def _target_length(self, longest: int) -> int:
        n = max(longest, self.max_length or 0) if self.mode == "pad" else longest
        m = self.pad_to_multiple_of
        return -(-n // m) * m if m else n

    def __call__(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        rows = [r if isinstance(r, (list, tuple)) else [r] for r in rows]
        if not rows:
            raise DataError("cannot collate an empty batch")
        if self.mode == "pack":
            return self._pack(rows)
        if any(len(r) != 1 for r in rows):
            raise DataError(f"mode={self.mode!r} takes one example per row; use mode='pack' for packed rows")
        exs = [r[0] for r in rows]
        length = self._target_length(max(len(e["input_ids"]) for e in exs))
        bsz = len(exs)
        input_ids = torch.full((bsz, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((bsz, length), dtype=torch.long)
        has_types = "token_type_ids" in exs[0]
        types = torch.zeros((bsz, length), dtype=torch.long)
        labels = torch.full((bsz, length), IGNORE_INDEX, dtype=torch.long)
        for b, ex in enumerate(exs):
            n = len(ex["input_ids"])
            input_ids[b, :n] = torch.tensor(ex["input_ids"])
            attention[b, :n] = 1
            if has_types:
                types[b, :n] = torch.tensor(ex["token_type_ids"])
            if self.task == "sft":
                labels[b, :n] = torch.tensor(ex["labels"])
        out = {"input_ids": input_ids, "attention_mask": attention}
        if has_types:
            out["token_type_ids"] = types
        out["labels"] = labels if self.task == "sft" else torch.tensor([int(e["labels"]) for e in exs])
        return out

    def _pack(self, rows: list[list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        seg_lens = [[len(e["input_ids"]) for e in row] for row in rows]
        length = self._target_length(max(sum(s) for s in seg_lens))
        bsz = len(rows)
        input_ids = torch.full((bsz, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((bsz, length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((bsz, length), dtype=torch.long)
        for b, row in enumerate(rows):
            pos = 0
            for ex in row:
                n = len(ex["input_ids"])
                input_ids[b, pos : pos + n] = torch.tensor(ex["input_ids"])
                labels[b, pos : pos + n] = torch.tensor(ex["labels"])
                labels[b, pos] = (
                    IGNORE_INDEX  # never predict this example's first token from the previous one
                )
                position_ids[b, pos : pos + n] = torch.arange(n)
                pos += n
            # Padding continues the last example's positions: causal attention keeps real tokens from
            # seeing it, and it starts no new segment.
            last = len(row[-1]["input_ids"])
            position_ids[b, pos:] = torch.arange(last, last + length - pos)
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.pack_attention == "block":
            out["attention_mask"] = block_causal_mask(seg_lens, length)
        return out


def make_loader(
    dataset: Any,
    plan: BatchPlan,
    collator: Collator,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over rank ``rank``'s batches of ``epoch``, starting at batch ``start_batch`` (for resume).

    ``dataset[row]`` must return the row's examples (``EncodedDataset`` does for a tuple index).
    """
    batches = plan.rank_batches(epoch, rank, world_size)[start_batch:]
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[[tuple(r) for r in b] for b in batches],
        collate_fn=collator,
        num_workers=num_workers,
        persistent_workers=False,
    )


def check_packing(model: torch.nn.Module, pack_attention: str = "position_ids", vocab: int = 256) -> float:
    """Check that ``model`` keeps attention inside packed examples; returns the max logit difference.

    Runs two short random examples packed in one row and each alone (eval mode, no grad, use_cache=False)
    and compares the logits. Raises DataError when they differ beyond the dtype's tolerance, naming the
    fix (group batching, or the other ``pack_attention``).
    """
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    exs = [
        {"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist(), "labels": [0] * n} for n in (6, 5)
    ]
    batch = Collator(0, "pack", pack_attention=pack_attention)([exs])
    batch.pop("labels")
    batch = {k: v.to(param.device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**batch, use_cache=False).logits[0].float()
            alone = torch.cat(
                [model(input_ids=torch.tensor([e["input_ids"]], device=param.device)).logits[0] for e in exs]
            ).float()
    finally:
        model.train(was_training)
    diff = (packed - alone).abs().max().item()
    tol = 1e-4 if param.dtype == torch.float32 else 5e-2
    if not diff <= tol * max(1.0, alone.abs().max().item()):
        raise DataError(
            f"packing with pack_attention={pack_attention!r} does not isolate examples in "
            f"{type(model).__name__} (max logit difference {diff:.3g}); use batching mode 'group' "
            f"or pack_attention={'block' if pack_attention == 'position_ids' else 'position_ids'!r}"
        )
    return diff
