"""Memory, FLOP, time, serving and ROI formulas on hand-computed cases and published points."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from lorakit.planner.arch import Arch, PlanError, count_params, resolve_arch
from lorakit.planner.cost import (
    GIB,
    NF4_BITS,
    Setup,
    activation_bytes,
    adapted_matrices,
    flops_per_token,
    gather_bytes,
    layer_activation_bytes,
    memory,
    train_hours,
    trainable_params,
)
from lorakit.planner.gpus import get_gpu
from lorakit.planner.plan import plan
from lorakit.planner.roi import Roi, serving_cost_per_month, serving_gpus


def test_nf4_double_quant_bits():
    assert NF4_BITS[True] == pytest.approx(4.127, abs=5e-4)  # QLoRA: 0.127 bits/param of constants
    assert NF4_BITS[False] == 4.5


def test_7b_full_mixed_precision_adamw_is_16_bytes_per_param():
    arch = resolve_arch("7B")
    m = memory(arch, Setup(method="full", precision="bf16-mixed", optimizer="adamw"))
    states = m.weights + m.master_weights + m.gradients + m.optimizer_states
    assert states / count_params(arch).total == 16.0  # 2 + 2 + 4 + 4 + 4 (ZeRO, section 3.1)


def test_gpt3_lora_r4_wq_wv_checkpoint_is_about_35_mb():
    arch = resolve_arch("175B")
    p = plan("175B", tokens=1000, method="qlora", r=4, targets=["q_proj", "v_proj"], gpu="H200-141GB")
    lora = p.methods["lora"]
    assert not lora.fits  # a 350 GB 16-bit base on every GPU (DDP); the paper's setting needs sharding
    assert lora.trainable_params == 96 * 2 * 4 * (12288 + 12288)  # r(d + k) on Wq, Wv of 96 layers
    assert lora.checkpoint_bytes == pytest.approx(35e6, rel=0.10)  # LoRA paper: 35 MB
    assert 2 * count_params(arch).total == pytest.approx(350e9, rel=0.01)  # vs 350 GB for the full model


def test_65b_qlora_fits_one_48gb_gpu():
    # QLoRA's setting: r=64 on all linear layers, bf16 adapters, gradient checkpointing, batch 1 x 512
    p = plan(
        "65B",
        tokens=10**6,
        method="qlora",
        r=64,
        targets="all-linear",
        gpu="A6000-48GB",
        micro_batch=1,
        seq_len=512,
    )
    q = p.methods["qlora"]
    assert q.gpus == 1 and 30 * GIB < q.memory.total < 48 * GIB
    assert q.memory.weights == pytest.approx(
        33.4 * 1e9 * 1.075, rel=0.05
    )  # 65B x 4.127 bits + 16-bit embeddings
    assert p.methods["lora"].single_gpu_memory.total > 48 * GIB  # the 16-bit base alone is 121 GiB
    assert p.methods["full"].fits_on["A6000-48GB"] is None


def gpt_arch(**kw) -> Arch:
    base = dict(
        name="g",
        family="gpt",
        vocab=1000,
        hidden=64,
        intermediate=256,
        layers=2,
        heads=4,
        kv_heads=4,
        head_dim=16,
        max_positions=128,
        tied=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        dropout=0.1,
        attn_dropout=0.1,
    )
    base.update(kw)
    return Arch(**base)


def test_activation_tally_reproduces_korthikanti_34_plus_5as_over_h():
    # GPT layer, 16-bit activations, dropout, standard attention, everything trained: sbh(34 + 5as/h) bytes
    arch, s = gpt_arch(), 128
    setup = Setup(
        method="full",
        precision="bf16-mixed",
        attention="eager",
        seq_len=s,
        micro_batch=2,
        grad_checkpointing=False,
    )
    h, a = arch.hidden, arch.heads
    assert layer_activation_bytes(arch, setup, []) == h * (34 + 5 * a * s / h)


def test_frozen_base_saves_less_and_checkpointing_keeps_2sbh_per_layer():
    arch = resolve_arch("llama-15m")
    kw = dict(seq_len=256, micro_batch=8, precision="fp32", attention="sdpa")
    full = activation_bytes(arch, Setup(method="full", grad_checkpointing=False, **kw))[0]
    lora_setup = Setup(method="lora", grad_checkpointing=False, **kw)
    lora = activation_bytes(arch, lora_setup)[0]
    assert lora < full
    # hand count for one llama block with LoRA on q, v (fp32 = 4 bytes, per token): 2 RMSNorm inputs (h),
    # the q/v input (h), Q, K, V, attention output (4h), log-sum-exp (heads), gate/SiLU/up outputs (3i),
    # two adapter A outputs (r each)
    h, i, r = 512, 1376, 8
    per_token = 4 * (2 * h + h + 4 * h + 3 * i + 2 * r) + 4 * arch.heads
    layer0 = [x for x in adapted_matrices(arch, lora_setup) if x[0].layer == 0]
    assert layer_activation_bytes(arch, lora_setup, layer0) == per_token
    ckpt = Setup(method="lora", grad_checkpointing=True, **kw)
    tokens = 256 * 8
    tail = 4 * h + 2000 * (4 + 4)  # final norm input + logits + log-softmax (the model's own loss)
    assert activation_bytes(arch, replace(ckpt, loss="full"))[0] == tokens * (4 * 4 * h + per_token + tail)
    # lorakit train's chunked loss with the frozen head: the rows' gradient (h) per token, nothing per chunk
    assert activation_bytes(arch, ckpt)[0] == tokens * (4 * 4 * h + per_token + 4 * h + 4 * h)


def test_the_chunked_loss_term_matches_a_measured_step(monkeypatch):
    """What the planner counts for lorakit's chunked loss (frozen head: the fused path) is what a measured
    step adds: peak memory of
    forward + backward (profiled) minus the same step without the head and loss, at two batch sizes (the
    chunk term must not grow with the tokens); the full-logits term stays an upper bound of its own."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.planner import cost
    from lorakit.planner.arch import arch_from_config
    from lorakit.planner.calibrate import _profiled_peak_mb
    from lorakit.train import loss as train_loss

    assert train_loss.CHUNK_LOGITS == cost.CHUNK_LOGITS  # the planner plans the trainer's chunking
    assert train_loss.BLOCK_LOGITS == cost.BLOCK_LOGITS
    for v in (256, 30_522, 151_936, 1 << 23):
        assert cost.chunk_rows(v) == train_loss.default_chunk_rows(v)
        assert cost.block_rows(v) == train_loss.block_rows(v)
    vocab, chunk, seq = 8192, 64, 256
    monkeypatch.setattr(cost, "CHUNK_LOGITS", chunk * vocab)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # something before the head trains, as an adapter would
    task = train_loss.TaskLoss(model, "sft", chunk_rows=chunk)
    assert task.path == "chunked"
    arch = arch_from_config(config.to_dict())

    def peak(step) -> float:
        return _profiled_peak_mb(step) * 1e6

    measured = {}
    for batch in (2, 4):  # 512 and 1,024 tokens: 8 and 16 chunks of 64 rows
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        body = peak(lambda ids=ids: model.model(input_ids=ids).last_hidden_state.sum().backward())
        chunked = peak(lambda data=data: task(data)[0].backward()) - body
        full = peak(lambda data=data: train_loss.forward_loss(model, data, "sft")[0].backward()) - body
        setup = Setup(method="full", seq_len=seq, micro_batch=batch, precision="fp32", grad_checkpointing=False)
        plan_chunked = sum(cost.loss_activation_bytes(arch, setup, head_trained=False))  # the head is frozen
        plan_full = sum(cost.loss_activation_bytes(arch, replace(setup, loss="full")))
        assert abs(chunked - plan_chunked) <= 0.3 * plan_chunked, (batch, chunked, plan_chunked)
        tokens = batch * seq
        assert 2 * tokens * vocab * 4 < full <= plan_full, (batch, full, plan_full)
        measured[batch] = chunked
    # twice the tokens: the chunked term grows by the target rows only, far less than one chunk's logits
    assert measured[4] - measured[2] < 0.5 * chunk * vocab * 4, measured


