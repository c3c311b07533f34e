"""A small AdaLoRA model and a token batch, shared by the AdaLoRA budget and schedule tests."""

import torch

import lorakit as lk

TARGETS = ["q_proj", "v_proj"]


def adalora_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = lk.build_model("tiny-llama", seed=seed)
    cfg = dict(method="adalora", init_r=6, target_r=3, target_modules=TARGETS, alpha=8.0)
    cfg.update(kw)
    return lk.inject(m, lk.AdapterConfig(**cfg))


def token_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 8), generator=g)
