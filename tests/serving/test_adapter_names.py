"""``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` on any model carrying
lorakit adapters (after ``inject`` or ``load_adapter``, without any enable call), also on a deep copy: every
row equals that row run alone with its adapter set (``set_adapter``; the single-adapter path is itself checked
against PEFT and the LoRA equation in tests/adapters). The adapters have different random weights, so a row
served by the wrong adapter is seen."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from helpers import assert_rows_alone as assert_rows
from helpers import logits_alone, randomize_adapter
from lorakit.io import load_adapter, save_adapter
from lorakit.serving import BASE, MixedBatchError
from lorakit.surgery.inject import adapted_layers

TARGETS = ["q_proj", "v_proj"]


def injected(ranks=(8, 8)):
    model = lorakit.build_model("tiny-llama")
    for i, r in enumerate(ranks):
        name = f"a{i}"
        lorakit.inject(model, lorakit.AdapterConfig(r=r, alpha=16, target_modules=TARGETS), name)
        randomize_adapter(model, name, seed=10 + i)
    return model.eval()


def assert_rows_alone(model, x, names):
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
    assert_rows(mixed, model, x, names)
    assert all(layer.row_routing is None for _, layer in adapted_layers(model))


def tokens(rows, length=9, seed=1):
    return torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


NAMES = ["a0", "a1", BASE, "a1", "a0"]


def test_forward_after_inject_routes_every_row():
    model = injected()
    x = tokens(len(NAMES))
    assert (logits_alone(model, x[:1], "a0") - logits_alone(model, x[:1], "a1")).abs().max() > 1e-2  # the check can fail
    lorakit.set_adapter(model, "a1")  # the active adapter must not leak into the other rows
    assert_rows_alone(model, x, NAMES)


def test_forward_after_load_adapter_of_different_ranks(tmp_path):
    source = injected(ranks=(4, 8))
    paths = {n: save_adapter(source, tmp_path / n, n) for n in ("a0", "a1")}
    model = lorakit.build_model("tiny-llama").eval()
    for n, path in paths.items():
        load_adapter(model, path, n)
    x = tokens(len(NAMES))
    assert_rows_alone(model, x, NAMES)
    torch.testing.assert_close(logits_alone(model, x, "a0"), logits_alone(source, x, "a0"), atol=1e-6, rtol=0)


def test_deepcopy_routes_with_its_own_layers():
    model = injected()
    twin = copy.deepcopy(model)
    randomize_adapter(twin, "a0", seed=99)  # the copy's a0 now differs from the original's
    x = tokens(len(NAMES))
    assert_rows_alone(twin, x, NAMES)
    assert_rows_alone(model, x, NAMES)
    assert (logits_alone(twin, x[:1], "a0") - logits_alone(model, x[:1], "a0")).abs().max() > 1e-2


def test_generate_with_adapter_names():
    model = injected()
    for target in (model, copy.deepcopy(model)):
        prompts = tokens(3, length=4, seed=2)
        names = ["a1", BASE, "a0"]
        with torch.no_grad():
            out = target.generate(prompts, adapter_names=names, max_new_tokens=8, do_sample=False)
        for i, name in enumerate(names):
            with torch.no_grad():
                if name == BASE:
                    with lorakit.disabled(target):
                        ref = target.generate(prompts[i : i + 1], max_new_tokens=8, do_sample=False)
                else:
                    lorakit.set_adapter(target, name)
                    ref = target.generate(prompts[i : i + 1], max_new_tokens=8, do_sample=False)
            assert out[i].tolist() == ref[0].tolist(), name
        assert all(layer.row_routing is None for _, layer in adapted_layers(target))
    lorakit.set_adapter(model, "a0")
    with torch.no_grad():  # two return sequences per prompt: each repeats its prompt's adapter
        two = model.generate(
            prompts[:2],
            adapter_names=["a1", "a0"],
            max_new_tokens=5,
            do_sample=False,
            num_beams=2,
            num_return_sequences=2,
        )
        lorakit.set_adapter(model, "a1")
        ref = model.generate(
            prompts[:1], max_new_tokens=5, do_sample=False, num_beams=2, num_return_sequences=2
        )
    assert two[:2].tolist() == ref.tolist()


def test_errors_leave_no_routing_installed():
    model = injected()
    x = tokens(2)
    lorakit.set_adapter(model, "a1")
    plain = logits_alone(model, x, "a1")
    with pytest.raises(MixedBatchError, match="no adapter named 'nope'"):
        model(x, adapter_names=["nope", "a0"])
    with pytest.raises(MixedBatchError, match="3 rows but adapter_names has 2"):
        model(tokens(3), adapter_names=["a0", "a1"])
    with pytest.raises(IndexError):  # token id past the vocabulary: fails inside forward
        model(torch.full((2, 3), 10**6), adapter_names=["a0", BASE])
    assert all(layer.row_routing is None for _, layer in adapted_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain, atol=0, rtol=0)
    model.train()
    with pytest.raises(MixedBatchError, match="inference"):
        model(x, adapter_names=["a0", "a1"])


def test_unload_removes_the_routing():
    model = injected()
    lorakit.unload(model, merge=False)
    assert not model._forward_pre_hooks and not model._forward_hooks and "generate" not in model.__dict__


def test_routing_built_in_inference_mode_also_serves_grad_mode():
    """Stacks and row indices are cached across calls: built under inference_mode they must still work
    where autograd saves them (inputs that require grad, e.g. attribution on an eval model)."""
    model = injected()
    x = tokens(2)
    with torch.inference_mode():
        first = model(x, adapter_names=["a0", "a1"]).logits
    embeds = model.get_input_embeddings()(x).detach().requires_grad_(True)
    again = model(inputs_embeds=embeds, adapter_names=["a0", "a1"]).logits
    again.sum().backward()
    torch.testing.assert_close(again.detach(), first, atol=1e-5, rtol=0)
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_deleting_the_last_adapter_leaves_a_plain_model():
    """After load/inject then delete of every adapter, no routing hook or generate wrapper is left."""
    model = lorakit.build_model("tiny-llama")
    plain_pre, plain_post = dict(model._forward_pre_hooks), dict(model._forward_hooks)
    lorakit.inject(model, lorakit.AdapterConfig(r=4))
    lorakit.delete_adapter(model, "default")
    assert dict(model._forward_pre_hooks) == plain_pre and dict(model._forward_hooks) == plain_post
    assert "generate" not in vars(model)
