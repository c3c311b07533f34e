"""The mixed-batch stacks: the cache never serves a deleted or changed adapter (memory reuse forced, a changed
scaling), the embedding route gathers rows and builds no (batch, vocab, r) table, and the bins (rows grouped
per adapter, or one per row) give every row what that row gives alone (the single-adapter path, itself
checked against PEFT and the LoRA equation in tests/adapters)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from helpers import assert_rows_alone as assert_rows
from helpers import logits_alone, randomize_adapter
from lorakit.io import load_adapter, save_adapter
from lorakit.serving import BASE, mixed_forward
from lorakit.surgery.inject import adapted_layers
from lorakit.surgery.stacks import Stacks, add_low_rank, plan_bins


def with_adapters(specs, model_name="tiny-llama"):
    """specs: (name, r, targets); every adapter gets its own random weights."""
    model = lorakit.build_model(model_name)
    for i, (name, r, targets) in enumerate(specs):
        lorakit.inject(model, lorakit.AdapterConfig(r=r, alpha=16, target_modules=targets), name)
        randomize_adapter(model, name, seed=100 + i)
    return model.eval()


def assert_rows_alone(model, x, names):
    with torch.no_grad():
        mixed = mixed_forward(model, x, adapter_names=names).logits
    assert_rows(mixed, model, x, names)


QV = ["q_proj", "v_proj"]


def test_reloaded_adapter_under_the_same_name_in_reused_memory(tmp_path):
    """Delete adapter "x", load a different adapter under the name "x" whose tensors sit in the very storage
    of the deleted ones (what the allocator may do; forced here): rows of "x" get the new weights."""
    source = with_adapters([("x", 8, QV), ("y", 4, QV), ("z", 8, QV)])
    paths = {n: save_adapter(source, tmp_path / n, n) for n in ("x", "y", "z")}
    model = lorakit.build_model("tiny-llama").eval()
    load_adapter(model, paths["y"], "y")
    load_adapter(model, paths["x"], "x")  # the last one: after delete + load the layer order is the same
    x = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(3))
    names = ["x", "y", "x"]
    assert_rows_alone(model, x, names)  # builds and caches the stacks
    old = {
        path: (layer.adapters["x"].lora_A.weight, layer.adapters["x"].lora_B.weight)
        for path, layer in adapted_layers(model)
    }
    lorakit.delete_adapter(model, "x")
    load_adapter(model, paths["z"], "x")  # a different adapter, same name, same shapes
    with torch.no_grad():
        for path, layer in adapted_layers(model):
            new = layer.adapters["x"]
            for param, dead in zip((new.lora_A.weight, new.lora_B.weight), old[path]):
                values = param.detach().clone()
                param.data = dead.data  # the deleted tensor's memory ...
                param.data.copy_(values)  # ... now holding the new weights (as a reused block would)
                assert param.data_ptr() == dead.data_ptr()
    assert (logits_alone(model, x[:1], "x") - logits_alone(source, x[:1], "x")).abs().max() > 1e-2
    torch.testing.assert_close(logits_alone(model, x[:1], "x"), logits_alone(source, x[:1], "z"), atol=1e-5, rtol=0)
    assert_rows_alone(model, x, names)


def test_changed_scaling_is_seen():
    model = with_adapters([("x", 8, QV), ("y", 4, QV)])
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    assert_rows_alone(model, x, ["x", "y"])
    for _, layer in adapted_layers(model):
        layer.adapters["y"].scaling *= 3.0  # as a new alpha would
    assert_rows_alone(model, x, ["x", "y"])


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_embedding_route_gathers_rows_not_tables():
    model = with_adapters([("e0", 4, ["embed_tokens", "q_proj"]), ("e1", 4, ["embed_tokens"])])
    vocab = model.get_input_embeddings().base.num_embeddings
    names = ["e0", BASE, "e1", "e0", "e1", "e1"]
    x = torch.randint(0, vocab, (len(names), 5), generator=torch.Generator().manual_seed(5))
    assert_rows_alone(model, x, names)
    spy = _Shapes()
    with torch.no_grad(), spy:
        mixed_forward(model, x, adapter_names=names)
    assert (len(names), 5, vocab) in spy.shapes  # the spy sees the forward (the logits)
    tables = [s for s in spy.shapes if s[:2] == (len(names), vocab)]
    assert not tables, f"a per-row copy of the embedding table was built: {tables}"


@pytest.mark.parametrize(
    "names",
    [
        ["a0", "a0", "a1", "a1", "a2", "a2"],  # balanced and sorted: one bin per adapter, a view of the stack
        ["a2", "a0", "a1", "a0", "a2", "a1"],  # balanced, shuffled: rows permuted into bins and back
        ["a1", "a1", "a1", "a1", "a1", "a0", BASE],  # one big group: bins padded or one per row
        ["a0", "a1", "a2", BASE, "a0", "a1", "a2"],
    ],
)
def test_bins_give_each_row_its_adapter(names):
    model = with_adapters([("a0", 8, QV), ("a1", 2, ["q_proj", "o_proj"]), ("a2", 4, QV)])
    for length in (1, 6):  # decode-like and prefill-like rows (the bin size depends on the row length)
        x = torch.randint(0, 256, (len(names), length), generator=torch.Generator().manual_seed(length))
        assert_rows_alone(model, x, names)


def test_add_low_rank_equals_the_per_row_equation():
    """Against the equation row by row, y_i = out_i + x_i A_{slot_i} B_{slot_i}, for random row plans and row
    lengths that reach every layout: rows in bin order (fused), permuted, padded, copied factors, one per row;
    linear (base outputs in the stacks' dtype and in another) and embedding."""
    gen = torch.Generator().manual_seed(7)
    seen = set()
    for case in range(60):
        slots_n, k, d, r, vocab = 5, 6, 7, 3, 11
        embedding = case % 3 == 2
        a = torch.randn(slots_n, vocab if embedding else k, r, generator=gen, dtype=torch.float64)
        b = torch.randn(slots_n, r, d, generator=gen, dtype=torch.float64)
        a[-1], b[-1] = 0, 0  # the zero slot
        stacks = Stacks(0, [f"s{i}" for i in range(slots_n - 1)], {}, [], a, b, embedding, slots_n - 1)
        batch, tokens = int(torch.randint(2, 9, (1,), generator=gen)), [1, 4][case % 2]
        row_slots = torch.randint(0, slots_n, (batch,), generator=gen)
        if case % 4 == 0:
            row_slots = row_slots.sort().values
        if case % 6 == 3:  # balanced and interleaved, one token per row: grouped bins, rows permuted
            batch, tokens, row_slots = 6, 1, torch.tensor([0, 1, 2, 0, 1, 2])
        x = (
            torch.randint(0, vocab, (batch, tokens), generator=gen)
            if embedding
            else torch.randn(batch, tokens, k, generator=gen, dtype=torch.float64)
        )
        out_dtype = torch.float32 if case % 5 == 1 else torch.float64
        out = torch.randn(batch, tokens, d, generator=gen, dtype=torch.float64).to(out_dtype)
        bins = plan_bins(stacks, row_slots.tolist(), tokens)
        got = add_low_rank(stacks, bins, x, out)
        for i, s in enumerate(row_slots.tolist()):
            t = a[s][x[i]] if embedding else x[i] @ a[s]
            want = out[i].double() + t @ b[s]
            torch.testing.assert_close(
                got[i].double(), want, atol=1e-5, rtol=1e-5, msg=f"case {case} row {i}"
            )
        seen.add("view" if bins.b is not None else "copied")
        padded = bins.count * bins.n > batch
        seen.add("in order" if bins.src is None and bins.pos is None else "padded" if padded else "permuted")
        seen.add(f"n={'1' if bins.n == 1 else '>1'}")
    assert seen == {"view", "copied", "in order", "permuted", "padded", "n=1", "n=>1"}, seen


def test_repeated_rows_on_the_hook_path_see_every_change():
    """``model(x, adapter_names=...)`` keeps its routers per row plan across calls; between two calls with the
    same rows an optimizer-like in-place step, a new scaling and a swapped parameter are each seen."""
    model = with_adapters([("x", 8, QV), ("y", 4, QV)])
    x = torch.randint(0, 256, (4, 6), generator=torch.Generator().manual_seed(8))
    names = ["y", "x", "y", BASE]

    def check():
        with torch.no_grad():
            mixed = model(x, adapter_names=names).logits
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i], logits_alone(model, x[i : i + 1], name)[0], atol=1e-5, rtol=0)

    check()
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    with torch.no_grad():
        layer.adapters["y"].lora_B.weight.add_(0.5)  # an optimizer step
    check()
    layer.adapters["x"].scaling = 0.25
    check()
    fresh_b = torch.randn(layer.adapters["x"].lora_B.weight.shape, generator=torch.Generator().manual_seed(9))
    layer.adapters["x"].lora_B.weight = torch.nn.Parameter(fresh_b)  # the old tensor is dropped
    check()
