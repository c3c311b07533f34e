"""lorakit's GGUF export checked by llama.cpp itself (llama-cpp-python: pip install "lorakit[llamacpp]").

    python benchmarks/check_llama_cpp.py [--model tiny-llama] [--steps 8] [--out benchmarks/results]

For a builtin Llama (random init, seeded) with a LoRA adapter that exercises every scale convention
(rsLoRA, rank_pattern, alpha_pattern, and LoRA on the embedding and on lm_head), written with
``lorakit save_adapter`` and exported with ``lorakit export --format gguf``, this compares on token-id
inputs (the builtin byte tokenizer's ids):

- llama.cpp with the base GGUF + the adapter GGUF (the adapter applied at run time),
- llama.cpp with the merged GGUF (``--merged``),
- lorakit's merged model (fp32, PyTorch) -- the reference;

logits of every position of a prompt, and the greedy continuation of ``--steps`` tokens. Pass when
max |logit difference| <= max(``TOL_ABS + TOL_REL * max |logit|``, 4 x lorakit's own fp32 error against
the same merged model in fp64) and the greedy tokens are identical. Also
reported: how far the base alone is from the adapted model (so an adapter that llama.cpp silently
dropped cannot pass). Then the vocabulary: a local Llama directory with a byte-level BPE tokenizer.json
(trained here with ``tokenizers``) is exported ``--merged``; llama.cpp's tokenization of a few texts
must equal the Hugging Face tokenizer's, and its logits on them lorakit's. Exit status 1 on a failure,
2 when llama_cpp is not installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

TOL_ABS, TOL_REL = 1e-4, 1e-5  # fp32 weights and KV cache on both sides; llama.cpp sums in another order
# f32 KV cache (llama.cpp's default is f16, which alone moves logits by ~1e-3 relative)
_LLAMA_ARGS = dict(n_ctx=128, n_batch=128, logits_all=True, n_threads=2, seed=0, verbose=False, type_k=0, type_v=0, flash_attn=False)
PROMPT = [257, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65]  # <s>Hello, world!\nA


def _adapter(model_name: str, folder: str, std: float):
    import lorakit as lk

    model = lk.build_model(model_name)
    cfg = lk.AdapterConfig(
        r=8, alpha=16, use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "embed_tokens", "lm_head"],
        rank_pattern={"v_proj": 4, "layers.1.mlp.down_proj": 12}, alpha_pattern={"layers.0.self_attn.q_proj": 5},
    )
    lk.inject(model, cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    lk.save_adapter(model, folder, base_model_name_or_path=model_name)
    return lk.unload(model, merge=True)


def _torch_run(model, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float().numpy()
        ids = list(prompt)
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return logits, ids[len(prompt):]


def _llama_run(llama_cpp, model_path: str, prompt: list[int], steps: int, lora: str | None = None):
    kwargs = dict(lora_path=lora) if lora else {}
    llm = llama_cpp.Llama(model_path=model_path, **_LLAMA_ARGS, **kwargs)
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)], dtype=np.float32)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    llm.close()
    return logits, out


TEXTS = ["hello world, the quick brown fox", "jumps over the lazy dog 123", "a fox's 42 dogs!\n  quick?"]


def _hf_llama_dir(path: str):
    """A local random-init Llama with a byte-level BPE tokenizer.json trained on TEXTS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from lorakit.models.builtin import builtin_config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS[:2] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    cfg = builtin_config("tiny-llama")
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 320, 0, 1, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return fast


