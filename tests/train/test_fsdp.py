"""``lorakit train`` with ``training.distributed: fsdp`` (FSDP2) under torchrun on CPU (gloo).

One 2-process launch trains LoRA, QLoRA (NF4), DoRA and AdaLoRA one after the other (the process group made
once by the launch script), then continues a copy of AdaLoRA's step-2 checkpoint; each equals one process with the same global batch (loss trajectory rel 1e-4, saved
adapter 1e-5); the saved adapter is full (shapes of the unsharded model) and, loaded in this process, gives
the sharded model's logits; each rank holds <= 0.55x the bytes of the unsharded model, counting every tensor
in the process. AdaLoRA (its adapter replicated, the base sharded) prunes to the same ranks as one process
through two budget steps, and the resumed AdaLoRA run ends bit for bit as the uninterrupted one. A second launch kills rank 1 (SIGKILL) after the step-2 checkpoint: rank 0 stops with a
one-line PeerLostError within 60 s; the checkpoint loads; a resume launched as two "nodes" on localhost
(two torchrun launches, --nnodes=2) ends with the same adapter, bit for bit, as the uninterrupted run.
A third launch, beside them, stops rank 1 (SIGSTOP) with training.distributed_timeout_s = 20: rank 0 ends
with PeerLostError after the timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import write_products
from lorakit.config import ConfigError
from lorakit.train import fsdp
from lorakit.train.distributed import Dist

PROBE_IDS = (torch.arange(24).reshape(2, 12) * 7) % 250

# the launch script: one process group for several runs; a probe on each (logits, bytes held, a kill)
SCRIPT = textwrap.dedent("""
    import gc, json, os, shutil, signal, sys, time
    import torch, torch.distributed as dist, yaml
    from safetensors.torch import save_file
    import lorakit.train.trainer as trainer
    from lorakit.bench.memory import held_tensor_bytes
    from lorakit.cli.main import main
    from lorakit.train.callbacks import Callback

    IDS = (torch.arange(24).reshape(2, 12) * 7) % 250
    class Probe(Callback):
        def __init__(self, out):
            self.out = out
        def on_step_end(self, state):
            if RANK == 1 and state.step == int(os.environ.get("KILL_AT", "0")):
                with open(os.path.join(self.out, "killed_at"), "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            if RANK == 1 and state.step == int(os.environ.get("STOP_AT", "0")):  # hung, not dead
                with open(os.path.join(self.out, "stopped"), "w") as f:
                    f.write(f"{os.getpid()} {time.time()!r}")
                os.kill(os.getpid(), signal.SIGSTOP)
        def on_train_end(self, state):
            with torch.no_grad():  # a collective forward of the sharded model, on every rank
                logits = state.model(input_ids=IDS).logits.contiguous()
            if RANK == 0:
                save_file({"logits": logits}, os.path.join(self.out, "logits.safetensors"))
            del logits
            gc.collect()
            with open(os.path.join(self.out, f"held-{RANK}.json"), "w") as f:
                json.dump({"bytes": held_tensor_bytes()}, f)

    if "RANK" in os.environ and "STOP_AT" not in os.environ:  # STOP_AT: the trainer makes the group
        dist.init_process_group("gloo")
    RANK = int(os.environ.get("RANK", "0"))
    train = trainer.train
    for cfg in sys.argv[1:]:
        if cfg.startswith("--"):
            continue
        out = yaml.safe_load(open(cfg))["output"]["dir"]
        trainer.train = lambda *a, _o=out, **kw: train(*a, callbacks=[Probe(_o)], **kw)
        flags = [a for a in sys.argv[1:] if a.startswith("--")]
        if os.path.exists(cfg + ".from"):  # resume from a copy of another run's checkpoint
            src = open(cfg + ".from").read().strip()
            if RANK == 0:
                shutil.copytree(src, os.path.join(out, "checkpoints", os.path.basename(src)))
            if dist.is_initialized():
                dist.barrier()
            flags.append("--resume")
        rc = main(["train", cfg, *flags])
        if rc:
            with open(os.path.join(out, f"ended-{RANK}"), "w") as f:
                f.write(repr(time.time()))
            sys.exit(rc)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
""")

RUNS = {  # name: (adapter, quant)
    "lora": ({}, None),
    "qlora": ({}, {"dtype": "nf4", "compute_dtype": "float32"}),  # fp32 dequantization: exact parity
    "dora": ({"method": "dora"}, None),
    # 4 matrices x init_r 4 = 16 ranks, pruned to 9 after step 2 and to 8 after step 3 (tinit 1, tfinal 1)
    "adalora": ({"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "delta_t": 1}, None),
}


HANG_TIMEOUT_S = 20  # above any honest skew between the ranks on a loaded 2-core machine


def _end_hang(proc, out) -> dict:
    """Wait (bounded) for rank 0 of the hung launch to end, then SIGKILL its stopped peer (torchrun's
    SIGTERM does not reach a stopped process) and collect the launch."""
    deadline = time.time() + 120
    while not (out / "ended-0").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    ended = float((out / "ended-0").read_text()) if (out / "ended-0").exists() else None
    pid, stopped = (out / "stopped").read_text().split() if (out / "stopped").exists() else (None, "nan")
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    return {"rc": proc.returncode, "err": err, "stopped": float(stopped), "ended": ended}


def _config(root, name: str, distributed: bool, adapter=None, quant=None, steps: int = 4,
            timeout_s: float | None = None) -> str:
    data = root / "d.jsonl"
    write_products(data)
    cfg = {
        "model": {"name": "tiny-llama"},
        "data": {"train": str(data), "val_fraction": 0.2},
        "adapter": {"r": 4, "dropout": 0.0, **(adapter or {})},
        "training": {"max_steps": steps, "batch_size": 2 if distributed else 4, "grad_accumulation": 2,
                     "lr": 1e-2, "warmup_steps": 1, "num_workers": 0, "gradient_checkpointing": distributed,
                     "eval_every": 2, "mixed_precision": "no"},  # exact parity: no bf16 reductions
        "output": {"dir": str(root / name), "progress": False, "plot": False, "save_every": 2},
    }
    if distributed:
        cfg["training"]["distributed"] = "fsdp"
    if timeout_s is not None:
        cfg["training"]["distributed_timeout_s"] = timeout_s
    if quant:
        cfg["quant"] = quant
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, args, env, nodes: tuple[int, int] | None = None, port: int = 0, monitor_s: float = 0.1):
    """``monitor_s``: how often torchrun's agent polls its workers (its default 0.1 s); once one has died it
    SIGTERMs the others at its next poll."""
    if nodes is None:
        launch = ["--standalone", "--nproc_per_node=2"]
    else:  # one of two "nodes" on localhost, one process each
        launch = [f"--nnodes={nodes[1]}", f"--node_rank={nodes[0]}", "--nproc_per_node=1",
                  "--master_addr=127.0.0.1", f"--master_port={port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, f"--monitor-interval={monitor_s}", str(script), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _records(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    script = root / "launch.py"
    script.write_text(SCRIPT)
    two = [_config(root, name, True, a, q) for name, (a, q) in RUNS.items()]
    # AdaLoRA's exact resume: the same launch continues a copy of the adalora run's step-2 checkpoint
    two.append(_config(root, "adalora-resumed", True, *RUNS["adalora"]))
    (root / "adalora-resumed.yaml.from").write_text(str(root / "adalora" / "checkpoints" / "step-00000002"))
    kill = _config(root, "kill", True)  # the lora run, killed after its step-2 checkpoint
    main = _torchrun(script, two, env)
    # the agent polls every 5 s, not 0.1 s: with four launches on two cores rank 0 can take more than 0.1 s to
    # reach the collective that reports the lost peer, and the agent's SIGTERM would come first (rank 0 then
    # says "stopped by SIGTERM ... last checkpoint", lorakit.train.stopping); this launch checks the peer path
    killed = _torchrun(script, [kill], dict(env, KILL_AT="3"), monitor_s=5.0)
    # rank 1 stops (SIGSTOP) after step 3: the collective timeout ends rank 0
    hang = _torchrun(script, [_config(root, "hang", True, timeout_s=HANG_TIMEOUT_S)], dict(env, STOP_AT="3"))
    ones = [_config(root, f"{name}-one", False, a, q) for name, (a, q) in RUNS.items()]
    one = subprocess.Popen([sys.executable, str(script), *ones], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)  # the reference: one process, probed alike
    k_out, k_err = killed.communicate(timeout=300)
    k_end = time.time()
    ckpt2 = root / "kill" / "checkpoints" / "step-00000002"
    from lorakit.config import AdapterConfig
    from lorakit.surgery.inject import inject
    from lorakit.train.checkpoint import load_checkpoint

    unsharded = inject(_base("lora"), AdapterConfig(r=4, alpha=16.0, dropout=0.0))  # the run's adapter
    loaded = load_checkpoint(str(ckpt2), unsharded)  # the last checkpoint loads in one process
    killed_state = {"rc": killed.returncode, "err": k_err, "end": k_end, "loaded_step": loaded["step"]}
    killed_state["hang"] = _end_hang(hang, root / "hang")
    # resume the killed run as two nodes of one process each
    port = _free_port()
    nodes = [_torchrun(script, [kill, "--resume"], env, (r, 2), port) for r in (0, 1)]
    for p in (main, one):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    results = [p.communicate(timeout=300) for p in nodes]
    for p, (_, e) in zip(nodes, results):
        assert p.returncode == 0, e[-3000:]
    return root, killed_state, results[0][0]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp_two_processes_match_one(runs, name):
    root = runs[0]
    r2, r1 = _records(root / name), _records(root / f"{name}-one")
    loss2 = [r["loss"] for r in r2 if "loss" in r]
    loss1 = [r["loss"] for r in r1 if "loss" in r]
    assert len(loss1) == len(loss2) == 4 and loss1[0] != loss1[-1]
    assert loss2 == pytest.approx(loss1, rel=1e-4)
    ev2 = [r["eval_loss"] for r in r2 if "eval_loss" in r]
    assert ev2 == pytest.approx([r["eval_loss"] for r in r1 if "eval_loss" in r], rel=1e-4)
    summary = json.load(open(root / name / "summary.json"))
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    a2 = load_file(str(root / name / "adapter" / "adapter_model.safetensors"))
    a1 = load_file(str(root / f"{name}-one" / "adapter" / "adapter_model.safetensors"))
    assert sorted(a2) == sorted(a1)  # the full adapter, never a shard
    for k in a1:
        assert a2[k].shape == a1[k].shape, k
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-5, atol=1e-5)
    step = os.path.join("checkpoints", "step-00000004", "trainable.safetensors")
    c2, c1 = load_file(str(root / name / step)), load_file(str(root / f"{name}-one" / step))
    assert sorted(c2) == sorted(c1)  # the checkpoint holds full tensors too
    torch.testing.assert_close(c2, c1, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fsdp_adalora_allocates_the_same_ranks_as_one_process(runs):
    """Budget steps under FSDP see the gradients averaged over ranks (the adapter is left whole by FSDP and
    all-reduced by lorakit): the same budgets, the same rank pattern; the model's base is still sharded."""
    root = runs[0]
    budgets = [[r.get("adalora_budget") for r in _records(root / n) if "loss" in r] for n in ("adalora", "adalora-one")]
    assert budgets[0] == budgets[1] == [16, 9, 8, 8], budgets  # pruning happened within the run
    cfg2, cfg1 = (json.load(open(root / n / "adapter" / "adapter_config.json")) for n in ("adalora", "adalora-one"))
    assert cfg2["rank_pattern"] == cfg1["rank_pattern"]
    kept = [sum(v) for v in cfg1["rank_pattern"].values()]
    assert sum(kept) == 8 and len(set(kept)) > 1, kept  # uneven ranks: the allocation is not trivial
    s2, s1 = (json.load(open(root / n / "summary.json")) for n in ("adalora", "adalora-one"))
    assert s2["adalora_schedule"] == s1["adalora_schedule"]
    assert s2["rank_max_abs_diff"] == 0.0  # the replicated adapter stayed identical on both ranks
    one = json.load(open(root / "adalora-one" / "held-0.json"))["bytes"]
    for rank in (0, 1):  # the base sharded (the adapter and its optimizer state whole on each rank)
        assert json.load(open(root / "adalora" / f"held-{rank}.json"))["bytes"] <= 0.55 * one


@pytest.mark.slow
def test_fsdp_adalora_resume_is_exact(runs):
    root = runs[0]
    a = load_file(str(root / "adalora-resumed" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(root / "adalora" / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (json.load(open(root / n / "adapter" / "adapter_config.json"))["rank_pattern"]
              for n in ("adalora-resumed", "adalora"))
    assert ra == rb
    loss = [r["loss"] for r in _records(root / "adalora") if "loss" in r]
    assert [r["loss"] for r in _records(root / "adalora-resumed") if "loss" in r] == loss[2:]


def _base(name: str) -> torch.nn.Module:
    from lorakit import QuantConfig, build_model, quantize

    model = build_model("tiny-llama", seed=0)
    quant = RUNS[name][1]
    if quant:
        quantize(model, QuantConfig(dtype="nf4", compute_dtype=torch.float32))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_saved_adapter_gives_the_sharded_logits(runs, name):
    from lorakit import load_adapter

    root = runs[0]
    model = load_adapter(_base(name), str(root / name / "adapter"))
    with torch.no_grad():
        logits = model(input_ids=PROBE_IDS).logits
    sharded = load_file(str(root / name / "logits.safetensors"))["logits"]
    torch.testing.assert_close(logits, sharded, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_each_rank_holds_about_half_of_one_process(runs, name):
    """Every tensor each rank's process holds (shards, any leftover full copy, optimizer state, buffers),
    against the one-process run's, probed at the same point; for QLoRA the NF4 codes must be sharded too
    (left replicated they make the ratio 0.62)."""
    root = runs[0]
    one = json.load(open(root / f"{name}-one" / "held-0.json"))["bytes"]
    for rank in (0, 1):
        held = json.load(open(root / name / f"held-{rank}.json"))["bytes"]
        assert 0.4 * one < held <= 0.55 * one, (rank, held, one)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "qlora", "dora"])
def test_the_planner_per_rank_figures_match_the_sharded_runs(runs, name):
    """What each rank held after its first step (summary.json, the figure ``plan --calibrate --distributed
    fsdp`` checks) against the planner's sharded weights, gradients and AdamW state, here for the NF4 base
    and DoRA too (the calibration command itself runs LoRA)."""
    from lorakit.planner.calibrate_fsdp import FsdpCalibration, predicted_per_rank

    measured = json.load(open(runs[0] / name / "summary.json"))["fsdp_memory_per_rank"]
    predicted = predicted_per_rank("tiny-llama", 4, 2, method=name)
    c = FsdpCalibration("tiny-llama", 2, 4, 0.02, predicted, measured)
    assert c.ok, c.table()


@pytest.mark.slow
def test_killed_rank_stops_the_job_and_resume_on_two_nodes_is_exact(runs):
    root, killed, node0_out = runs
    assert killed["rc"] != 0
    assert killed["end"] - float((root / "kill" / "killed_at").read_text()) < 60
    assert "PeerLostError: rank 0: lost contact with the other processes" in killed["err"]
    assert "step-00000002; continue with --resume" in killed["err"]
    assert killed["loaded_step"] == 2
    assert "resuming from step 2 of 4" in node0_out
    a = load_file(str(root / "kill" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(root / "lora" / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit: resumed (as two nodes) == uninterrupted
    loss_k = [r["loss"] for r in _records(root / "kill") if "loss" in r]
    assert loss_k == [r["loss"] for r in _records(root / "lora") if "loss" in r]


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_within_the_collective_timeout(runs):
    """Rank 1 stopped (SIGSTOP: alive, silent) after step 3, training.distributed_timeout_s = 20: rank 0's next
    collective times out and it stops with the one-line PeerLostError (PyTorch's default would wait 30 min)."""
    hang = runs[1]["hang"]
    assert hang["ended"] is not None, hang["err"][-2000:]  # rank 0 ended on its own, before its peer was killed
    waited = hang["ended"] - hang["stopped"]  # nan if rank 0 stopped before rank 1 did: see the log
    assert HANG_TIMEOUT_S <= waited < HANG_TIMEOUT_S + 30, (waited, hang["err"][-2000:])
    assert hang["rc"] != 0
    line = next(x for x in hang["err"].splitlines() if "PeerLostError" in x)
    assert "rank 0: lost contact with the other processes" in line and "Timed out" in line
    assert "step-00000002; continue with --resume" in line


@pytest.mark.parametrize("quant", [False, True])
def test_the_bf16_policy_runs_with_nf4_storage(monkeypatch, quant):
    """What the trainer uses on CUDA with bf16 (``MixedPrecisionPolicy``: bf16 compute, NF4 codes never
    cast), on a one-process gloo group here: the sharded model's logits are the unsharded model's under bf16
    autocast, to bf16 rounding (the one-GPU smoke run cannot run on this machine)."""
    import torch.distributed as dist

    from lorakit import AdapterConfig, QuantConfig, build_model, quantize
    from lorakit.surgery.inject import inject

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "1", "RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    model = build_model("tiny-llama", seed=0)
    if quant:
        quantize(model, QuantConfig(dtype="nf4", compute_dtype=torch.bfloat16))
    inject(model, AdapterConfig(r=4, dropout=0.0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=PROBE_IDS).logits.float()
    dist.init_process_group("gloo")
    try:
        fsdp.shard(model, fsdp.check_model(model, "lora"), Dist(), bf16=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=PROBE_IDS).logits.float()
        dtypes = {p.to_local().dtype for p in model.parameters()}
    finally:
        dist.destroy_process_group()
    assert dtypes == ({torch.uint8, torch.float32} if quant else {torch.float32})  # stored as built
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-2)


# --- refusals, before any work (no launch needed) ------------------------------------------------------
def test_fsdp_on_one_process_is_refused(tmp_path):
    from lorakit.train.trainer import train

    cfg = _config(tmp_path, "one", True)
    with pytest.raises(ConfigError, match="fsdp.*one process; start it with torchrun"):
        train(cfg)
    assert not (tmp_path / "one").exists()


def test_mode_rules():
    two = Dist(rank=0, world_size=2)
    assert fsdp.resolve_mode(None, Dist()) == "none" and fsdp.resolve_mode(None, two) == "ddp"
    assert fsdp.resolve_mode("fsdp", two) == "fsdp"
    with pytest.raises(ConfigError, match="'none' but torchrun started 2 processes"):
        fsdp.resolve_mode("none", two)
    with pytest.raises(ValueError, match="3 training rows for 4 processes"):
        fsdp.check_rows(3, Dist(world_size=4), "d.jsonl")
    fsdp.check_rows(4, Dist(world_size=4), "d.jsonl")


def test_model_without_known_blocks_is_refused():
    with pytest.raises(ConfigError, match="cannot find the decoder blocks of Sequential"):
        fsdp.check_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), "lora")
    with pytest.raises(ConfigError, match="does not run adapter.method='full'"):
        fsdp.check_model(_base("lora"), "full")
    for method in ("lora", "adalora"):
        assert len(fsdp.check_model(_base("lora"), method)) == 2


def test_distributed_field_is_checked(tmp_path):
    from lorakit.train.config import load_run_config

    cfg = _config(tmp_path, "x", False)
    with pytest.raises(ConfigError, match=r"training.distributed='zero3' is not supported; expected one of"):
        load_run_config(cfg, ["training.distributed=zero3"])
    assert load_run_config(cfg, ["training.distributed=fsdp"]).training.distributed == "fsdp"
    for bad in ("0", "-1", "1e9"):
        with pytest.raises(ConfigError, match=r"training.distributed_timeout_s=.* is invalid; expected a number of "
                                              r"seconds in \(0, 604800\]"):
            load_run_config(cfg, [f"training.distributed_timeout_s={bad}"])
    assert load_run_config(cfg, ["training.distributed_timeout_s=30"]).training.distributed_timeout_s == 30
