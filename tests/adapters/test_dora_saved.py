"""DoRA with dropout keeps no dense fp32 copy of the base weight for backward (issue 14, item 6).

PEFT's dropout form needs x_d W0^T; autograd used to save the dequantized (NF4) or up-cast (bf16) W0 for
its input gradient: 4 bytes per weight, 8x the NF4 storage, alive until backward. The product now goes
through ``WeightAccess.matmul``, which saves only what the base stores and re-materialises W0 in
backward. Gradients are checked against the equation written out on the dense weight.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit import weights
from lorakit.quant import NF4Linear

D_IN, D_OUT, P = 256, 192, 0.25


class RoundedLinear(nn.Module):
    """A quantized stand-in with the weight-access methods but no ``matmul`` of its own (as a
    bitsandbytes layer): WeightAccess.matmul dequantizes it again in backward."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", torch.round(linear.weight.detach() * 64).to(torch.int8))
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dense_weight(self, dtype=None):
        return self.codes.to(dtype or torch.float32) / 64

    def set_dense_weight(self, w):
        self.codes = torch.round(w * 64).to(torch.int8)

    def forward(self, x):
        return F.linear(x, self.dense_weight(x.dtype), self.bias)


def _layer(kind: str, method: str = "dora") -> nn.Sequential:
    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT)
    base = {
        "nf4": lambda: NF4Linear.from_linear(lin),  # compute dtype bf16, QLoRA's default
        "bf16": lambda: lin.to(torch.bfloat16),
        "fp32": lambda: lin,
        "rounded": lambda: RoundedLinear(lin),
    }[kind]()
    cfg = lk.AdapterConfig(method=method, r=8, alpha=16, dropout=P, target_modules=["0"])
    holder = lk.inject(nn.Sequential(base), cfg)
    ad = holder[0].adapters["default"]
    with torch.no_grad():
        ad.lora_A.weight.normal_(0, 0.2)
        ad.lora_B.weight.normal_(0, 0.2)
        if method == "dora":
            ad.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(D_OUT))
    return holder.train()


def _x(kind: str) -> torch.Tensor:
    x = torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(1))
    return (x.bfloat16() if kind == "bf16" else x).requires_grad_(True)


def _saved_for_backward(holder: nn.Module, x: torch.Tensor, autocast: bool) -> tuple[list[torch.Tensor], int]:
    """Tensors autograd saves in one forward that the model does not own already (its parameters and
    buffers are alive anyway), and the bytes of their storages."""
    own = {t.untyped_storage().data_ptr() for t in [*holder.parameters(), *holder.buffers()]}
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            holder(x)
    new = [t for t in saved if t.untyped_storage().data_ptr() not in own]
    nbytes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in new}
    return new, sum(nbytes.values())


@pytest.mark.parametrize(
    "kind, autocast",
    [("nf4", False), ("bf16", False), ("rounded", False), ("nf4", True), ("bf16", True), ("fp32", True)],
)
def test_dropout_path_saves_no_dense_copy_of_the_base_weight(kind, autocast):
    def dense(saved):  # (shape, dtype) of saved tensors as large as W0
        return sorted((tuple(t.shape), str(t.dtype)) for t in saved if t.numel() == D_IN * D_OUT)

    saved, new_bytes = _saved_for_backward(_layer(kind), _x(kind), autocast)
    if kind in ("nf4", "bf16"):
        assert ((D_IN, D_OUT), "torch.float32") not in dense(saved), f"{kind}: a dense fp32 W0 is saved"
    # DoRA adds no dense tensor to what LoRA on the same base saves (the base's own forward: a bf16 cast
    # of an fp32 weight under autocast; the stand-in's dequantized weight)
    lora_saved, _ = _saved_for_backward(_layer(kind, "lora"), _x(kind), autocast)
    assert dense(saved) == dense(lora_saved)
    if not dense(saved):  # what remains: per-token activations (6 tokens) and (d, r) factors, far below W0
        assert new_bytes < D_IN * D_OUT * 4 // 4, new_bytes


