"""DoRA's row norm ||W0 + sBA||_c is cached outside grad-enabled training (issue 14, item 5).

Each test counts the calls of ``DoraLinear.weight_norm`` per adapter and checks every output against an
uncached reference: a deep copy of the layer (a copy starts with an empty cache) and, once, the equation.
"""

import copy
import pickle
import weakref

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.adapters.dora import DoraLinear
from lorakit.quant import NF4Linear

D_IN, D_OUT = 64, 48


class _Calls:
    """``weight_norm`` calls per adapter; ``calls[adapter]``. Weakly keyed: a freed copy's count cannot
    pass to a new adapter that happens to get the same id."""

    def __init__(self) -> None:
        self.counts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getitem__(self, adapter: DoraLinear) -> int:
        return self.counts.get(adapter, 0)

    def reset(self) -> None:
        self.counts.clear()


@pytest.fixture
def norm_calls(monkeypatch) -> _Calls:
    calls = _Calls()
    original = DoraLinear.weight_norm

    def counted(self, *args, **kwargs):
        calls.counts[self] = calls[self] + 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DoraLinear, "weight_norm", counted)
    return calls


def _layer(kind: str = "fp32", dropout: float = 0.0) -> tuple[nn.Sequential, DoraLinear]:
    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT)
    base = {
        "fp32": lambda: lin,
        "bf16": lambda: lin.to(torch.bfloat16),
        "nf4": lambda: NF4Linear.from_linear(lin, compute_dtype=torch.float32),
    }[kind]()
    holder = lk.inject(
        nn.Sequential(base),
        lk.AdapterConfig(method="dora", r=4, alpha=8, dropout=dropout, target_modules=["0"]),
    )
    ad = holder[0].adapters["default"]
    with torch.no_grad():
        ad.lora_A.weight.normal_(0, 0.3)
        ad.lora_B.weight.normal_(0, 0.3)
        ad.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(D_OUT))
    return holder.eval(), ad


def _x(kind: str = "fp32") -> torch.Tensor:
    x = torch.randn(4, 3, D_IN, generator=torch.Generator().manual_seed(1))
    return x.bfloat16() if kind == "bf16" else x


