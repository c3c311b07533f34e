"""The SFT loss without wasted logits (lorakit.train.loss): equal, with every adapter gradient, to the
full-logits reference ``forward_loss`` on padded, packed and prompt-masked batches; no LM-head work on
ignored positions; no vocabulary-sized tensor kept for backward; the fallback for models whose logits are
not provably head(body(x))."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from helpers import randomize_adapter
from lorakit.models import build_model
from lorakit.train.collate import Collator
from lorakit.train.evaluate import evaluate
from lorakit.train.loss import TaskLoss, forward_loss, fusable_head, split_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _examples(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2 :]  # completion-only: a masked prompt half
        out.append({"input_ids": ids, "labels": labels})
    return out


LENGTHS = [9, 5, 3, 12, 6, 11]
BATCHES = {
    "pad": lambda exs: Collator(256, "pad", max_length=16)(exs),  # right padding beyond the longest row
    "group": lambda exs: Collator(256, "group")(exs),
    "pack": lambda exs: Collator(256, "pack")([exs[:3], exs[3:]]),
    "pack-block": lambda exs: Collator(256, "pack", pack_attention="block")([exs[:3], exs[3:]]),
}


def _adapted(name: str, targets, seed: int = 0) -> nn.Module:
    model = build_model(name, seed=seed)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, alpha=8, target_modules=targets))
    randomize_adapter(model, "default", seed + 1, scale=0.1)  # B != 0: every adapter tensor gets a gradient
    return model.train()


def _loss_and_grads(fn, model):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (gpt2) on both paths
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


QV = ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "name,targets,mode",
    [*[("tiny-llama", QV, m) for m in BATCHES],
     ("tiny-llama", "all-linear", "group"), ("tiny-llama", "all-linear", "pack"),
     ("tiny-llama", ["v_proj", "lm_head"], "pad"), ("tiny-llama", ["v_proj", "lm_head"], "pack"),  # adapted head
     ("tiny-gpt2", ["c_attn", "lm_head"], "pad"),  # gpt2: lm_head tied to the input embedding
     ("tiny-gpt2", ["c_attn"], "pack-block")],
)
def test_equals_full_logits_loss_and_every_adapter_gradient(name, targets, mode):
    model = _adapted(name, targets)
    batch = BATCHES[mode](_examples(LENGTHS))
    loss_fn = TaskLoss(model, "sft", chunk_rows=5)  # several chunks and a ragged last one
    assert loss_fn.path == "chunked", loss_fn.why
    ref, ref_g = _loss_and_grads(lambda: forward_loss(model, batch, "sft")[0], model)
    new, new_g = _loss_and_grads(lambda: loss_fn(batch)[0], model)
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-6)
    assert int(loss_fn(batch)[1]) == int((batch["labels"][:, 1:] != -100).sum())
    assert ref_g.keys() == new_g.keys() and len(ref_g) > 0
    for n in ref_g:
        assert ref_g[n].abs().max() > 0, n  # the comparison is not between zeros
        torch.testing.assert_close(new_g[n], ref_g[n], atol=1e-5, rtol=1e-5, msg=n)


def test_bf16_base_and_autocast_within_tolerance():
    """bf16 frozen base + bf16 autocast (the benchmark setting): same loss to 2e-3 relative and each
    adapter gradient to 2% of its norm, against the full-logits path under the same precision."""
    model = _adapted("tiny-llama", "all-linear")
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    batch = BATCHES["group"](_examples(LENGTHS))
    loss_fn = TaskLoss(model, "sft", chunk_rows=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_g = _loss_and_grads(lambda: forward_loss(model, batch, "sft")[0], model)
        new, new_g = _loss_and_grads(lambda: loss_fn(batch)[0], model)
    assert abs(float(new) - float(ref)) <= 2e-3 * abs(float(ref))
    for n in ref_g:
        assert float((new_g[n] - ref_g[n]).norm()) <= 2e-2 * float(ref_g[n].norm()), n


def test_head_runs_only_on_kept_rows_in_chunks_and_is_recomputed_in_backward():
    model = _adapted("tiny-llama", ["q_proj", "v_proj"])
    batch = BATCHES["group"](_examples(LENGTHS))
    n_kept = int((batch["labels"][:, 1:] != -100).sum())
    assert n_kept < batch["input_ids"].numel() / 2  # prompts and padding are most of the batch
    loss_fn = TaskLoss(model, "sft", chunk_rows=4)  # (its probe calls the head too)
    rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    loss, _ = loss_fn(batch)
    fwd = list(rows)
    loss.backward()
    hook.remove()
    assert sum(fwd) == n_kept and max(fwd) <= 4 and len(fwd) == -(-n_kept // 4)
    assert max(fwd) - min(fwd) <= 1  # equal chunks, no small remainder
    # backward recomputed every chunk's logits but the last one's, which it starts with
    assert rows[len(fwd):] and sum(rows[len(fwd):]) == n_kept - fwd[-1]


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return shapes


def test_nothing_vocabulary_sized_is_kept_for_backward():
    model = _adapted("tiny-llama", ["q_proj", "v_proj"])
    vocab = model.config.vocab_size
    batch = BATCHES["group"](_examples(LENGTHS))
    full = _saved_shapes(lambda: forward_loss(model, batch, "sft")[0])
    assert any(s[-1] == vocab for s in full)  # the reference keeps (rows, vocab) logits: the check can fail
    chunked = _saved_shapes(lambda: TaskLoss(model, "sft", chunk_rows=4)(batch)[0])
    # only the last chunk's (<= 4 rows) logits are kept (every other chunk is recomputed), and the head's
    # own (hidden, vocab) weight, which the full path keeps too
    head_weight = (model.config.hidden_size, vocab)
    logits = [s for s in chunked if s and s[-1] == vocab and s != head_weight]
    assert len(logits) <= 2 and all(s[0] <= 4 for s in logits), chunked


@pytest.mark.parametrize("block", [None, 2])
def test_a_frozen_head_takes_its_gradient_in_forward_and_keeps_nothing_vocabulary_sized(block, monkeypatch):
    """The fused path (frozen plain linear head): equal to the module path (chunks recomputed) in loss and
    every adapter gradient, several chunks and one, each in one row block or in blocks of 2 rows (ragged);
    autograd keeps no tensor with a vocabulary dimension."""
    from lorakit.train import loss as loss_mod

    model = _adapted("tiny-llama", QV)
    vocab = model.config.vocab_size
    if block is not None:
        monkeypatch.setattr(loss_mod, "BLOCK_LOGITS", block * vocab)
        assert loss_mod.block_rows(vocab) == block
    head = model.get_output_embeddings()
    assert fusable_head(head)
    batch = BATCHES["group"](_examples(LENGTHS))
    for chunk_rows in (3, 1000):
        fused = TaskLoss(model, "sft", chunk_rows=chunk_rows)
        new, new_g = _loss_and_grads(lambda fused=fused: fused(batch)[0], model)
        hook = head.register_forward_hook(lambda m, i, o: None)  # a hook: the module path, recomputing
        try:
            assert not fusable_head(head)
            ref, ref_g = _loss_and_grads(lambda fused=fused: fused(batch)[0], model)
        finally:
            hook.remove()
        torch.testing.assert_close(new, ref, rtol=1e-6, atol=1e-5)
        for n in ref_g:
            torch.testing.assert_close(new_g[n], ref_g[n], rtol=1e-5, atol=1e-6, msg=n)
    shapes = _saved_shapes(lambda: TaskLoss(model, "sft", chunk_rows=3)(batch)[0])
    assert not any(vocab in s for s in shapes), shapes
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        torch.testing.assert_close(TaskLoss(model, "sft", chunk_rows=3)(batch)[0], new, rtol=1e-6, atol=1e-5)


def test_no_targets_gives_zero_and_keeps_every_head_parameter_in_the_graph():
    model = _adapted("tiny-llama", ["v_proj", "lm_head"])
    batch = BATCHES["group"](_examples([4, 6]))
    batch["labels"][:] = -100
    loss, count = TaskLoss(model, "sft")(batch)
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(count) == 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and float(g.abs().max()) == 0.0 for g in grads)


def test_evaluate_uses_the_same_loss():
    model = _adapted("tiny-llama", ["q_proj", "v_proj"])
    exs = _examples(LENGTHS, seed=3)
    from lorakit.train.distributed import Dist

    d = Dist()
    got = evaluate(model, exs, Collator(256, "group"), "sft", 4, d)
    with torch.no_grad():
        total = sum(float(forward_loss(model, Collator(256, "group")(exs[s : s + 4]), "sft")[0]) for s in (0, 4))
    n = sum(sum(1 for lab in e["labels"][1:] if lab != -100) for e in exs)
    assert got["eval_loss"] == pytest.approx(total / n, rel=1e-6)
    assert model.training  # train mode restored


# --- the fallback: logits that are not plain head(body(x)) ----------------------------------------------
def _tiny_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    torch.manual_seed(0)
    return Gemma2ForCausalLM(cfg)


def test_softcapped_logits_fall_back_to_the_full_path():
    model = _tiny_gemma2()
    loss_fn = TaskLoss(model, "sft")
    assert loss_fn.path == "full" and "final_logit_softcapping" in loss_fn.why
    batch = BATCHES["group"](_examples(LENGTHS))
    ref, _ = forward_loss(model, batch, "sft")
    torch.testing.assert_close(loss_fn(batch)[0], ref, atol=0, rtol=0)


class _ScaledLlama(nn.Module):
    """A causal LM whose logits are 1.5 x head(body(x)) with nothing in its config saying so."""

    def __init__(self):
        super().__init__()
        self.inner = build_model("tiny-llama")
        self.config = self.inner.config

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits * 1.5
        return out


def test_the_probe_catches_an_unannounced_logit_transform():
    body, head, why = split_lm(_ScaledLlama())
    assert body is None and "differs" in why
    plain = build_model("tiny-llama").train()
    body, head, why = split_lm(plain)
    assert body is plain.model and head is plain.lm_head and plain.training and plain.model.layers[0].training


def test_hooks_on_the_model_forward_fall_back():
    model = build_model("tiny-llama")
    model.register_forward_pre_hook(lambda m, a: None)
    assert TaskLoss(model, "sft").path == "full"


def test_probe_leaves_the_global_rng_alone():
    model = build_model("tiny-llama")
    torch.manual_seed(5)
    TaskLoss(model, "sft")
    a = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(a, torch.rand(3))


def test_bad_chunk_rows():
    with pytest.raises(ValueError, match="chunk_rows"):
        TaskLoss(build_model("tiny-llama"), "sft", chunk_rows=0)


def test_an_fsdp_sharded_root_falls_back():
    """fully_shard swaps the root's class for an FSDPModule subclass; its head is gathered only in its forward."""
    from torch.distributed.fsdp import FSDPModule

    model = build_model("tiny-llama")
    model.__class__ = type("FSDPLlamaForCausalLM", (FSDPModule, type(model)), {})  # what fully_shard does
    loss_fn = TaskLoss(model, "sft")
    assert loss_fn.path == "full" and "FSDP" in loss_fn.why
