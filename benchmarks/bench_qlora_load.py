"""Peak memory of quantize-on-load (lorakit.load_quantized) vs the model's full-precision size.

    python benchmarks/bench_qlora_load.py --preset 1b --dir /tmp/lk_llama_1b [--compare-hf]

Writes a random-init Llama of the chosen size as bf16 safetensors shards (tensor by tensor, so the
writer never holds the model either), then in a fresh process per loader measures
peak RSS = ru_maxrss after loading - RSS before loading (same process, after a warm-up load of a
tiny model so imports and lazy initialisation are in the baseline), load time,
and the model's stored bytes (lorakit.quant.storage_bytes); the peak includes one short forward pass
(batch 1, 8 tokens) so lazily mapped weights are really read. --compare-hf also loads the same
directory with transformers' from_pretrained(dtype=bfloat16) for the full-precision reference.
Figures depend on this machine (CPU only); the shard size bounds the file pages touched at once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PRESETS = {
    # TinyLlama-1.1B shapes
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=22, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
    "50m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def write_model(path: str, preset: str, shard_bytes: int) -> int:
    """Random N(0, 0.02) bf16 Llama weights as safetensors shards + index; returns the parameter count."""
    import torch
    import transformers
    from safetensors.torch import save_file

    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            return json.load(f)["metadata"]["total_parameters"]
    os.makedirs(path, exist_ok=True)
    cfg = transformers.LlamaConfig(**PRESETS[preset], tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(path)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(cfg)
    shapes = {n: p.shape for n, p in skeleton.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    shard, size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        shard[name] = t.to(torch.bfloat16)
        size += t.numel() * 2
        total += t.numel()
        if size >= shard_bytes:
            flush()
    flush()
    index = {"metadata": {"total_size": total * 2, "total_parameters": total}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return total


def worker(kind: str, path: str) -> None:
    import torch
    import transformers

    from lorakit.config import QuantConfig
    from lorakit.quant import bits_per_param, load_quantized, storage_bytes

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    # Warm up on a tiny model (imports, lazy inits) so the baseline holds everything but the weights.
    import tempfile

    from lorakit.models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        build_model("tiny-llama", seed=0).save_pretrained(tmp, safe_serialization=True)
        if kind == "lorakit":
            load_quantized(tmp, QuantConfig())
        else:
            transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
    base = _rss_kb()
    t0 = time.perf_counter()
    if kind == "lorakit":
        model = load_quantized(path, QuantConfig())
        bits = bits_per_param(model)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        bits = 16.0
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # touch every weight (transformers maps safetensors lazily)
        model(torch.zeros(1, 8, dtype=torch.long))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    out = dict(
        loader=kind,
        load_s=round(seconds, 1),
        peak_rss_mb=round((peak - base) / 1024, 1),
        model_bytes_mb=round(storage_bytes(model) / 2**20, 1),
        linear_bits_per_param=round(bits, 4),
    )
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--dir", default="/tmp/lorakit_bench_llama")
    ap.add_argument("--shard-mb", type=int, default=512)
    ap.add_argument("--compare-hf", action="store_true")
    ap.add_argument("--worker", choices=["lorakit", "hf"])
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.dir)
        return
    n = write_model(args.dir, args.preset, args.shard_mb * 2**20)
    print(
        f"# {args.preset}: {n / 1e9:.3f}B parameters; bf16 {n * 2 / 2**20:.0f} MiB, fp32 {n * 4 / 2**20:.0f} MiB"
    )
    for kind in ["lorakit"] + (["hf"] if args.compare_hf else []):
        cmd = [sys.executable, __file__, "--worker", kind, "--dir", args.dir]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode or not lines:
            print(f"{kind}: failed\n{res.stderr[-2000:]}")
            continue
        print(lines[-1])


if __name__ == "__main__":
    main()
