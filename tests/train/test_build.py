"""build_run_model: the frozen base in bf16 when the precision is bf16 (``model.dtype: auto``), adapters fp32;
``training.compile`` compiles in place or warns and falls back to eager (issue 16 items 6, 7)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorakit.train.build import build_run_model, compiled_blocks, compiler_unavailable, maybe_compile
from lorakit.train.precision import resolve_precision

CPU = torch.device("cpu")
BF16 = resolve_precision("bf16", CPU, cpu_flags=("avx512_bf16",))
FP32 = resolve_precision("no", CPU)


def _cfg(tmp_path, **training):
    from train.test_trainer import run_config

    return run_config(tmp_path, **training)


def _dtypes(model: torch.nn.Module) -> tuple[set[torch.dtype], set[torch.dtype]]:
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    return frozen, trained


def test_bf16_precision_stores_the_frozen_base_in_bf16_and_adapters_in_fp32(tmp_path):
    frozen, trained = _dtypes(build_run_model(_cfg(tmp_path), 2, 256, BF16, CPU))
    assert frozen == {torch.bfloat16} and trained == {torch.float32}


def test_fp32_precision_or_an_explicit_dtype_keeps_the_base_as_asked(tmp_path):
    cfg = _cfg(tmp_path)
    assert _dtypes(build_run_model(cfg, 2, 256, FP32, CPU))[0] == {torch.float32}
    pinned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
    assert _dtypes(build_run_model(pinned, 2, 256, BF16, CPU))[0] == {torch.float32}


def test_bf16_base_computes_what_the_fp32_base_computes_under_autocast(tmp_path):
    """Reference: the same seeded model with an fp32 base under the same bf16 autocast (same values, the base
    rounded to bf16 once instead of at every matmul)."""
    cfg = _cfg(tmp_path)
    a = build_run_model(cfg, 2, 256, BF16, CPU)
    b = build_run_model(cfg, 2, 256, FP32, CPU)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la = a(input_ids=ids, labels=ids, use_cache=False).loss
        lb = b(input_ids=ids, labels=ids, use_cache=False).loss
    assert abs(float(la) - float(lb)) < 2e-2 * float(lb)


def test_compile_where_the_compiler_is_missing_warns_and_trains_eagerly(tmp_path, monkeypatch):
    import lorakit.train.build as build

    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert "C++ compiler" in (compiler_unavailable(CPU) or "")
    model = build_run_model(_cfg(tmp_path), 2, 256, FP32, CPU)
    with pytest.warns(UserWarning, match=r"training.compile=true: .*C\+\+ compiler.*eager"):
        assert maybe_compile(model, CPU) is False
    assert compiled_blocks(model) == "off"


def _sft_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt: completion-only loss, as the SFT encoder writes it
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_compile_true_compiles_what_the_training_step_runs(tmp_path, quant):
    """Defect: the SFT loss calls the model's body and head, never ``model(...)``, so a compiled
    ``model.__call__`` left every training step eager (only the logits probe was compiled, for nothing).
    Regional compilation compiles each decoder block in place; the probe compiles nothing; the step computes
    what the eager model computes -- on a 4-bit base too (traced, NF4 dequantizes by PyTorch ops, not
    bitsandbytes' op, whose CPU output shape disagrees with its registered fake tensor)."""
    from torch._dynamo.utils import counters

    from lorakit.config import QuantConfig
    from lorakit.train.loss import TaskLoss

    if compiler_unavailable(CPU):
        pytest.skip(compiler_unavailable(CPU))
    cfg = _cfg(tmp_path, compile=True)
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, dropout=0.0),
                              quant=QuantConfig(dtype=quant) if quant else None)
    torch._dynamo.reset()
    counters.clear()
    compiled = build_run_model(cfg, 2, 256, FP32, CPU)
    eager = build_run_model(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, compile=False)),
                            2, 256, FP32, CPU)
    assert compiled_blocks(compiled) == "LlamaDecoderLayer x2" and compiled_blocks(eager) == "off"
    loss_c, loss_e = TaskLoss(compiled, "sft"), TaskLoss(eager, "sft")
    assert loss_c.path == "chunked"
    assert counters["stats"]["unique_graphs"] == 0  # the probe ran eagerly
    got, _ = loss_c(_sft_batch())
    got.backward()
    assert counters["stats"]["unique_graphs"] >= 1  # the step ran compiled code
    want, _ = loss_e(_sft_batch())
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    for n, p in compiled.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _adamw_run(fused: bool | None, steps: int = 6) -> list[torch.Tensor]:
    """``steps`` AdamW updates of a few tensors (two groups, one with weight decay) from seeded gradients."""
    from lorakit.train.build import make_optimizer

    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((64, 32), (32, 8), (32,))]
    groups = [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]
    if fused is None:
        opt, impl = make_optimizer(groups, 1e-2, (0.9, 0.999), 1e-8)
        assert impl == "fused"
        assert opt.defaults["fused"] is True
    else:  # PyTorch's own per-tensor loop: the reference
        opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in ps]


def test_the_optimizer_is_fused_adamw_on_cpu_and_updates_as_the_reference_loop():
    fused, ref = _adamw_run(None), _adamw_run(False)
    moved = max(float((a - b).abs().max()) for a, b in zip(_adamw_run(False, steps=0), ref))
    assert moved > 1e-2  # the updates are not vanishingly small
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_sharded_parameters_keep_the_default_adamw():
    from lorakit.train.build import make_optimizer

    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt, impl = make_optimizer([{"params": [p], "weight_decay": 0.0}], 1e-3, (0.9, 0.999), 1e-8, sharded=True)
    assert impl == "default" and not opt.defaults.get("fused")
