"""The training loop on the builtin tiny Llama: exact resume, kill -9 during a checkpoint save, non-finite
losses, gradient checkpointing, evaluation metrics, artifacts and the one-line errors of ``lorakit train``."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.main import main as cli_main
from lorakit.train.callbacks import Callback
from lorakit.train.checkpoint import list_checkpoints, load_checkpoint
from lorakit.train.config import RunConfig
from lorakit.train.evaluate import macro_f1
from lorakit.train.schedule import WarmupDecay
from lorakit.train.trainer import NonFiniteLossError, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_sft(path: str, n: int = 48, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    return path


def write_cls(path: str, n: int = 32, labels=("neg", "pos"), seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            lab = rng.choice(labels)
            f.write(json.dumps({"sentence": f"{lab} {'good' if lab == 'pos' else 'bad'} {rng.randint(0, 99)}", "y": lab}) + "\n")
    return path


def run_config(tmp_path, out: str = "out", **training) -> RunConfig:
    data = write_sft(str(tmp_path / "sft.jsonl"))
    t = dict(epochs=1, batch_size=2, grad_accumulation=2, lr=1e-2, num_workers=0, gradient_checkpointing=False,
             warmup_steps=2, eval_at_start=False)
    t.update(training)
    return RunConfig.from_dict({
        "model": {"name": "tiny-llama"},
        "data": {"train": data, "val_fraction": 0.25},
        "adapter": {"r": 4, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "training": t,
        "output": {"dir": str(tmp_path / out), "progress": False, "plot": False, "save_every": 0},
    })


def with_output(cfg: RunConfig, **output) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, **output))


def adapter_tensors(out: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


class Crash(Callback):
    """Simulates the process dying in the middle of step ``at`` (after the previous checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_after_backward(self, state) -> None:
        if state.step + 1 == self.at:
            raise KeyboardInterrupt("simulated kill")


def test_exact_resume_holds_with_compiled_blocks(tmp_path, capsys):
    """``training.compile: true`` (dropout masks from inductor's RNG): an interrupted, resumed run still ends
    with the uninterrupted run's adapter bit for bit and the same loss log."""
    from lorakit.train.build import compiler_unavailable

    if compiler_unavailable(torch.device("cpu")):
        pytest.skip(compiler_unavailable(torch.device("cpu")))
    cfg = run_config(tmp_path, max_steps=6, eval_every=6, compile=True)
    straight = train(with_output(cfg, dir=str(tmp_path / "a"), save_every=3))
    assert straight.summary["compile"] == "LlamaDecoderLayer x2"
    assert "; compiled LlamaDecoderLayer x2 (the first step compiles" in capsys.readouterr().out
    b = with_output(cfg, dir=str(tmp_path / "b"), save_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(b, callbacks=[Crash(at=4)])
    train(b, resume=True)
    ta, tb = adapter_tensors(str(tmp_path / "a")), adapter_tensors(str(tmp_path / "b"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert losses(str(tmp_path / "a")) == losses(str(tmp_path / "b"))


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    # 36 training rows / global batch 4 = 9 steps per epoch: 20 steps cross two epoch boundaries.
    cfg = run_config(tmp_path, max_steps=20, eval_every=5)
    straight = train(with_output(cfg, dir=str(tmp_path / "a"), save_every=10))
    assert straight.steps == 20
    b = with_output(cfg, dir=str(tmp_path / "b"), save_every=10)
    with pytest.raises(KeyboardInterrupt):
        train(b, callbacks=[Crash(at=11)])
    assert [s for s, _ in list_checkpoints(str(tmp_path / "b" / "checkpoints"))] == [10]
    resumed = train(b, resume=True)
    assert resumed.steps == 20
    ta, tb = adapter_tensors(str(tmp_path / "a")), adapter_tensors(str(tmp_path / "b"))
    assert ta.keys() == tb.keys() and len(ta) == 8
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert losses(str(tmp_path / "a")) == losses(str(tmp_path / "b"))  # metrics.jsonl continues exactly
    assert resumed.eval_after == straight.eval_after
    # the adapter really trained (B starts at zero)
    assert any(k.endswith("lora_B.weight") and ta[k].abs().sum() > 0 for k in ta)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import lorakit.train.checkpoint as ck
    orig = ck.write_safetensors
    def write(tensors, path):
        if ".tmp-step-00000004" in path and path.endswith("state.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 half-way through the second save
        return orig(tensors, path)
    ck.write_safetensors = write
    from lorakit.train.trainer import train
    from lorakit.train.config import load_run_config
    train(sys.argv[1])
""")


def test_kill_during_checkpoint_save_leaves_previous_loadable(tmp_path):
    cfg = with_output(run_config(tmp_path, max_steps=6), save_every=2)
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = cfg.output.dir + "/checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [2]
    assert any(n.startswith(".tmp-step-00000004") for n in os.listdir(root))  # the half-written save
    from lorakit.models import build_model
    from lorakit.surgery.inject import inject

    model = inject(build_model("tiny-llama"), cfg.adapter)
    state = load_checkpoint(list_checkpoints(root)[0][1], model)
    assert state["step"] == 2 and state["optimizer"]["state"]
    result = train(cfg, resume=True)  # and the run continues from it
    assert result.steps == 6
    assert not any(n.startswith(".tmp-") for n in os.listdir(root))


class NaNLoss(Callback):
    def __init__(self, steps) -> None:
        self.steps = steps

    def extra_loss(self, state):
        return torch.tensor(float("nan")) if self.steps(state.step) else None


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    cfg = run_config(tmp_path, max_steps=6)
    res = train(cfg, callbacks=[NaNLoss(lambda s: s == 2)])
    assert res.steps == 6 and res.skipped_steps == 1
    assert res.summary["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in adapter_tensors(cfg.output.dir).values())


def test_consecutive_non_finite_losses_stop_with_last_checkpoint_intact(tmp_path):
    cfg = with_output(run_config(tmp_path, max_steps=9, max_nonfinite=3), save_every=2)
    with pytest.raises(NonFiniteLossError, match="not finite for 3 steps in a row.*step-00000006"):
        train(cfg, callbacks=[NaNLoss(lambda s: s >= 4)])
    ckpts = list_checkpoints(cfg.output.dir + "/checkpoints")
    # steps 5 and 6 were skipped (no update) and saved as step 6; nothing after the stop
    assert [s for s, _ in ckpts] == [4, 6]
    from lorakit.models import build_model
    from lorakit.surgery.inject import inject

    m4 = inject(build_model("tiny-llama"), cfg.adapter)
    m6 = inject(build_model("tiny-llama"), cfg.adapter)
    load_checkpoint(ckpts[0][1], m4)
    assert load_checkpoint(ckpts[1][1], m6)["progress"]["skipped"] == 2
    for (n, a), (_, b) in zip(m4.state_dict().items(), m6.state_dict().items()):
        assert torch.equal(a, b), n  # skipped steps did not touch the weights


def test_gradient_checkpointing_gives_the_same_trajectory(tmp_path):
    a = train(run_config(tmp_path, "a", max_steps=3, gradient_checkpointing=False))
    b = train(run_config(tmp_path, "b", max_steps=3, gradient_checkpointing=True))
    la, lb = losses(a.output_dir), losses(b.output_dir)
    assert la == pytest.approx(lb, rel=1e-6) and la[0] != la[-1]
    from lorakit.train.build import Precision, build_run_model

    model = build_run_model(run_config(tmp_path, "c", gradient_checkpointing=True), 2, 256,
                            Precision("fp32", None, False), torch.device("cpu"))
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing  # really on


def test_quant_section_trains_qlora(tmp_path):
    pytest.importorskip("lorakit.quant")
    import dataclasses

    from lorakit.config import QuantConfig

    cfg = dataclasses.replace(run_config(tmp_path, max_steps=3), quant=QuantConfig(compute_dtype="fp32"))
    res = train(cfg)
    assert res.steps == 3 and res.skipped_steps == 0 and math.isfinite(res.train_loss)
    assert res.summary["efficiency"]["trainable_params"] == 1792  # only the adapters train


def test_artifacts_summary_and_classification_metrics(tmp_path):
    train_file = write_cls(str(tmp_path / "cls.jsonl"), 32)
    val_file = write_cls(str(tmp_path / "val.jsonl"), 12, seed=1)
    cfg = RunConfig.from_dict({
        "model": {"name": "tiny-bert"},
        "data": {"train": train_file, "validation": val_file, "task": "classification",
                 "fields": {"text": "sentence", "label": "y"}},
        "adapter": {"r": 4},
        "training": {"epochs": 2, "batch_size": 4, "grad_accumulation": 2, "lr": 5e-3, "num_workers": 0,
                     "gradient_checkpointing": False, "schedule": "cosine"},
        "output": {"dir": str(tmp_path / "cls_out"), "progress": True},
    })
    res = train(cfg)
    out = cfg.output.dir
    for name in ("metrics.jsonl", "summary.json", "loss_curve.png", "run_config.json", "adapter/adapter_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 8 and summary["peak_rss_mib"] > 0 and summary["wall_time_s"] > 0
    assert set(summary["eval_after"]) == {"eval_loss", "eval_accuracy", "eval_macro_f1"}
    assert summary["efficiency"]["trainable_params"] > 0
    # the classifier head was trained and saved with the adapter
    assert any("classifier" in k for k in adapter_tensors(out))
    assert 0.0 <= res.eval_after["eval_accuracy"] <= 1.0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]  # before training and at the end of each epoch


def test_macro_f1_and_schedule_formulas():
    # rows = true, cols = predicted. class 0: tp 3 fp 1 fn 2 -> 6/9; class 1: tp 4 fp 2 fn 1 -> 8/11
    conf = torch.tensor([[3, 2], [1, 4]])
    assert macro_f1(conf) == pytest.approx((6 / 9 + 8 / 11) / 2)
    f = WarmupDecay(warmup=4, total=20, kind="linear")
    assert [f(s) for s in (0, 2, 4, 12, 20)] == pytest.approx([0, 0.5, 1.0, 0.5, 0.0])
    c = WarmupDecay(warmup=0, total=10, kind="cosine")
    assert [c(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


def test_generate_greedy_matches_transformers_generate():
    from lorakit.models import build_model
    from lorakit.models.generate import generate_ids

    model = build_model("tiny-llama")
    ids = [257, 72, 105, 32]
    ours = generate_ids(model, ids, max_new_tokens=8)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None)[0, 4:].tolist()
    assert ours == ref


def cli(argv, capsys) -> tuple[int, str]:
    code = cli_main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def yaml_config(tmp_path, train_file: str, **extra) -> str:
    import yaml

    cfg = {"model": {"name": "tiny-llama"}, "data": {"train": train_file},
           "training": {"batch_size": 2, "grad_accumulation": 1, "max_steps": 1, "num_workers": 0,
                        "gradient_checkpointing": False},
           "output": {"dir": "out", "progress": False, "plot": False}}
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda p: yaml_config(p, "missing.jsonl"), "missing.jsonl' does not exist"),
        (lambda p: yaml_config(p, _write(p, "bad.jsonl", '{"text": "a"}\n{"text": oops}\n')), "bad.jsonl:2: bad JSON"),
        (lambda p: yaml_config(p, _write(p, "f.jsonl", '{"a": 1}\n'), data={"fields": {"text": "body"}}),
         "field 'body' (mapped to 'text') is missing; fields present: ['a']"),
        (lambda p: yaml_config(p, _write(p, "empty.jsonl", "\n")), "empty"),
        (lambda p: yaml_config(p, "x.jsonl", training={"batch_sise": 1}), "unknown key 'batch_sise' (did you mean 'batch_size'?)"),
        (lambda p: yaml_config(p, "x.jsonl", training={"batch_size": "four"}), "training.batch_size='four' has the wrong type: expected int"),
        (lambda p: yaml_config(p, _write(p, "t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'),
                               data={"task": "classification", "validation": _write(p, "v.jsonl", '{"text": "c", "label": "z"}\n')}),
         "label 'z' was not seen in training"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, setup, fragment):
    path = setup(tmp_path)
    code, err = cli(["train", path], capsys)
    assert code == 2 and fragment in err and len(err.splitlines()) == 1, err


def _write(tmp_path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return name


def test_cli_refuses_occupied_output_dir_then_overwrites(tmp_path, capsys):
    path = yaml_config(tmp_path, write_sft(str(tmp_path / "d.jsonl"), 8))
    assert cli(["train", path], capsys)[0] == 0
    code, err = cli(["train", path], capsys)
    assert code == 2 and "already holds a run; pass --resume" in err and len(err.splitlines()) == 1
    assert cli(["train", path, "--overwrite", "--set", "training.max_steps=2"], capsys)[0] == 0
    assert json.load(open(tmp_path / "out" / "summary.json"))["steps"] == 2


def test_cli_generate_with_and_without_the_trained_adapter(tmp_path, capsys):
    path = yaml_config(tmp_path, write_sft(str(tmp_path / "d.jsonl"), 8))
    assert cli(["train", path, "--set", "training.lr=0.5", "--set", "training.max_steps=3"], capsys)[0] == 0
    base = ["generate", "--model", "tiny-llama", "--prompt", "1+1=", "--max-new-tokens", "4"]
    assert cli_main(base) == 0
    plain = capsys.readouterr().out
    assert cli_main([*base, "--adapter", str(tmp_path / "out" / "adapter")]) == 0
    adapted = capsys.readouterr().out
    assert plain != adapted  # the adapter changed the greedy continuation
    code, err = cli([*base, "--adapter", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err
