"""Batching: packed rows compute exactly what each example computes alone; plans are deterministic,
cover every example once, and shard disjointly across ranks."""

import random

import pytest
import torch

from lorakit.models import build_model
from lorakit.models.tokenizer import ByteTokenizer
from lorakit.train.collate import BatchPlan, Collator, block_causal_mask, check_packing, make_loader
from lorakit.train.data import DataError, read_records
from lorakit.train.tasks import encode_records

ALPACA = "/work/shared/datasets/alpaca_1k/alpaca_data_1k.json"


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2 :]  # a masked "prompt" half
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.fixture(scope="module")
def llama():
    return build_model("tiny-llama").eval()


@pytest.mark.parametrize("attention", ["position_ids", "block"])
def test_packed_logits_equal_each_example_alone(llama, attention):
    exs = _examples([9, 5, 3, 12, 6])
    rows = [exs[:3], exs[3:]]  # 17 and 18 tokens: row 0 gets one pad
    batch = Collator(256, "pack", pack_attention=attention)(rows)
    assert batch["input_ids"].shape == (2, 18)
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = llama(**kwargs, use_cache=False).logits
        for b, row in enumerate(rows):
            pos = 0
            for ex in row:
                n = len(ex["input_ids"])
                alone = llama(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
                torch.testing.assert_close(packed[b, pos : pos + n], alone, atol=1e-5, rtol=0)
                pos += n


def test_packed_loss_equals_padded_loss(llama):
    exs = _examples([9, 5, 3, 12, 6], seed=1)
    packed = Collator(256, "pack")([exs[:3], exs[3:]])
    padded = Collator(256, "group")(exs)
    assert (packed["labels"] != -100).sum() == (padded["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        lp = llama(**packed, use_cache=False).loss
        lg = llama(**padded).loss
    torch.testing.assert_close(lp, lg, atol=1e-5, rtol=0)


def test_pack_labels_and_positions():
    exs = _examples([4, 3])
    b = Collator(256, "pack", pad_to_multiple_of=8)([exs])
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]  # the pad continues the last example
    assert b["labels"][0, 0] == -100 and b["labels"][0, 4] == -100 and b["labels"][0, 7] == -100
    assert b["input_ids"][0, 7] == 256


def test_block_mask_equation():
    m = block_causal_mask([[2, 1]], 4)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_pad_and_group_collate_classification():
    exs = [
        {"input_ids": [1, 2, 3], "labels": 1, "token_type_ids": [0, 0, 1]},
        {"input_ids": [4], "labels": 0, "token_type_ids": [0]},
    ]
    b = Collator(0, "group", task="classification")(exs)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]] and b["labels"].tolist() == [1, 0]
    assert Collator(0, "pad", max_length=6, task="classification")(exs)["input_ids"].shape == (2, 6)
    with pytest.raises(DataError, match="packing is for causal-LM"):
        Collator(0, "pack", task="classification")


def _flat(batches):
    return sorted(i for b in batches for row in b for i in row)


@pytest.mark.parametrize("mode", ["pad", "group", "pack"])
def test_plans_are_deterministic_and_cover_everything(mode):
    lengths = [random.Random(i).randint(1, 100) for i in range(503)]
    plan = BatchPlan(lengths, batch_size=8, mode=mode, max_length=128, seed=7, mega_batches=4)
    again = BatchPlan(lengths, batch_size=8, mode=mode, max_length=128, seed=7, mega_batches=4)
    assert plan.batches(0) == again.batches(0) and plan.batches(1) == again.batches(1)
    assert plan.batches(0) != plan.batches(1)
    assert _flat(plan.batches(0)) == list(range(503)) == _flat(plan.batches(1))
    if mode == "pack":
        assert all(sum(lengths[i] for i in row) <= 128 for b in plan.batches(0) for row in b)
        assert len(plan) < 503 / 8 / 2  # ~2.5 examples per row at mean length ~50


def test_group_reduces_padding():
    lengths = [random.Random(i).randint(1, 200) for i in range(800)]

    def padded(mode):
        plan = BatchPlan(lengths, 8, mode, max_length=200, seed=0)
        return sum(len(b) * max(lengths[r[0]] for r in b) for b in plan.batches(0))

    assert padded("group") < 0.7 * padded("pad")


def test_shards_are_disjoint_contiguous_and_complete():
    lengths = list(range(1, 102))
    plan = BatchPlan(lengths, batch_size=6, mode="group", seed=1)
    for world in (1, 2, 3, 4):
        per_rank = [plan.rank_batches(0, r, world) for r in range(world)]
        for k, global_batch in enumerate(plan.batches(0)[: len(per_rank[0])]):
            parts = [per_rank[r][k] for r in range(world)]
            assert sum(parts, []) == global_batch  # contiguous slices in rank order
            assert all(len(p) >= 1 for p in parts)
    with pytest.raises(DataError, match="rank=2"):
        BatchPlan.shard([(0,)], 2, 2)


def test_make_loader_resumes_at_a_batch_on_real_data():
    ds = encode_records(read_records(ALPACA), ByteTokenizer(), "sft", max_length=512)
    plan = BatchPlan(ds.lengths, batch_size=4, mode="pack", max_length=512, seed=3)
    collator = Collator(256, "pack")
    full = list(make_loader(ds, plan, collator, epoch=2))
    resumed = list(make_loader(ds, plan, collator, epoch=2, start_batch=5))
    assert len(full) == len(plan.batches(2)) and len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    tokens = sum(plan.real_tokens(b) for b in plan.batches(2))
    assert tokens == sum(ds.lengths)
    assert tokens / sum(x["input_ids"].numel() for x in full) > 0.95  # packing wastes < 5% on padding


def test_check_packing_catches_a_model_that_leaks(llama):
    assert check_packing(llama) < 1e-5 and check_packing(llama, "block") < 1e-5
    from transformers import AutoModelForCausalLM

    from lorakit.models.builtin import builtin_config

    cfg = builtin_config("tiny-llama")
    cfg._attn_implementation = "eager"  # eager adds the mask: a bool block mask is wrong there
    eager = AutoModelForCausalLM.from_config(cfg).train()
    assert check_packing(eager) < 1e-5 and eager.training
    with pytest.raises(DataError, match="does not isolate examples"):
        check_packing(eager, "block")
