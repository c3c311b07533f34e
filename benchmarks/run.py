"""lorakit vs PEFT, same weights, same data, same settings, interleaved, each measurement in its own process.

    python -m benchmarks.run --suite cpu-small [--cases lora_qv,dora_qv] [--out benchmarks/results]

Per round, every (case, side) pair runs once in a fresh process, in alternating order (lorakit, PEFT,
lorakit, ...), so drift on a noisy machine hits both sides alike. Reported: median step time over all
timed steps of all rounds, tokens/s, peak RSS and the training working set (peak RSS minus RSS after
building the model), trainable parameters, the loss at step 1 on both sides (must agree: same
computation), and ratios lorakit/PEFT, lorakit/full FT and lorakit/no-adapter floor; the same ratio in
process CPU seconds (``cpu_time_vs_peft``: steadier than wall time on a shared machine). Inference: median
forward latency of the base, unmerged LoRA q,v and merged LoRA q,v. Decode (``decode``): 32 rows x 1 token,
eval, unmerged LoRA q,v vs PEFT and vs the plain base model timed alternately in the same process.
Writes ``<suite>.json`` and ``<suite>.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import fsdp_smoke
from benchmarks.suites import SUITES

TRAIN_CASES = ("lora_qv", "lora_all", "dora_qv", "qlora_qv", "adalora_qv", "lora_qv_bf16", "lora_qv_vocab",
               "qlora_qv_bf16")
REFERENCE_CASES = ("floor", "full")
# mfu: model-FLOPs utilisation of lorakit's bf16 step (benchmarks/bench_mfu.py); qlora_qv_compile: qlora_qv with
# ``training.compile: true``'s regional compilation, against qlora_qv/peft
LORAKIT_ONLY = ("mfu", "qlora_qv_compile")
FORWARD_CASES = ("infer", "decode")
SMOKE_CASES = (fsdp_smoke.CASE,)  # run once after the rounds, not timed: one-GPU FSDP (bf16, NF4), gpu suite only
DECODE_KEYS = ("decode_base_s", "decode_lora_s", "decode_base_cpu_s", "decode_lora_cpu_s")
# loss at step 1 must agree within this. None = not comparable: bitsandbytes' CPU 4-bit matmul computes in
# bf16 (its output differs from x @ W^T with its own dequantized W by ~5e-3 on llama-15m, while the
# dequantized weights equal lorakit's), and AdaLoRA's orthogonality term has another form in PEFT.
# The bf16 cases: lorakit's base is stored in bf16, PEFT's stays fp32 under the same autocast (each library's
# default), so the weights differ by one bf16 rounding: the losses agree to ~1e-3, not 1e-5.
LOSS_TOL = {"qlora_qv": None, "qlora_qv_bf16": None, "adalora_qv": None, "lora_qv_bf16": 1e-2, "lora_qv_vocab": 1e-2}


def _run(case: str, side: str, suite: str, timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    # OpenMP threads that sleep instead of spinning between parallel regions: on a shared machine spinning
    # threads steal each other's cores (3-5x slower steps, +-30% noise). Export OMP_WAIT_POLICY to override.
    # (not forced: on a quiet machine spinning is faster; export OMP_WAIT_POLICY=PASSIVE on a busy one)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", case, side, suite, out], cwd=root,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        return {"case": case, "side": side, "error": tail}
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    return res


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import lorakit
    from lorakit.train.precision import cpu_bf16_flags, cpuinfo

    return {"lorakit": lorakit.__version__, "peft": peft.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            # the CPU model and its bf16 flags: the figures depend on them (AMX or not)
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                       f"{cpuinfo('model name') or platform.processor() or 'unknown CPU'}, bf16 flags: "
                       f"{','.join(cpu_bf16_flags()) or 'none'}"}


def run_suite(suite_name: str, cases: list[str], timeout: float = 600.0) -> dict[str, Any]:
    suite = SUITES[suite_name]
    jobs: list[tuple[str, str]] = []
    for case in cases:
        if case in REFERENCE_CASES:
            jobs.append((case, "torch"))
        elif case in LORAKIT_ONLY:
            jobs.append((case, "lorakit"))
        elif case in (*TRAIN_CASES, *FORWARD_CASES):
            jobs += [(case, "lorakit"), (case, "peft")]
        elif case in SMOKE_CASES:
            continue
        else:
            raise SystemExit(
                f"unknown case {case!r}; cases: "
                f"{[*REFERENCE_CASES, *TRAIN_CASES, *LORAKIT_ONLY, *FORWARD_CASES, *SMOKE_CASES]}"
            )
    raw: dict[tuple[str, str], list[dict[str, Any]]] = {j: [] for j in jobs}
    start = time.perf_counter()
    for rnd in range(suite.rounds):
        order = jobs if rnd % 2 == 0 else [(c, s) for c, s in jobs[::-1]]  # ABAB..., then BABA...
        for case, side in order:
            res = _run(case, side, suite_name, timeout)
            raw[(case, side)].append(res)
            status = res.get("error", "ok").splitlines()[-1]
            print(f"[{time.perf_counter() - start:6.0f}s] round {rnd + 1} {case:<11} {side:<8} {status}", flush=True)
    if fsdp_smoke.CASE in cases:
        res = smoke_row(suite_name, timeout)
        raw[(fsdp_smoke.CASE, "lorakit")] = [res]
        status = res.get("skipped") or res.get("error", "ok").splitlines()[-1]
        print(f"[{time.perf_counter() - start:6.0f}s] {fsdp_smoke.CASE} lorakit  {status}", flush=True)
    return summarize(suite_name, raw, time.perf_counter() - start)


def smoke_row(suite_name: str, timeout: float) -> dict[str, Any]:
    """The one-GPU FSDP smoke run (benchmarks/fsdp_smoke.py) on the suite's model; skipped, with the reason,
    off CUDA."""
    suite = SUITES[suite_name]
    if suite.device != "cuda":
        return {"case": fsdp_smoke.CASE, "side": "lorakit",
                "skipped": f"suite {suite_name!r} runs on {suite.device}; the FSDP smoke run is for --suite gpu"}
    return fsdp_smoke.run_smoke(suite.model, timeout=timeout)


def default_cases(suite_name: str) -> list[str]:
    """Every case; the FSDP smoke run only for a CUDA suite."""
    smoke = list(SMOKE_CASES) if SUITES[suite_name].device == "cuda" else []
    return [*REFERENCE_CASES, *TRAIN_CASES, *LORAKIT_ONLY, *FORWARD_CASES, *smoke]


def summarize(suite_name: str, raw: dict[tuple[str, str], list[dict[str, Any]]], wall: float) -> dict[str, Any]:
    suite = SUITES[suite_name]
    tokens = suite.batch * suite.seq
    rows: dict[str, dict[str, Any]] = {}
    for (case, side), results in raw.items():
        ok = [r for r in results if "error" not in r]
        key = f"{case}/{side}"
        if case in SMOKE_CASES:
            rows[key] = results[0]
            continue
        if not ok:
            rows[key] = {"case": case, "side": side, "error": results[0].get("error") if results else "not run"}
            continue
        row: dict[str, Any] = {"case": case, "side": side}
        if case in FORWARD_CASES:
            keys = DECODE_KEYS if case == "decode" else ("infer_base_s", "infer_unmerged_s", "infer_merged_s")
            for k in keys:
                row[k] = statistics.median(r[k] for r in ok)
        elif case == "mfu":
            for k in ("step_s", "mfu", "rate_gflops", "achieved_gflops"):
                row[k] = statistics.median(r[k] for r in ok)
            row["gflop"] = ok[0]["gflop"]
        else:
            times = [t for r in ok for t in r["step_times"]]
            cpu = [t for r in ok for t in r.get("cpu_times", [])]
            row.update(step_s=statistics.median(times), best_step_s=min(times),
                       cpu_s=statistics.median(cpu) if cpu else None,
                       tokens_per_s=tokens / statistics.median(times), loss_step1=ok[0]["loss_step1"],
                       trainable=ok[0]["trainable"], peak_rss_mib=max(r["peak_rss_mib"] for r in ok),
                       train_mem_mib=statistics.median(r["train_mem_mib"] for r in ok))
            if "cuda_peak_mib" in ok[0]:
                row["cuda_peak_mib"] = max(r["cuda_peak_mib"] for r in ok)
        rows[key] = row
    ratios: dict[str, Any] = {}
    floor = rows.get("floor/torch", {}).get("step_s")
    full = rows.get("full/torch", {}).get("step_s")
    for case in TRAIN_CASES:
        a, b = rows.get(f"{case}/lorakit", {}), rows.get(f"{case}/peft", {})
        if "step_s" not in a:
            continue
        r: dict[str, Any] = {}
        if "step_s" in b:
            r["time_vs_peft"] = a["step_s"] / b["step_s"]
            r["train_mem_vs_peft"] = a["train_mem_mib"] / max(b["train_mem_mib"], 1e-9)
            r["peak_rss_vs_peft"] = a["peak_rss_mib"] / b["peak_rss_mib"]
            if a.get("cpu_s") and b.get("cpu_s"):
                r["cpu_time_vs_peft"] = a["cpu_s"] / b["cpu_s"]
            tol = LOSS_TOL.get(case, 1e-5)
            diff = abs(a["loss_step1"] - b["loss_step1"])
            r["loss_step1_diff"] = diff
            r["same_computation"] = None if tol is None else bool(diff <= tol)
        if floor:
            r["time_vs_floor"] = a["step_s"] / floor
        if full:
            r["time_vs_full"] = a["step_s"] / full
        ratios[case] = r
    qc, qp = rows.get("qlora_qv_compile/lorakit", {}), rows.get("qlora_qv/peft", {})
    if "step_s" in qc and "step_s" in qp:
        ratios["qlora_qv_compile"] = {"time_vs_peft": qc["step_s"] / qp["step_s"],
                                      "cpu_time_vs_peft": qc["cpu_s"] / qp["cpu_s"],
                                      "loss_step1_diff": abs(qc["loss_step1"] - qp["loss_step1"])}
    if "step_s" in rows.get("dora_qv/lorakit", {}) and "step_s" in rows.get("lora_qv/lorakit", {}):
        ratios["dora_over_lora_lorakit"] = rows["dora_qv/lorakit"]["step_s"] / rows["lora_qv/lorakit"]["step_s"]
    if "step_s" in rows.get("dora_qv/peft", {}) and "step_s" in rows.get("lora_qv/peft", {}):
        ratios["dora_over_lora_peft"] = rows["dora_qv/peft"]["step_s"] / rows["lora_qv/peft"]["step_s"]
    if "step_s" in rows.get("lora_qv/peft", {}) and full:
        ratios["peft_lora_vs_full"] = rows["lora_qv/peft"]["step_s"] / full
    inf = rows.get("infer/lorakit", {})
    if "infer_base_s" in inf:
        ratios["infer_merged_vs_base"] = inf["infer_merged_s"] / inf["infer_base_s"]
        ratios["infer_unmerged_vs_base"] = inf["infer_unmerged_s"] / inf["infer_base_s"]
    dk, dp = rows.get("decode/lorakit", {}), rows.get("decode/peft", {})
    if "decode_lora_s" in dk:
        d: dict[str, Any] = {"vs_base": dk["decode_lora_s"] / dk["decode_base_s"],
                             "cpu_vs_base": dk["decode_lora_cpu_s"] / dk["decode_base_cpu_s"]}
        if "decode_lora_s" in dp:
            d.update(vs_peft=dk["decode_lora_s"] / dp["decode_lora_s"],
                     cpu_vs_peft=dk["decode_lora_cpu_s"] / dp["decode_lora_cpu_s"],
                     peft_vs_base=dp["decode_lora_s"] / dp["decode_base_s"],
                     # each side over the plain base it timed alternately in its own process: the same base
                     # model both sides, so the ratio of ratios cancels what differs between the processes
                     vs_peft_same_base=(dk["decode_lora_s"] / dk["decode_base_s"])
                     / (dp["decode_lora_s"] / dp["decode_base_s"]),
                     cpu_vs_peft_same_base=(dk["decode_lora_cpu_s"] / dk["decode_base_cpu_s"])
                     / (dp["decode_lora_cpu_s"] / dp["decode_base_cpu_s"]))
        ratios["decode"] = d
    return {"suite": suite_name, "settings": suite.__dict__ | {"dtype": str(suite.dtype),
                                                                  "compute_dtype": str(suite.compute_dtype)},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": wall, "versions": _versions(),
            "rows": rows, "ratios": ratios}


def _f(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    v = res["versions"]
    lines = [f"## Benchmark `{res['suite']}` — {res['date']}", "",
             f"Model {s['model']}, batch {s['batch']} x {s['seq']} tokens, {s['threads']} threads, r=8, alpha 16, "
             f"dropout 0, AdamW; {s['rounds']} interleaved rounds x {s['steps']} timed steps, each run in its own "
             f"process. Versions: lorakit {v['lorakit']}, PEFT {v['peft']}, torch {v['torch']}, transformers "
             f"{v['transformers']}; {v['machine']}. Wall time {res['wall_s']:.0f} s.", "",
             "| case | side | median step s | CPU s | tokens/s | trainable | peak RSS MiB | train mem MiB | loss@1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"].values():
        if row["case"] in SMOKE_CASES:
            continue
        if "error" in row:
            lines.append(f"| {row['case']} | {row['side']} | error: {row['error'].splitlines()[-1][:80]} ||||||||")
        elif row["case"] == "mfu":
            continue
        elif "step_s" in row:
            lines.append(f"| {row['case']} | {row['side']} | {_f(row['step_s'])} | {_f(row.get('cpu_s'))} | "
                         f"{_f(row['tokens_per_s'], '.0f')} | "
                         f"{row['trainable']:,} | {_f(row['peak_rss_mib'], '.0f')} | {_f(row['train_mem_mib'], '.0f')} | "
                         f"{_f(row['loss_step1'], '.6f')} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for case, r in res["ratios"].items():
        if isinstance(r, dict):
            for k, val in r.items():
                lines.append(f"| {case}: {k} | {val if isinstance(val, bool) or val is None else format(val, '.3g')} |")
        else:
            lines.append(f"| {case} | {r:.3f} |")
    mfu = res["rows"].get("mfu/lorakit", {})
    if "mfu" in mfu:
        lines += ["", "Model-FLOPs utilisation (benchmarks/bench_mfu.py): (forward + input-gradient backward + adapter "
                  "matmul FLOPs, attention over the full T x T) / step time / this machine's bf16 matmul rate on the "
                  "model's linear shapes, measured in the same process.", "",
                  "| case | GFLOP/step | median step s | achieved GFLOP/s | bf16 matmul GFLOP/s | MFU |", "|---|---|---|---|---|---|",
                  f"| lora_qv bf16 (lorakit) | {mfu['gflop']:.1f} | {mfu['step_s']:.3f} | {mfu['achieved_gflops']:.0f} | "
                  f"{mfu['rate_gflops']:.0f} | {100 * mfu['mfu']:.1f}% |"]
    decode = [row for row in res["rows"].values() if row["case"] == "decode" and "decode_lora_s" in row]
    if decode:
        lines += ["", "| decode, 32 rows x 1 token (median ms) | plain base | LoRA q,v unmerged | base CPU ms | LoRA CPU ms |",
                  "|---|---|---|---|---|"]
        for row in decode:
            lines.append(f"| {row['side']} | {row['decode_base_s'] * 1e3:.2f} | {row['decode_lora_s'] * 1e3:.2f} | "
                         f"{row['decode_base_cpu_s'] * 1e3:.2f} | {row['decode_lora_cpu_s'] * 1e3:.2f} |")
    smoke = res["rows"].get(f"{fsdp_smoke.CASE}/lorakit")
    if smoke:
        lines += ["", fsdp_smoke.markdown_line(smoke)]
    infer = [row for row in res["rows"].values() if row["case"] == "infer" and "infer_base_s" in row]
    if infer:
        lines += ["", "| inference (forward, median s) | base | LoRA unmerged | LoRA merged |", "|---|---|---|---|"]
        for row in infer:
            lines.append(f"| {row['side']} | {_f(row['infer_base_s'], '.4f')} | {_f(row['infer_unmerged_s'], '.4f')} | "
                         f"{_f(row['infer_merged_s'], '.4f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="cpu-small", choices=sorted(SUITES))
    ap.add_argument("--cases", default=None, help="comma-separated (default: all; fsdp_smoke on --suite gpu)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    cases = default_cases(args.suite) if args.cases is None else [c for c in args.cases.split(",") if c]
    res = run_suite(args.suite, cases)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.suite}.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = markdown(res)
    with open(os.path.join(args.out, f"{args.suite}.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
