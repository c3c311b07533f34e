"""Small helpers shared by tests (importable as ``helpers``: tests/ is on pythonpath)."""

import json
import math

import torch
from safetensors.torch import load_file


def logits_of(out) -> torch.Tensor:
    """Logits (or last hidden state) of a transformers model output."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out


def randomize_adapter(model, adapter: str, seed: int, scale: float = 0.3) -> None:
    """Fill every tensor of ``adapter`` (A and B) from its own seed, so adapters differ from each other
    (two adapters made from the same seed are identical and hide routing bugs)."""
    from lorakit.surgery.inject import adapted_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            if adapter in layer.adapters:
                for p in layer.adapters[adapter].parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)


def logits_alone(model, x: torch.Tensor, name: str) -> torch.Tensor:
    """Logits of ``x`` with adapter ``name`` active on the whole batch ("base": adapters disabled)."""
    import lorakit
    from lorakit.serving import BASE

    with torch.no_grad():
        if name == BASE:
            with lorakit.disabled(model):
                return model(x).logits
        lorakit.set_adapter(model, name)
        return model(x).logits


def assert_rows_alone(mixed: torch.Tensor, model, x: torch.Tensor, names) -> None:
    """Row i of the mixed-batch logits equals running adapter ``names[i]`` alone, to 1e-5."""
    for i, name in enumerate(names):
        torch.testing.assert_close(
            mixed[i], logits_alone(model, x[i : i + 1], name)[0], atol=1e-5, rtol=0, msg=f"row {i} ({name})"
        )


def perturb(model, seed=0, scale=0.05):
    """Stand-in for training: move every trainable tensor, so A, B differ from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def plain_consumer(model, folder):
    """What a vLLM-style consumer computes from the files: W + (alpha / r) B A on the given base, no
    other knowledge of the init (rank_pattern / alpha_pattern are not used by these tests)."""
    with open(folder / "adapter_config.json") as f:
        config = json.load(f)
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    tensors = load_file(folder / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                path = key[len("base_model.model.") : -len(".lora_A.weight")]
                b = tensors[key.replace("lora_A", "lora_B")]
                assert a.shape[0] == r and b.shape[1] == r
                modules[path].weight += scale * (b @ a)
    return model


def assert_residual_init_equals_peft(mine, theirs, fresh) -> None:
    """A base-changing init (PiSSA, OLoRA, CorDA) against PEFT's on the same weights: the adapter tensors
    are PEFT's, lorakit's base weights are still ``fresh``'s, and W - s B0 A0 (what lorakit's adapter
    subtracts) is the residual PEFT wrote into its base weight, which differs from W."""
    from peft import get_peft_model_state_dict

    import lorakit as lk

    ours, peft_state = lk.io.adapter_state(mine), get_peft_model_state_dict(theirs)
    assert sorted(ours) == sorted(peft_state)
    for key, t in ours.items():
        torch.testing.assert_close(t, peft_state[key], rtol=1e-5, atol=1e-5, msg=key)
    weights = dict(fresh.named_parameters())
    for name, layer in lk.surgery.inject.adapted_layers(mine):
        w = layer.base.weight
        assert torch.equal(w, weights[f"{name}.weight"]), name  # lorakit leaves the base weight alone ...
        adapter = layer.adapters["default"]
        residual = w - adapter.scaling * (adapter.lora_B_init @ adapter.lora_A_init)  # ... and subtracts this
        peft_w = theirs.base_model.model.get_submodule(name).base_layer.weight  # PEFT writes it into W
        torch.testing.assert_close(residual, peft_w, rtol=1e-5, atol=1e-5, msg=name)
        assert (peft_w - w).abs().max() > 1e-3, name  # the residual differs from W: the check can fail


def write_products(path) -> None:
    """40 seeded "a*b=" -> "a*b" prompt/completion rows at ``path`` (JSONL), unless the file exists."""
    import random

    if path.exists():
        return
    rng = random.Random(0)
    rows = [{"prompt": f"{a}*{b}=", "completion": str(a * b)} for a, b in
            ((rng.randint(0, 20), rng.randint(0, 20)) for _ in range(40))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def trained_group_rates(tmp_path, adapter: dict) -> list[list[float]]:
    """One trainer step (tiny-llama, lr 1e-3) with ``adapter``; the sorted initial lr of every optimizer
    group, seen at each step's end: what the trainer really built from the method's groups."""
    from lorakit.train.callbacks import Callback
    from lorakit.train.config import RunConfig
    from lorakit.train.trainer import train

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    seen: list[list[float]] = []

    class Groups(Callback):
        def on_step_end(self, state) -> None:
            seen.append(sorted(g["initial_lr"] for g in state.optimizer.param_groups))

    cfg = RunConfig.from_dict({
        "model": {"name": "tiny-llama"},
        "data": {"train": str(data)},
        "adapter": adapter,
        "training": dict(max_steps=1, batch_size=4, grad_accumulation=1, lr=1e-3, warmup_steps=0, num_workers=0,
                         gradient_checkpointing=False, eval_at_start=False),
        "output": {"dir": str(tmp_path / "out"), "progress": False, "plot": False, "save_every": 0},
    })
    train(cfg, callbacks=[Groups()])
    return seen