def test_flops_per_token_hand_computed():
    arch = resolve_arch("tiny-llama")  # h 64, i 172, 2 layers, 4 heads, kv 2 (head 16), vocab 260
    n_mm = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 172) + 64 * 260
    s = 128
    attn = 4 * 2 * s * 64 * 0.5  # QK^T and AV, causal kernel skips half
    n_ad = 2 * 8 * ((64 + 64) + (64 + 32))  # r=8 on q (64->64) and v (64->32), 2 layers
    full = Setup(method="full", seq_len=s, grad_checkpointing=False)
    lora = Setup(method="lora", seq_len=s, grad_checkpointing=False)
    assert flops_per_token(arch, full) == 3 * (2 * n_mm + attn)  # the "6N" rule plus attention
    assert flops_per_token(arch, lora) == 4 * n_mm + 3 * attn + 6 * n_ad  # about 4N
    ck = Setup(method="lora", seq_len=s, grad_checkpointing=True)
    assert flops_per_token(arch, ck) == 4 * n_mm + 3 * attn + 6 * n_ad + (2 * n_mm + attn + 2 * n_ad)
    assert flops_per_token(
        arch, Setup(method="full", seq_len=s, attention="eager", grad_checkpointing=False)
    ) == 3 * (2 * n_mm + 2 * attn)