def _check_hf_tokenizer(llama_cpp, tmp: str) -> dict:
    """llama.cpp's tokens and logits on a merged GGUF that carries an HF BPE tokenizer."""
    import lorakit as lk
    from lorakit.io.gguf_export import export_gguf

    base_dir, adapter_dir, out = (os.path.join(tmp, n) for n in ("hf_base", "hf_adapter", "hf_merged.gguf"))
    fast = _hf_llama_dir(base_dir)
    model = lk.build_model(base_dir)
    lk.inject(model, lk.AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    lk.save_adapter(model, adapter_dir, base_model_name_or_path=base_dir)
    export_gguf(adapter_dir, out, merged=True)
    merged = lk.unload(model, merge=True)
    llm = llama_cpp.Llama(model_path=out, **_LLAMA_ARGS)
    rows, ok = [], True
    for text in TEXTS:
        hf_ids = fast(text, add_special_tokens=False)["input_ids"]
        cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        llm.reset()
        llm.eval(hf_ids)
        cpp_logits = np.array(llm.scores[: len(hf_ids)], dtype=np.float32)
        with torch.no_grad():
            ref = merged(torch.tensor([hf_ids])).logits[0].float().numpy()
        diff = float(np.abs(cpp_logits - ref).max())
        same = cpp_ids == hf_ids
        ok &= same and diff <= TOL_ABS + TOL_REL * float(np.abs(ref).max())
        rows.append({"text": text, "hf_ids": hf_ids, "same_ids": same, "max_abs_logit_diff": diff})
    llm.close()
    return {"texts": rows, "pass": ok}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama", help="builtin Llama (tiny-llama, llama-15m)")
    ap.add_argument("--steps", type=int, default=8, help="greedy tokens to generate")
    ap.add_argument("--adapter-std", type=float, default=0.1, help="std of the random A and B entries")
    ap.add_argument("--out", default=None, help="directory for llama_cpp_<model>.json")
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print('llama_cpp is not installed: pip install "lorakit[llamacpp]"', file=sys.stderr)
        return 2
    import lorakit as lk
    from lorakit.io.gguf_export import export_gguf, export_merged_gguf
    from lorakit.io.gguf_vocab import byte_vocab

    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = os.path.join(tmp, "adapter")
        merged = _adapter(args.model, adapter_dir, args.adapter_std)
        paths = {k: os.path.join(tmp, f"{k}.gguf") for k in ("base", "adapter", "merged")}
        base = lk.build_model(args.model)
        export_merged_gguf(base, paths["base"], vocab=byte_vocab(base.config))
        export_gguf(adapter_dir, paths["adapter"])
        export_gguf(adapter_dir, paths["merged"], merged=True)
        t0 = time.perf_counter()
        ref_logits, ref_tokens = _torch_run(merged, PROMPT, args.steps)
        ref64, _ = _torch_run(copy.deepcopy(merged).double(), PROMPT, 0)
        base_logits, _ = _torch_run(lk.build_model(args.model), PROMPT, 0)
        runs = {
            "base.gguf + adapter.gguf": _llama_run(llama_cpp, paths["base"], PROMPT, args.steps, paths["adapter"]),
            "merged.gguf": _llama_run(llama_cpp, paths["merged"], PROMPT, args.steps),
        }
        tokenizer_report = _check_hf_tokenizer(llama_cpp, tmp)
        seconds = time.perf_counter() - t0
    scale = float(np.abs(ref_logits).max())
    fp32_error = float(np.abs(ref_logits - ref64).max())  # lorakit's own fp32 rounding, against fp64
    tol = max(TOL_ABS + TOL_REL * scale, 4 * fp32_error)
    report = {
        "model": args.model, "llama_cpp_python": llama_cpp.__version__, "prompt_tokens": len(PROMPT),
        "tolerance": f"max|dlogit| <= max({TOL_ABS} + {TOL_REL} * max|logit|, 4 * lorakit fp32-vs-fp64) = {tol:.2e}",
        "lorakit_fp32_vs_fp64_max_abs": fp32_error,
        "max_abs_logit": scale, "base_vs_adapted_max_abs": float(np.abs(base_logits - ref_logits).max()),
        "lorakit_greedy": ref_tokens, "seconds": round(seconds, 2), "runs": {},
    }
    ok = True
    for name, (logits, tokens) in runs.items():
        diff = float(np.abs(logits - ref_logits).max())
        diff64 = float(np.abs(logits - ref64).max())
        same = tokens == ref_tokens and bool((logits.argmax(-1) == ref_logits.argmax(-1)).all())
        passed = diff <= tol and same
        ok &= passed
        report["runs"][name] = {"max_abs_logit_diff": diff, "max_abs_diff_vs_fp64": diff64, "greedy": tokens, "argmax_all_positions_equal": same,
                                "pass": passed}
    report["hf_tokenizer"] = tokenizer_report
    ok &= tokenizer_report["pass"]
    print(json.dumps(report, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"llama_cpp_{args.model}.json"), "w") as f:
            json.dump(report, f, indent=2)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
