"""Small helpers shared by tests (importable as ``helpers``: tests/ is on pythonpath)."""

import torch


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