def test_time_and_cost():
    gpu = get_gpu("A100-80GB")
    assert train_hours(1e18, gpu, 2, 0.5) == pytest.approx(1e18 / (2 * 312e12 * 0.5) / 3600)
    with pytest.raises(PlanError, match="mfu"):
        train_hours(1e18, gpu, 1, 0.0)
    p = plan("tiny-llama", tokens=10**6, gpu="A100-80GB", mfu=0.5, epochs=2)
    sel = p.selected
    assert sel.total_flops == pytest.approx(sel.flops_per_token * 2e6)
    assert sel.hours == pytest.approx(sel.total_flops / (312e12 * 0.5) / 3600)
    assert sel.training_cost == pytest.approx(sel.hours * 1 * 1.80)


def test_roi_and_payback_arithmetic():
    r = Roi(training_cost=1000, serving_cost_per_month=100, benefit_per_month=600, horizon_months=12)
    assert r.total_cost == 1000 + 12 * 100 and r.total_benefit == 7200
    assert r.roi == pytest.approx((7200 - 2200) / 2200)
    assert r.payback_months == pytest.approx(1000 / (600 - 100))
    never = Roi(training_cost=1000, serving_cost_per_month=100, benefit_per_month=50, horizon_months=12)
    assert never.payback_months is None and never.roi < 0
    for bad in (dict(training_cost=-1), dict(horizon_months=0), dict(benefit_per_month=math.nan)):
        kw = (
            dict(training_cost=1.0, serving_cost_per_month=0.0, benefit_per_month=1.0, horizon_months=1.0)
            | bad
        )
        with pytest.raises(PlanError):
            Roi(**kw)


def test_serving_merged_vs_shared_base():
    arch, gpu = resolve_arch("7B"), get_gpu("A100-80GB")
    base = serving_gpus(arch, gpu) * gpu.price_per_hour * 730
    lora = Setup(method="lora")
    assert serving_cost_per_month(arch, lora, gpu) == base  # merged: its own copy of the base
    shared = serving_cost_per_month(arch, lora, gpu, adapters_per_base=4)
    n_ad = trainable_params(arch, lora)
    assert shared == pytest.approx(base * (1 + n_ad / count_params(arch).matmul) / 4)
    assert serving_cost_per_month(arch, Setup(method="full"), gpu, adapters_per_base=4) == base
    with pytest.raises(PlanError, match="adapters_per_base"):
        serving_cost_per_month(arch, lora, gpu, adapters_per_base=0)


def test_sharding_divides_states_not_activations():
    # Memory.sharded (ZeRO-3 / FSDP) is not offered while lorakit train cannot shard; kept for that issue
    arch = resolve_arch("7B")
    s = Setup(method="full")
    one = memory(arch, s, None, 1)
    four = one.sharded(4, gather_bytes(arch, s))
    assert four.optimizer_states == one.optimizer_states / 4 and four.activations == one.activations
    assert four.weights == one.weights / 4 + gather_bytes(arch, s)
