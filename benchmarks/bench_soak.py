"""Soak test of ``lorakit serve`` under a mixed, partly hostile load (a benchmark, not a timed test).

    python benchmarks/bench_soak.py [--requests 2000] [--adapters 16] [--max-loaded 8] [--concurrency 32]
                                    [--cancel-rate 0.1] [--bad-rate 0.1] [--warmup 100] [--seed 0]

Starts ``lorakit serve`` on the builtin tiny-llama as a subprocess on a free 127.0.0.1 port, with
``--adapters`` LoRA adapters (random non-zero weights, r = 2..6 on q_proj/v_proj, written to a temporary
directory; at most ``--max-loaded`` in memory, so the others reload from disk). After ``--warmup`` requests
(not counted), it sends ``--requests`` requests, ``--concurrency`` in flight, each drawn at random:
- bad (``--bad-rate``): unknown model, max_tokens past the context, a token id outside the vocabulary,
  truncated JSON, an unknown field, empty chat messages, a 1.1 MiB body: each must get a 4xx;
- cancelled (``--cancel-rate``): a stream closed after its first event, or a non-streaming request the
  client stops waiting for: the server must drop its generation;
- normal: completions (sometimes several prompts, sometimes token arrays) or chat, streaming or not,
  greedy or sampled, 1..16 new tokens, on a random adapter or the base.
Reports: statuses seen (the check is zero 5xx, from the client's side and in the server's /metrics),
client-side latency p50/p99 of the normal requests (nearest rank), the engine's cancelled count, the
engine idle at the end, and the server's resident memory (VmRSS from /proc) at start, after warm-up and
at the end (and after each quarter of the run): the goal is growth < 5% from after warm-up to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

import httpx
import torch

import lorakit
from lorakit.io import save_adapter
from lorakit.serving.metrics import percentile

BOS = 257


def write_adapters(root: str, n: int) -> dict[str, str]:
    model = lorakit.build_model("tiny-llama")
    gen = torch.Generator().manual_seed(0)
    dirs = {}
    for i in range(n):
        name = f"a{i}"
        lorakit.inject(
            model, lorakit.AdapterConfig(r=2 + i % 5, alpha=8, target_modules=["q_proj", "v_proj"]), name
        )
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        dirs[name] = save_adapter(model, os.path.join(root, name), name)
    return dirs


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_request(rng: random.Random, models: list[str]) -> tuple[str, dict | bytes]:
    kind = rng.choice(["model", "max_tokens", "token", "json", "field", "messages", "huge"])
    m = rng.choice(models)
    if kind == "model":
        return "/v1/completions", {"model": "no-such-adapter", "prompt": "x"}
    if kind == "max_tokens":
        return "/v1/completions", {"model": m, "prompt": "x", "max_tokens": 10**6}
    if kind == "token":
        return "/v1/completions", {"model": m, "prompt": [BOS, 10**5]}
    if kind == "json":
        return "/v1/completions", b'{"model": "' + m.encode() + b'", "prompt": '
    if kind == "field":
        return "/v1/completions", {"model": m, "prompt": "x", "temprature": 0.5}
    if kind == "messages":
        return "/v1/chat/completions", {"model": m, "messages": []}
    return "/v1/completions", b'{"model": "a0", "prompt": "' + b"z" * (1100 << 10) + b'"}'


def normal_request(rng: random.Random, models: list[str]) -> tuple[str, dict]:
    common = {
        "model": rng.choice(models),
        "max_tokens": rng.randint(1, 16),
        "temperature": rng.choice([0, 0, 0.7]),
        "stream": rng.random() < 0.3,
    }
    if rng.random() < 0.25:
        return "/v1/chat/completions", {
            **common,
            "messages": [{"role": "user", "content": f"hi {rng.randint(0, 999)}"}],
        }
    shape = rng.random()
    if shape < 0.15:
        prompt = [[BOS, *f"p{j}".encode()] for j in range(rng.randint(2, 4))]
    elif shape < 0.3:
        prompt = [BOS, *f"tokens {rng.randint(0, 999)}".encode()]
    else:
        prompt = f"request {rng.randint(0, 99999)}"
    return "/v1/completions", {**common, "prompt": prompt}


async def one(
    ac: httpx.AsyncClient, rng: random.Random, models: list[str], args
) -> tuple[str, int | str, float]:
    """(kind, status or outcome, seconds)."""
    roll = rng.random()
    start = time.perf_counter()
    if roll < args.bad_rate:
        path, body = bad_request(rng, models)
        kw = (
            {"content": body, "headers": {"content-type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        r = await ac.post(path, **kw)
        return "bad", r.status_code, time.perf_counter() - start
    if roll < args.bad_rate + args.cancel_rate:
        body = {
            "model": rng.choice(models),
            "prompt": f"cancel {rng.randint(0, 999)}",
            "max_tokens": 200,
            "temperature": 0,
        }
        if rng.random() < 0.5:
            async with ac.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
                outcome = "closed mid-stream" if r.status_code == 200 else r.status_code
                return "cancel", outcome, time.perf_counter() - start
        try:
            r = await ac.post("/v1/completions", json=body, timeout=rng.uniform(0.05, 0.3))
            return "cancel", r.status_code, time.perf_counter() - start  # finished before the client gave up
        except httpx.TimeoutException:
            return "cancel", "client gave up", time.perf_counter() - start
    path, body = normal_request(rng, models)
    if body["stream"]:
        async with ac.stream("POST", path, json=body) as r:
            lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
        ok = r.status_code == 200 and lines and lines[-1] == "data: [DONE]"
        if ok and any('"error"' in ln for ln in lines[:-1]):
            return "normal", "error event in stream", time.perf_counter() - start
        return (
            "normal",
            r.status_code if ok else f"stream broken ({r.status_code})",
            time.perf_counter() - start,
        )
    r = await ac.post(path, json=body)
    return "normal", r.status_code, time.perf_counter() - start


async def drive(url: str, n: int, models: list[str], args, seed: int) -> list[tuple[str, int | str, float]]:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as ac:

        async def guarded(i: int):
            async with sem:
                return await one(ac, random.Random(rng.random() + i), models, args)

        return await asyncio.gather(*(guarded(i) for i in range(n)))


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            raise RuntimeError("server did not come up")
        time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--max-loaded", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--cancel-rate", type=float, default=0.1)
    p.add_argument("--bad-rate", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as root:
        dirs = write_adapters(root, args.adapters)
        port = free_port()
        cmd = [sys.executable, "-m", "lorakit", "serve", "--model", "tiny-llama", "--port", str(port)]
        cmd += ["--max-loaded", str(args.max_loaded), "--max-context", "512"]
        for name, path in dirs.items():
            cmd += ["--adapter", f"{name}={path}"]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        }
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            models = ["tiny-llama", *dirs]
            rss_start = rss_mib(proc.pid)
            asyncio.run(drive(url, args.warmup, models, args, seed=args.seed + 1))
            rss_warm = rss_mib(proc.pid)
            t0 = time.perf_counter()
            results, trend = [], []
            for q in range(4):  # in quarters, to see whether memory keeps growing or settles
                n = args.requests // 4 + (q < args.requests % 4)
                results += asyncio.run(drive(url, n, models, args, seed=args.seed * 4 + q))
                trend.append(rss_mib(proc.pid))
            wall = time.perf_counter() - t0
            deadline = time.time() + 60
            while True:  # cancelled generations must not keep the engine busy
                engine = httpx.get(f"{url}/metrics").json()["engine"]
                if (engine["running"] == 0 and engine["waiting"] == 0) or time.time() > deadline:
                    break
                time.sleep(0.1)
            rss_end = rss_mib(proc.pid)
            metrics = httpx.get(f"{url}/metrics").json()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    outcomes = Counter((kind, status) for kind, status, _ in results)
    server_5xx = {k: v for k, v in metrics["errors_by_status"].items() if int(k) >= 500}
    client_5xx = sum(v for (_, s), v in outcomes.items() if isinstance(s, int) and s >= 500)
    bad_not_4xx = sum(
        v for (k, s), v in outcomes.items() if k == "bad" and not (isinstance(s, int) and 400 <= s < 500)
    )
    broken = sum(v for (k, s), v in outcomes.items() if k == "normal" and s != 200)
    lat = [sec for kind, status, sec in results if kind == "normal" and status == 200]
    growth = (rss_end - rss_warm) / rss_warm * 100
    print(
        f"soak: {args.requests} requests over {args.adapters} adapters (max_loaded {args.max_loaded}), "
        f"concurrency {args.concurrency}, {wall:.1f} s ({args.requests / wall:.1f} req/s), tiny-llama, CPU, "
        f"torch threads {torch.get_num_threads()} here / OMP_NUM_THREADS={env['OMP_NUM_THREADS']} in the server"
    )
    for (kind, status), count in sorted(outcomes.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"  {kind:7s} {status!s:22s} {count}")
    print(
        f"  5xx seen by the client: {client_5xx}; in the server's /metrics: {server_5xx or 0} "
        f"-> {'OK' if not client_5xx and not server_5xx else 'FAIL'}"
    )
    print(f"  bad requests without a 4xx: {bad_not_4xx}; normal requests that failed: {broken}")
    print(
        f"  normal requests: {len(lat)}, client latency p50 {percentile(lat, 50) * 1e3:.0f} ms, "
        f"p99 {percentile(lat, 99) * 1e3:.0f} ms (nearest rank)"
    )
    print(
        f"  engine: cancelled {metrics['engine']['cancelled']}, running {metrics['engine']['running']}, "
        f"waiting {metrics['engine']['waiting']} at the end; adapter loads {metrics['adapters']['loads']}, "
        f"evictions {metrics['adapters']['evictions']}"
    )
    print(
        f"  server RSS: start {rss_start:.1f} MiB, after {args.warmup} warm-up requests {rss_warm:.1f} MiB, "
        f"end {rss_end:.1f} MiB: growth {growth:+.2f}% after warm-up (goal < 5%), "
        f"{(rss_end - rss_start) / rss_start * 100:+.2f}% from start"
    )
    print(f"  server RSS after each quarter of the run: {', '.join(f'{r:.1f}' for r in trend)} MiB")
    ok = not client_5xx and not server_5xx and not bad_not_4xx and not broken and growth < 5
    print(
        json.dumps(
            {
                "ok": ok,
                "p50_ms": percentile(lat, 50) * 1e3,
                "p99_ms": percentile(lat, 99) * 1e3,
                "rss_growth_pct": growth,
                "zero_5xx": not client_5xx and not server_5xx,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