def _uncached(holder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(holder)(x)


def _check(holder, ad, x, calls, want_calls: int) -> None:
    with torch.no_grad():
        y = holder(x)
    assert calls[ad] == want_calls
    assert (y.float() - _uncached(holder, x).float()).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kind", ["fp32", "bf16", "nf4"])
def test_eval_norm_is_computed_once_and_matches_the_equation(kind, norm_calls):
    holder, ad = _layer(kind)
    norm_calls.reset()  # init_magnitude computed one
    x = _x(kind)
    w = holder[0].access.dense_weight(torch.float32)
    v = w + ad.scaling * ad.lora_B.weight @ ad.lora_A.weight
    scale = ad.lora_magnitude_vector / torch.linalg.vector_norm(v, dim=1)
    want = scale * (x.float() @ v.T) + holder[0].base.bias
    for i in range(4):
        with torch.no_grad():
            y = holder(x)
        assert norm_calls[ad] == 1, f"call {i}: the norm was recomputed"
        tol = 2e-2 if kind == "bf16" else 1e-5
        torch.testing.assert_close(y.float(), want.detach(), atol=tol, rtol=tol)
    y2 = holder(x)  # eval with grad enabled (e.g. an evaluation loss): still the cached constant
    assert norm_calls[ad] == 1 and torch.equal(y2.detach(), y)


def test_every_kind_of_change_recomputes_the_norm(norm_calls):
    holder, ad = _layer("fp32")
    norm_calls.reset()  # init_magnitude computed one
    base = holder[0].base
    x = _x()
    _check(holder, ad, x, norm_calls, 1)
    n = 1
    changes = {
        "A in place": lambda: ad.lora_A.weight.add_(0.05),
        "B in place": lambda: ad.lora_B.weight.mul_(1.5),
        "m in place": lambda: ad.lora_magnitude_vector.add_(0.1),
        "base weight in place": lambda: base.weight.mul_(0.9),
        "base weight replaced (.data)": lambda: setattr(base.weight, "data", base.weight * 1.1),
        "A replaced (new Parameter)": lambda: setattr(ad.lora_A, "weight", nn.Parameter(ad.lora_A.weight / 2)),
    }
    for what, change in changes.items():
        with torch.no_grad():
            change()
        n += 1
        _check(holder, ad, x, norm_calls, n)
        _check(holder, ad, x, norm_calls, n)  # and cached again afterwards
        assert norm_calls[ad] == n, what
    ad.scaling = 3.0
    n += 1
    _check(holder, ad, x, norm_calls, n)
    holder.train()  # training with gradients: the norm is computed afresh every forward (today's behaviour)
    holder(x)
    holder(x)
    n += 2
    assert norm_calls[ad] == n
    holder.eval()  # train -> eval starts the cache afresh
    n += 1
    _check(holder, ad, x, norm_calls, n)


def test_optimizer_step_is_seen(norm_calls):
    holder, ad = _layer("fp32")
    norm_calls.reset()  # init_magnitude computed one
    x = _x()
    opt = torch.optim.SGD([p for p in holder.parameters() if p.requires_grad], lr=0.1)
    _check(holder, ad, x, norm_calls, 1)
    holder(x).square().sum().backward()  # eval mode, grad enabled: gradients still reach m, A and B
    opt.step()
    _check(holder, ad, x, norm_calls, 2)


@pytest.mark.parametrize("change", ["qweight in place", "absmax in place", "set_dense_weight"])
def test_nf4_packed_storage_changes_are_seen(change, norm_calls):
    holder, ad = _layer("nf4")
    norm_calls.reset()  # init_magnitude computed one
    base = holder[0].base
    x = _x()
    _check(holder, ad, x, norm_calls, 1)
    with torch.no_grad():
        if change == "qweight in place":
            base.qweight[: D_IN // 2].bitwise_xor_(0x11)
        elif change == "absmax in place":
            base.absmax[:4].add_(7)  # uint8 codes of the double-quantized absmax
        else:
            base.set_dense_weight(base.dense_weight(torch.float32) * 1.2, warn=False)
    _check(holder, ad, x, norm_calls, 2)


def test_reused_memory_with_equal_version_cannot_hit_a_stale_entry(norm_calls):
    """A new tensor at the same address, with the same _version, in the same Parameter object: an
    (id, data_ptr, _version) key collides here; the cache must not."""
    holder, ad = _layer("fp32")
    norm_calls.reset()  # init_magnitude computed one
    x = _x()
    p = ad.lora_B.weight
    buf = bytearray(p.numel() * 4)  # memory owned outside torch, so the next tensor gets the same address
    first = torch.frombuffer(buf, dtype=torch.float32).view(p.shape)
    first.copy_(p.detach())
    with torch.no_grad():
        p.data = torch.frombuffer(buf, dtype=torch.float32).view(p.shape)
    del first
    _check(holder, ad, x, norm_calls, 1)
    key = (id(p), p.data_ptr(), p._version)
    buf[:] = (torch.randn(p.shape) * 0.3).numpy().tobytes()  # new contents, written outside torch
    with torch.no_grad():
        p.data = torch.frombuffer(buf, dtype=torch.float32).view(p.shape)
    assert (id(p), p.data_ptr(), p._version) == key
    _check(holder, ad, x, norm_calls, 2)


def test_inference_mode_entry_is_not_reused_for_autograd(norm_calls):
    holder, ad = _layer("fp32")
    norm_calls.reset()  # init_magnitude computed one
    x = _x()
    with torch.inference_mode():
        want = holder(x)
    y = holder(x)  # an inference tensor cannot be saved for backward: this must not reuse it
    y.square().sum().backward()
    assert ad.lora_magnitude_vector.grad is not None
    torch.testing.assert_close(y.detach(), want, atol=1e-6, rtol=0)


def test_copies_and_pickles_start_with_an_empty_cache(norm_calls):
    holder, ad = _layer("fp32")
    norm_calls.reset()  # init_magnitude computed one
    x = _x()
    _check(holder, ad, x, norm_calls, 1)
    twin = copy.deepcopy(holder)
    twin_ad = twin[0].adapters["default"]
    with torch.no_grad():
        twin_ad.lora_B.weight.mul_(2.0)
        y = twin(x)
    assert norm_calls[twin_ad] == 1
    assert (y - _uncached(twin, x)).abs().max().item() <= 1e-6
    back = pickle.loads(pickle.dumps(holder))
    with torch.no_grad():
        assert torch.equal(back(x), holder(x))
