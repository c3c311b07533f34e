"""CorDA initialisation (Yang et al. 2024, https://arxiv.org/abs/2406.05223): LoRA factors from the SVD of
the weight times the covariance of the layer's inputs on calibration data (``AdapterConfig.init="corda"``).

For a linear layer W (out, in) with input covariance C (in, in), gathered by running calibration rows
through the base model (:func:`collect_covariances`), CorDA decomposes W C = U S V^T and maps the right
factors back, V_C = C^-1 V, so that W = U S V_C^T exactly. Two modes (``method_options.corda_method``):

- ``ipm`` (instruction-previewed, PEFT's default): the adapter takes the r LARGEST components, the
  directions the calibration task's inputs use most, and trains them;
- ``kpm`` (knowledge-preserved): the adapter takes the r SMALLEST, leaving the components the
  calibration data (the knowledge to keep) relies on in the frozen residual.

A = sqrt(S_r / s) V_C,r^T and B = U_r sqrt(S_r / s), so s B A is that rank-r part of W; training runs on
the residual W - s B0 A0, as PiSSA does. The base weight is left as it is: the adapter subtracts
s B0 A0 x itself (``lora_init.remember_init``) and the saved file is converted to a rank-2r LoRA right
on the unchanged base (``lorakit.io.conversion``).

The statistics follow PEFT 0.21's ``preprocess_corda`` so both give the same adapter from the same
rows: each calibration row runs alone (batch of one), its layer input X (tokens, in) in fp32 is divided
by |max(X)| (the absolute value of the largest entry), and C is the mean of X^T X over the rows. C is
damped before inverting: C + d mean(diag C) I with d = 0.01, doubled until ||C' C'^-1 - I||_F < 0.05.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lorakit.adapters.lora_init import dense_linear, remember_init
from lorakit.config import AdapterConfig, ConfigError
from lorakit.methods import Option
from lorakit.validation import check_choice, check_number
from lorakit.weights import WeightAccess

MODES = ("ipm", "kpm")


def _mode(field_name: str, value: object) -> None:
    check_choice(field_name, value, MODES)


def _rows(field_name: str, value: object) -> None:
    check_number(field_name, value, lambda v: v >= 1 and float(v).is_integer(), "a whole number of rows >= 1")


CORDA_OPTIONS = {
    "corda_method": Option("ipm", _mode, "CorDA: ipm (adapt the largest components; PEFT's default) or kpm "
                           "(adapt the smallest, keep what the calibration data uses)"),
    "corda_rows": Option(256, _rows, "CorDA: training rows the trainer runs (one at a time) for the covariances"),
}


# input covariances by module path, while ``calibration`` is active
_COVARIANCES: list[Mapping[str, torch.Tensor]] = []


@contextlib.contextmanager
def calibration(covariances: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within this block, ``init="corda"`` builds each module's adapter from ``covariances[path]``
    (:func:`collect_covariances`)."""
    _COVARIANCES.append(covariances)
    try:
        yield
    finally:
        _COVARIANCES.pop()


@torch.no_grad()
def collect_covariances(
    model: nn.Module, names: Sequence[str], run: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """The input covariance (in, in), fp32, of each module in ``names`` while ``run()`` calls the model.

    Every forward call of a module adds one sample: its input, flattened to (tokens, in), fp32, divided by
    |max| of its entries, contributes X^T X; the result is the mean over calls. ``run`` should call the
    model on one calibration row at a time (as PEFT's CorDA expects). The model is put in eval mode for
    the calls and given back in the mode it had."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            top = x.max().abs()
            if not torch.isfinite(x).all() or top == 0:
                raise ConfigError(
                    f"init='corda': the calibration input of {name!r} is "
                    + ("all zero" if top == 0 else "not finite")
                    + "; check the calibration rows"
                )
            x = x / top
            cov = x.t() @ x
            sums[name] = sums[name] + cov if name in sums else cov
            counts[name] += 1

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if counts[n] == 0]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"init='corda': the calibration run never called {missing[0]!r}{more}")
    return {n: sums[n] / counts[n] for n in names}


def damped_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C', C'^-1) with C' = C + d mean(diag C) I, d from 0.01 doubled until C' C'^-1 is I to 0.05 (F-norm)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    mean_diag = torch.diagonal(cov).mean()
    damp = 0.01
    for _ in range(60):  # d reaches 1e16 x the mean diagonal long before this ends
        fixed = cov + eye * (mean_diag * damp)
        inv = torch.linalg.inv(fixed)
        if float(torch.dist(fixed @ inv, eye)) < 0.05:
            return fixed, inv
        damp *= 2
    raise ConfigError("init='corda': the input covariance cannot be inverted even with heavy damping")


def corda_factors(
    weight: torch.Tensor, cov: torch.Tensor, r: int, scaling: float, mode: str = "ipm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with scaling * B A the rank-r CorDA part of ``weight`` (module docstring)."""
    if mode not in MODES:
        raise ConfigError(f"method_options.corda_method={mode!r}; expected one of {', '.join(MODES)}")
    fixed, inv = damped_inverse(cov.float())
    u, s, vh = torch.linalg.svd(weight.float() @ fixed, full_matrices=False)
    v = (vh @ inv).t()  # (in, min)
    keep = slice(0, r) if mode == "ipm" else slice(s.shape[0] - r, s.shape[0])
    root = (s[keep] / scaling).sqrt()
    return v[:, keep].t() * root[:, None], u[:, keep] * root[None, :]


@torch.no_grad()
def corda_init(adapter: nn.Module, access: WeightAccess, module_name: str, cfg: AdapterConfig | None = None) -> None:
    """CorDA on a LoraLinear: A, B from W and the module's calibration covariance (mode:
    ``cfg.method_options.corda_method``, default ipm); the adapter then subtracts s B0 A0 (training runs
    on the residual; the base weight is untouched)."""
    mode = cfg.option("corda_method") if cfg is not None else "ipm"
    w = dense_linear(access, module_name, "corda", adapter.r)
    cov = next((c[module_name] for c in reversed(_COVARIANCES) if module_name in c), None)
    if cov is None:
        raise ConfigError(
            f"init='corda' needs the input covariance of {module_name!r} from calibration rows: train with "
            "lorakit train (it calibrates on method_options.corda_rows training rows), or inject inside "
            "lorakit.adapters.corda.calibration(collect_covariances(model, names, run))"
        )
    if tuple(cov.shape) != (w.shape[1], w.shape[1]):
        raise ConfigError(
            f"init='corda': the covariance given for {module_name!r} is {tuple(cov.shape)}; its input has "
            f"{w.shape[1]} features"
        )
    a, b = corda_factors(w, cov.to(w.device), adapter.r, adapter.scaling, mode)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ConfigError(f"init='corda': the factors of {module_name!r} are not finite (degenerate covariance)")
    adapter.lora_A.weight.copy_(a)
    adapter.lora_B.weight.copy_(b)
    remember_init(adapter)