def _reference(holder: nn.Sequential, x: torch.Tensor, seed: int) -> torch.Tensor:
    """PEFT's dropout form written out on the dense fp32 W0 (the implementation before this change):
    y = base(x) + (scale - 1) x_d W0^T + scale s x_d A^T B^T,  scale = m / ||W0 + sBA||_c (detached)."""
    layer = holder[0]
    ad = layer.adapters["default"]
    w0 = layer.access.dense_weight(torch.float32)
    a, b, m, s = ad.lora_A.weight, ad.lora_B.weight, ad.lora_magnitude_vector, ad.scaling
    base_out = layer.base(x)
    torch.manual_seed(seed)
    xd = F.dropout(x.float(), P, training=True)
    scale = m / torch.linalg.vector_norm(w0 + s * b.detach() @ a.detach(), dim=1)
    y = base_out + (scale - 1) * (xd @ w0.T) + scale * s * (xd @ a.T @ b.T)
    return y.to(base_out.dtype)


@pytest.mark.parametrize("kind", ["nf4", "bf16", "bf16-chunked", "rounded", "fp32"])
def test_dropout_gradients_equal_the_dense_equation(kind, monkeypatch):
    if kind == "bf16-chunked":  # W0 cast in chunks of 3 rows in forward and backward
        monkeypatch.setattr(weights, "_CHUNK_ELEMENTS", 3 * D_IN)
        kind = "bf16"
    holder = _layer(kind)
    params = [p for p in holder.parameters() if p.requires_grad]
    g = torch.randn(2, 3, D_OUT, generator=torch.Generator().manual_seed(2))
    grads = []
    for run in ("lorakit", "reference"):
        x = _x(kind)
        torch.manual_seed(7)
        y = holder(x) if run == "lorakit" else _reference(holder, x, seed=7)
        (y.float() * g).sum().backward()
        grads.append([x.grad.float(), *(p.grad.clone() for p in params)])
        holder.zero_grad(set_to_none=True)
    for ours, want in zip(*grads):
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def _per_token_saved(method: str, dropout: float, d_in: int, d_out: int) -> float:
    """Bytes autograd saves per token for one adapted fp32 linear (slope between 32 and 64 tokens)."""
    sizes = []
    for n in (32, 64):
        torch.manual_seed(0)
        cfg = lk.AdapterConfig(method=method, r=8, alpha=16, dropout=dropout, target_modules=["0"])
        holder = lk.inject(nn.Sequential(nn.Linear(d_in, d_out, bias=False)), cfg).train()
        x = torch.randn(n, d_in, requires_grad=True)
        sizes.append(_saved_for_backward(holder, x * 1.0, autocast=False)[1])
    return (sizes[1] - sizes[0]) / 32


@pytest.mark.parametrize("dropout", [0.0, P])
def test_planner_dora_activation_term_equals_what_is_saved(dropout):
    """The planner's per-token tally adds for DoRA exactly what DoRA saves beyond LoRA: one output-sized
    product for the magnitude's gradient (base(x), or x_d W0^T under dropout), and nothing per weight."""
    from lorakit.planner.arch import Matrix, resolve_arch
    from lorakit.planner.cost import Setup, layer_activation_bytes

    arch = resolve_arch("llama-15m")
    m = Matrix("model.layers.0.self_attn.q_proj", arch.hidden, arch.q_dim, False, 0)

    def planned(method: str) -> float:
        setup = Setup(method=method, r=8, precision="fp32", lora_dropout=dropout)
        return layer_activation_bytes(arch, setup, [(m, 8)])

    dora, lora = (_per_token_saved(method, dropout, m.d_in, m.d_out) for method in ("dora", "lora"))
    assert planned("dora") - planned("lora") == dora - lora
