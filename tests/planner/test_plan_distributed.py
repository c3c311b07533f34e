"""The planner plans only what ``lorakit train`` runs: DDP across GPUs (every GPU holds the whole model, its
gradients and optimizer states, plus DDP's gradient buckets), FSDP (sharded weights, gradients and optimizer
states plus the parameters gathered in flight), and exactly the optimizers the trainer accepts."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.cli.main import main
from lorakit.config import ConfigError
from lorakit.planner.arch import PlanError, resolve_arch
from lorakit.planner.cost import GIB, OPTIMIZERS, Setup, gather_bytes, trainable_params
from lorakit.planner.plan import launch_command, plan
from lorakit.train.config import RunConfig


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_ddp_per_gpu_memory_is_one_gpus_plus_the_gradient_buckets(method):
    kw = dict(tokens=10**6, method=method, gpu="H200-141GB")
    one = plan("7B", gpus=1, **kw).selected
    four = plan("7B", gpus=4, distributed="ddp", **kw).selected
    m1, m4 = one.memory, four.memory
    assert m4.total >= m1.total and four.single_gpu_memory.total == m1.total
    # nothing sharded: weights, gradients, optimizer states and activations are those of one GPU
    for name in ("weights", "master_weights", "gradients", "optimizer_states", "activations", "transient"):
        assert getattr(m4, name) == getattr(m1, name), name
    # DDP's buckets: a flat copy of every trainable gradient (gradient_as_bucket_view off, torch's default)
    arch, setup = resolve_arch("7B"), Setup(method=method)
    grad_bytes = 2 if method == "full" else setup.adapter_bytes  # full FT: bf16 grads (+ fp32 master)
    assert m4.comm_buffers == trainable_params(arch, setup) * grad_bytes == m1.gradients
    assert m1.comm_buffers == 0  # one process: no DDP wrapper, no buckets
    assert m4.total == m1.total + m4.comm_buffers
    assert four.hours == pytest.approx(one.hours / 4)  # more GPUs cut time, not memory per GPU


def test_ddp_is_the_default_and_more_gpus_never_make_a_model_fit():
    # full fine-tuning of 7B needs ~127 GiB per GPU: never on 80 GB cards under DDP, on one 141 GB card
    p = plan("7B", tokens=10**6, method="lora", gpu="A100-80GB")
    assert p.setup.distributed == "ddp"
    full = p.methods["full"]
    assert full.single_gpu_memory.total > 80 * GIB
    assert full.fits_on["A100-80GB"] is None and full.fits_on["H100-80GB"] is None
    assert full.fits_on["H200-141GB"] == 1
    with pytest.raises(PlanError, match=r"does not fit 8 x A100-80GB .*every GPU holds the whole model"):
        plan("7B", tokens=10**6, method="full", gpu="A100-80GB", gpus=8)
    assert not any("sharded" in line or "ZeRO" in line for line in p.assumptions + p.recommendations)
    assert any("DDP" in line for line in p.assumptions)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_fsdp_shards_weights_gradients_and_states_but_not_activations(method):
    kw = dict(tokens=10**6, method=method, gpu="H200-141GB")
    one = plan("7B", gpus=1, **kw).selected
    four = plan("7B", gpus=4, distributed="fsdp", **kw).selected
    m1, m4 = one.memory, four.memory
    for name in ("master_weights", "gradients", "optimizer_states"):
        assert getattr(m4, name) == pytest.approx(getattr(m1, name) / 4), name
    assert m4.activations == m1.activations and m4.transient == m1.transient
    arch, setup = resolve_arch("7B"), Setup(method=method, distributed="fsdp")
    gathered = gather_bytes(arch, setup)
    assert m4.gathered == gathered and m4.weights == pytest.approx(m1.weights / 4 + gathered)
    assert m4.comm_buffers == 0 and m1.gathered == 0  # no DDP buckets; one process gathers nothing
    # the root (embeddings + head, 2 x 32000 x 4096 in bf16) stays gathered; two blocks are in flight
    assert gathered > 2 * 32000 * 4096 * 2
    assert four.hours == pytest.approx(one.hours / 4)


def test_fsdp_makes_a_model_too_large_for_one_gpu_fit_on_several(capsys):
    # full fine-tuning of 7B needs ~127 GiB on one GPU: never on 80 GB cards under DDP, on a few under FSDP
    ddp = plan("7B", tokens=10**6, method="lora", gpu="A100-80GB")
    assert ddp.methods["full"].fits_on["A100-80GB"] is None
    p = plan("7B", tokens=10**6, method="full", gpu="A100-80GB", distributed="fsdp")
    k = p.selected.gpus
    assert k is not None and 2 <= k <= 4 and p.selected.memory.total <= 80 * GIB
    assert launch_command(p) == (
        f"torchrun --nproc_per_node={k} -m lorakit train CONFIG.yaml --set training.distributed=fsdp"
    )
    assert any("FSDP2" in line for line in p.assumptions)
    assert main(["plan", "--model", "7B", "--tokens", "1M", "--method", "full", "--gpu", "A100-80GB",
                 "--distributed", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert f"run it: torchrun --nproc_per_node={k} " in out and "gathered" in out


def test_launch_command_spreads_a_large_job_over_nodes_and_is_plain_on_one_gpu():
    p = plan("70B", tokens=10**6, method="lora", gpu="RTX4090-24GB", distributed="fsdp")
    k = p.selected.gpus
    assert k > 8
    nodes = -(-k // 8)
    cmd = launch_command(p)
    assert cmd.startswith(f"torchrun --nnodes={nodes} --nproc_per_node={-(-k // nodes)} --node_rank=RANK ")
    assert "--rdzv-endpoint=HOST:29500" in cmd and cmd.endswith("--set training.distributed=fsdp")
    assert launch_command(plan("tiny-llama", tokens=1000)) == "lorakit train CONFIG.yaml"


def test_unknown_distributed_is_one_line(capsys):
    with pytest.raises(PlanError, match="distributed='zero'") as e:
        plan("tiny-llama", tokens=1000, distributed="zero")
    assert "\n" not in str(e.value) and "fsdp" in str(e.value)


def test_planner_offers_exactly_the_optimizers_the_trainer_accepts(capsys):
    def trainer_accepts(name: str) -> bool:
        base = {"model": {"name": "tiny-llama"}, "data": {"train": "x.jsonl"}, "output": {"dir": "o"}}
        try:
            RunConfig.from_dict({**base, "training": {"optimizer": name}})
        except ConfigError as e:
            assert "training.optimizer" in str(e)
            return False
        return True

    assert all(trainer_accepts(o) for o in OPTIMIZERS)
    assert not trainer_accepts("adamw-8bit") and "adamw-8bit" not in OPTIMIZERS
    with pytest.raises(PlanError, match=r"optimizer='adamw-8bit' is not supported"):
        plan("tiny-llama", tokens=1000, optimizer="adamw-8bit")
    with pytest.raises(SystemExit):
        main(["plan", "--model", "tiny-llama", "--tokens", "1000", "--optimizer", "adamw-8bit"])
    assert "invalid choice: 'adamw-8bit'" in capsys.readouterr().err


def test_plan_help_shows_distributed(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert "--distributed {ddp,fsdp}" in out and "adamw-8bit" not in out


def test_cli_ddp_plan_json(capsys):
    import json

    argv = ["plan", "--model", "tiny-llama", "--tokens", "1000", "--gpus", "2", "--distributed", "ddp", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    sel = data["methods"]["lora"]
    assert data["setup"]["distributed"] == "ddp" and sel["gpus"] == 2
    assert sel["memory"]["total"] >= sel["single_gpu_memory"]["total"]
    assert sel["memory"]["comm_buffers"] > 0 and sel["single_gpu_memory"]["comm_buffers"] == 0


def test_setup_accepts_exactly_the_trainers_strategies():
    for name in ("ddp", "fsdp"):
        assert dataclasses.replace(Setup(), distributed=name).distributed == name
    with pytest.raises(PlanError, match="expected one of"):
        Setup(distributed="deepspeed")
