"""AdaLoRA: adaptive budget allocation over SVD-shaped updates (Zhang et al., ICLR 2023,
https://arxiv.org/abs/2303.10512).

Each adapted matrix gets ΔW = P diag(λ) Q with P (out, r), λ (r,), Q (r, in), r = init_r; λ = 0 at init so
training starts at the base; P and Q as ``AdapterConfig.init`` says (PEFT's N(0, 0.02) or orthonormal:
``adalora_setup``). The layer computes (PEFT's SVDLinear)

    h = W0 x + (alpha / (ranknum + 1e-5)) * P (λ ⊙ (Q x))

with ``ranknum = init_r``, the number of ranks the matrix started with, not the count still kept: PEFT sets
ranknum once at layer creation, never updates it when it masks, and copies it when it loads a pruned adapter
(peft/tuners/adalora/layer.py, model.py ``resize_modules_by_rank_pattern``). So pruning a singular value
removes its term without rescaling the others. Names follow PEFT: Q = ``lora_A`` (r, in), λ = ``lora_E`` (r, 1),
P = ``lora_B`` (out, r), saved without a ``.weight`` suffix.

Pruning is driven by :class:`AdaLoraController` (a trainer callback, :class:`AdaLoraCallback`, or one call
per step in your own loop: ``controller.step(step)`` after ``optimizer.step()``, before ``zero_grad()``) with
the budget and scores of ``lorakit.adapters.adalora_budget``. A pruned singular value is zeroed and kept at
zero after every later step until a masking step selects it again (its gradient still feeds its importance
score, so the paper's reactivation can happen). Saving stores only the kept ranks.

The registry entry (config rules, callbacks) is at the end of this file; the PEFT format in adalora_peft.py.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.adalora_budget import BudgetSchedule, RankAllocator, resolve_schedule
from lorakit.adapters.adalora_peft import ADALORA_PEFT
from lorakit.adapters.adalora_setup import ADALORA_INITS, ADALORA_LR_OPTIONS, adalora_groups, reset_adalora
from lorakit.adapters.base import adapter_input
from lorakit.callbacks import Callback, TrainState
from lorakit.config import AdapterConfig, ConfigError
from lorakit.methods import Method, Option, register
from lorakit.state import active_adapter, adapter_configs, state_of
from lorakit.validation import check_choice
from lorakit.weights import WeightAccess

_KEYS = ("lora_A", "lora_E", "lora_B")


class AdaLoraLinear(nn.Module):
    """AdaLoRA on a linear map (nn.Linear, GPT-2 Conv1D or a quantized linear).

    Args:
        in_features, out_features: k and d of the base weight W0 (d, k).
        init_r: ranks at the start (and ``ranknum`` of the scaling). alpha: scaling numerator.
        dropout: dropout on the adapter input. dtype, device: of the adapter parameters (fp32 default).
        init: how P and Q start ("default", "gaussian", "orthogonal": ``adalora_setup``); λ = 0.

    Attributes:
        rank_mask: bool (init_r,), the singular values still kept (all True until the first pruning).
        compact: True when the parameters hold only the kept ranks (after loading a pruned adapter).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        init_r: int,
        alpha: float,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        init: str = "default",
    ) -> None:
        super().__init__()
        self.init_r, self.alpha = init_r, alpha
        self.ranknum = float(init_r)
        self.scaling = alpha / (self.ranknum + 1e-5)
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Parameter(torch.empty(init_r, in_features, dtype=dtype, device=device))  # Q (r, k)
        self.lora_E = nn.Parameter(torch.zeros(init_r, 1, dtype=dtype, device=device))  # λ (r, 1)
        self.lora_B = nn.Parameter(torch.empty(out_features, init_r, dtype=dtype, device=device))  # P (d, r)
        reset_adalora(self.lora_A, self.lora_E, self.lora_B, init)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer(
            "rank_mask", torch.ones(init_r, dtype=torch.bool, device=device), persistent=False
        )
        self.compact = False

    @property
    def r(self) -> int:
        """Ranks currently kept."""
        return int(self.rank_mask.sum())

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, access: WeightAccess) -> torch.Tensor:
        dropping = self.training and not isinstance(self.dropout, nn.Identity)
        x = self.dropout(adapter_input(x, self.lora_A.dtype, cast=dropping))  # (..., k)
        q = F.linear(x, self.lora_A * self.lora_E)  # (..., r): λ ⊙ Q x
        return base_out + (F.linear(q, self.lora_B) * self.scaling).to(base_out.dtype)  # (..., d)

    def delta_weight(self, access: WeightAccess) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling  # (d, k)

    @torch.no_grad()
    def apply_mask(self, mask: torch.Tensor | None = None) -> None:
        """Set the kept ranks to ``mask`` (bool (init_r,)) if given, and zero every pruned λ."""
        if mask is not None:
            if self.compact:
                raise RuntimeError("AdaLoRA: cannot re-prune an adapter loaded with only its kept ranks")
            self.rank_mask.copy_(mask.to(self.rank_mask.device))
        if not self.compact:
            self.lora_E.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)

    @torch.no_grad()
    def compact_(self) -> None:
        """Drop the pruned ranks from the parameters (done at the end of training): the adapter then
        computes exactly what its saved file holds, and costs only its kept ranks. ``ranknum`` is kept."""
        if self.compact or bool(self.rank_mask.all()):
            return
        keep = self.rank_mask
        for key, value in (
            ("lora_A", self.lora_A[keep]),
            ("lora_E", self.lora_E[keep]),
            ("lora_B", self.lora_B[:, keep]),
        ):
            setattr(self, key, nn.Parameter(value.clone(), requires_grad=getattr(self, key).requires_grad))
        self.compact = True

    def orth_penalty(self) -> torch.Tensor:
        """||PᵀP - I||²_F + ||QQᵀ - I||²_F (the paper's Eq. 4, squared Frobenius norms)."""
        return sum(n**2 for n in self.orth_norms())

    def orth_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||QQᵀ - I||_F, ||PᵀP - I||_F), unsquared: the terms PEFT's penalty averages."""
        a, b = self.lora_A, self.lora_B
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return torch.linalg.matrix_norm(a @ a.t() - eye), torch.linalg.matrix_norm(b.t() @ b - eye)

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The kept ranks only (PEFT saves an AdaLoRA adapter the same way, with its rank_pattern)."""
        if self.compact or bool(self.rank_mask.all()):
            return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}
        keep = self.rank_mask
        return {"lora_A": self.lora_A[keep], "lora_E": self.lora_E[keep], "lora_B": self.lora_B[:, keep]}

    @torch.no_grad()
    def load_peft_state(
        self, state: dict[str, torch.Tensor], rank_mask: torch.Tensor | list[bool] | None = None
    ) -> None:
        """Load ``lora_A`` (k, in), ``lora_E`` (k, 1), ``lora_B`` (out, k) for any k <= init_r.

        With k < init_r the parameters are resized to the k kept ranks (``compact``) and ``ranknum`` stays
        init_r, as in PEFT. ``rank_mask`` (init_r booleans with k True: which of the original ranks these are,
        PEFT's rank_pattern entry) is recorded if given; else the first k are marked kept.
        """
        missing, extra = sorted(set(_KEYS) - set(state)), sorted(set(state) - set(_KEYS))
        if missing or extra:
            raise KeyError(f"adalora: missing tensors {missing}, unexpected tensors {extra}")
        k = state["lora_E"].shape[0]
        expected = {"lora_A": (k, self.in_features), "lora_E": (k, 1), "lora_B": (self.out_features, k)}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(
                    f"adalora.{key}: shape {tuple(state[key].shape)} does not match the model's {shape}"
                )
        if k > self.init_r:
            raise ValueError(
                f"adalora.lora_E: {k} ranks stored but init_r={self.init_r}; expected at most init_r"
            )
        mask = torch.zeros(self.init_r, dtype=torch.bool)
        if rank_mask is not None:
            mask = torch.as_tensor(rank_mask, dtype=torch.bool).view(-1)
            if mask.numel() != self.init_r or int(mask.sum()) != k:
                raise ValueError(
                    f"adalora: rank_pattern entry has {mask.numel()} entries with {int(mask.sum())} "
                    f"kept; expected {self.init_r} entries with {k} kept (the stored ranks)"
                )
        else:
            mask[:k] = True
        for key in _KEYS:
            old = getattr(self, key)
            value = state[key].to(device=old.device, dtype=old.dtype)
            if old.shape == value.shape:
                old.copy_(value)
            else:
                setattr(self, key, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
        self.rank_mask.copy_(mask.to(self.rank_mask.device))
        self.compact = k < self.init_r

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, init_r={self.init_r}, kept={self.r}, alpha={self.alpha}"


def _build_adalora(access: WeightAccess, cfg: AdapterConfig, module_name: str) -> nn.Module:
    for name in ("rank_pattern", "alpha_pattern"):
        if getattr(cfg, name):
            raise ConfigError(
                f"{name} cannot be combined with method='adalora': every matrix starts at init_r "
                f"with the same alpha and the budget decides the ranks"
            )
    return AdaLoraLinear(
        access.in_features, access.out_features, cfg.init_r, cfg.alpha, cfg.dropout, device=access.device,
        init=cfg.init,
    )


def adalora_layers(model: nn.Module, adapter_name: str) -> dict[str, AdaLoraLinear]:
    """Adapted layer path -> the AdaLoRA adapter named ``adapter_name`` on it.

    An adapted layer holds its adapters as ``<layer path>.adapters.<adapter name>`` (lorakit.surgery.layer);
    walking the modules by that path keeps this layer from importing surgery, which sits above it."""
    suffix = f".adapters.{adapter_name}"
    return {
        f".{path}"[: -len(suffix)].lstrip("."): module
        for path, module in model.named_modules()
        if isinstance(module, AdaLoraLinear) and f".{path}".endswith(suffix)
    }


def resolve_adapter(model: nn.Module, adapter_name: str | None) -> tuple[str, AdapterConfig]:
    """(name, config) of the model's named (or active) adapter; raises unless it is an AdaLoRA adapter."""
    configs = adapter_configs(model)
    name = adapter_name or active_adapter(model)
    if name is None or name not in configs:
        raise ConfigError(f"adapter {name!r} is not in the model (adapters: {sorted(configs)})")
    if configs[name].method != "adalora":
        raise ConfigError(f"adapter {name!r} has method={configs[name].method!r}; expected 'adalora'")
    return name, configs[name]


def rank_pattern(model: nn.Module, adapter_name: str | None = None) -> dict[str, list[bool]]:
    """PEFT's rank_pattern: ``"<module path>.lora_E"`` -> init_r booleans (True = singular value kept)."""
    name, _ = resolve_adapter(model, adapter_name)
    return {f"{path}.lora_E": a.rank_mask.tolist() for path, a in adalora_layers(model, name).items()}


class AdaLoraController:
    """AdaLoRA's per-step logic for one adapter: importance update, budget masking, orthogonal penalty.

    In your own loop (the same calls the trainer's :class:`AdaLoraCallback` makes)::

        ctl = AdaLoraController(model, total_step=num_steps)
        for step in range(1, num_steps + 1):
            loss = model(**batch).loss + ctl.orth_loss()
            loss.backward(); optimizer.step()
            ctl.step(step)            # after optimizer.step(), before optimizer.zero_grad()
            optimizer.zero_grad()

    ``step`` counts completed optimizer steps from 1. ``total_step`` defaults to the config's. An adapter
    loaded with pruned ranks (``compact``) trains with its ranks fixed: ``step`` only keeps masks. Call
    ``finalize()`` after the last step to drop the pruned ranks before saving or serving.
    """

    def __init__(
        self, model: nn.Module, adapter_name: str | None = None, total_step: int | None = None
    ) -> None:
        self.model = model
        self.adapter_name, self.cfg = resolve_adapter(model, adapter_name)
        self.layers = adalora_layers(model, self.adapter_name)
        if not self.layers:
            raise ConfigError(f"adapter {self.adapter_name!r}: no AdaLoRA layers found in the model")
        self.fixed = any(a.compact for a in self.layers.values())
        self.allocator = RankAllocator(
            {n: (a.lora_A, a.lora_E, a.lora_B) for n, a in self.layers.items()},
            self.cfg.beta1,
            self.cfg.beta2,
        )
        self.schedule: BudgetSchedule | None = None
        self.budget = sum(a.r for a in self.layers.values())
        self.final_done = False  # the final masking (step >= T - tfinal) has been applied
        if total_step is not None or self.cfg.total_step is not None:
            self.set_total_step(total_step if total_step is not None else self.cfg.total_step)

    def set_total_step(self, total_step: int) -> None:
        """Fix T (checked against tinit + tfinal) and record it in the model's config (saved with it)."""
        if isinstance(total_step, bool) or not isinstance(total_step, int) or total_step <= 0:
            raise ConfigError(f"total_step={total_step!r} is invalid; expected a positive integer")
        n = len(self.layers)
        tinit, tfinal, delta_t = resolve_schedule(self.cfg.tinit, self.cfg.tfinal, self.cfg.delta_t, total_step)
        self.schedule = BudgetSchedule(
            self.cfg.init_r * n, self.cfg.target_r * n, tinit, tfinal, total_step, delta_t
        )
        resolved = dict(total_step=total_step, tinit=tinit, tfinal=tfinal, delta_t=delta_t)
        if any(getattr(self.cfg, k) != v or type(getattr(self.cfg, k)) is not int for k, v in resolved.items()):
            # the steps it ran with, saved with the adapter (PEFT's adapter_config.json holds step counts)
            self.cfg = self.cfg.replace(**resolved)
            state = state_of(self.model)
            state.configs = {**state.configs, self.adapter_name: self.cfg}

    def schedule_summary(self) -> dict[str, Any]:
        """The resolved schedule in steps (for the run summary and the rank report); {} before T is set."""
        s = self.schedule
        if s is None:
            return {}
        return {
            "total_step": s.total_step, "tinit": s.tinit, "tfinal": s.tfinal, "delta_t": s.delta_t,
            "final_masking_step": s.final_step, "init_budget": s.init_budget, "target_budget": s.target_budget,
            "orth_form": self.cfg.option("orth_form"), "orth_reg_weight": self.cfg.orth_reg_weight,
        }

    def orth_loss(self) -> torch.Tensor:
        """The orthogonal regulariser, weight γ = ``orth_reg_weight``, in the form ``method_options.orth_form``:

        * "squared" (default): γ x mean over the n matrices of R(P, Q) = ||PᵀP - I||²_F + ||QQᵀ - I||²_F.
          R is the paper's Eq. 4; the paper adds γ Σ_k R(P_k, Q_k) (a sum over matrices), which is this
          form with γ n in place of γ; the mean keeps one γ right for models of any depth.
        * "peft": γ x mean over the 2n tensors of the unsquared norms ||QQᵀ - I||_F and ||PᵀP - I||_F,
          what PEFT's ``AdaLoraModel.forward`` adds (taken from the paper's released code; PEFT's default
          γ is 0.5): the same loss, hence the same training trajectory as PEFT.
        """
        if self.cfg.option("orth_form") == "peft":
            norms = [n for a in self.layers.values() for n in a.orth_norms()]
            return self.cfg.orth_reg_weight * sum(norms) / len(norms)
        total = sum(a.orth_penalty() for a in self.layers.values())
        return self.cfg.orth_reg_weight * total / len(self.layers)

    def step(self, step: int) -> int:
        """Update importance and prune to the budget b(step) when due; returns the budget in force.

        The final masking (to the target budget) is owed from step T - tfinal on until it is done, so a
        call that never came for that exact step (the trainer skips steps with non-finite gradients, and
        calls nothing for them) is caught up by the next call, or by the trainer's end of training."""
        if self.schedule is None:
            raise ConfigError(
                "AdaLoRA: total_step is not set; pass total_step= to AdaLoraController or set "
                "AdapterConfig.total_step (the trainer sets it from its step count)"
            )
        final = step >= self.schedule.final_step
        if not self.fixed and not self.final_done:
            # PEFT scores only before the final step; a run too short to have scored once (the final
            # masking at step 1) scores this step's gradients rather than masking on nothing
            if not final or not self.allocator.ipt_avg:
                self.allocator.update_importance()
            if final or self.schedule.is_masking_step(step):
                self.budget = self.schedule.budget(step)
                for name, keep in self.allocator.masks_for_budget(self.budget).items():
                    self.layers[name].apply_mask(keep)
                if final:
                    self.allocator.reset()
                    self.final_done = True
                return self.budget
        for a in self.layers.values():  # pruned λ stay zero between maskings
            a.apply_mask()
        return self.budget

    def finalize(self) -> dict[str, int]:
        """End of training: drop every pruned rank from the parameters (``AdaLoraLinear.compact_``), so the
        model computes exactly what ``save_adapter`` stores; further training keeps these ranks fixed.
        Rebuild the optimizer if training continues (the parameters are new tensors). Returns ``ranks()``."""
        for a in self.layers.values():
            a.compact_()
        self.fixed = True
        return self.ranks()

    def ranks(self) -> dict[str, int]:
        """Module path -> singular values kept."""
        return {n: a.r for n, a in self.layers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "final_done": self.final_done,
            "masks": {n: a.rank_mask.clone() for n, a in self.layers.items()},
            "allocator": self.allocator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget = int(state["budget"])
        # states saved before "final_done" existed: the EMAs are dropped only by the final masking
        pruned = any(not bool(m.all()) for m in state["masks"].values())
        self.final_done = bool(state.get("final_done", pruned and not state["allocator"].get("ipt_avg")))
        for name, mask in state["masks"].items():
            if name not in self.layers:
                raise KeyError(f"AdaLoRA state: layer {name!r} is not in the model")
            if not self.fixed:
                self.layers[name].apply_mask(mask.bool())
        self.allocator.load_state_dict(state["allocator"])


class AdaLoraCallback(Callback):
    """Runs :class:`AdaLoraController` inside lorakit's trainer: penalty in ``extra_loss``, budget step in
    ``on_step_end``. T is the config's ``total_step`` or else the trainer's step count."""

    def __init__(
        self, model: nn.Module, adapter_name: str | None = None, cfg: AdapterConfig | None = None
    ) -> None:
        self.controller = AdaLoraController(model, adapter_name)

    def on_train_begin(self, state: TrainState) -> None:
        ctl = self.controller
        if ctl.cfg.total_step is None:
            if not state.total_steps:
                raise ConfigError(
                    "AdaLoRA: total_step is not set in the adapter config and the trainer "
                    "reports no total step count"
                )
            ctl.set_total_step(int(state.total_steps))
        elif state.total_steps and state.total_steps < ctl.cfg.total_step - ctl.cfg.tfinal:
            warnings.warn(
                f"AdaLoRA: training stops at step {state.total_steps}, before the final masking at "
                f"total_step - tfinal = {ctl.cfg.total_step - ctl.cfg.tfinal}; ranks stay unfinished",
                stacklevel=2,
            )
        state.summary["adalora_schedule"] = ctl.schedule_summary()

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        return self.controller.orth_loss() if self.controller.cfg.orth_reg_weight > 0 else None

    def on_step_end(self, state: TrainState) -> None:
        state.metrics["adalora_budget"] = self.controller.step(state.step)

    def on_train_end(self, state: TrainState) -> None:
        ctl = self.controller
        if ctl.schedule is not None and state.step >= ctl.schedule.final_step:
            ctl.step(state.step)  # the final masking, if the step due for it was skipped (no step came after)
        state.metrics["adalora_ranks"] = sum(ctl.finalize().values())
        state.summary["adalora_schedule"] = {**ctl.schedule_summary(), "kept_ranks": state.metrics["adalora_ranks"]}

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


def adalora_callbacks(model: nn.Module, adapter_name: str, cfg: AdapterConfig) -> list[Callback]:
    return [AdaLoraCallback(model, adapter_name, cfg)]


def adalora_step(
    model: nn.Module, step: int, total_step: int | None = None, adapter_name: str | None = None
) -> int:
    """One call per optimizer step for your own loop (after ``optimizer.step()``, before ``zero_grad()``):
    AdaLoRA's importance update and budget masking, with a controller kept on the model. Add
    ``adalora_orth_loss(model)`` to the loss for the orthogonal regulariser. Returns the budget in force."""
    return _controller(model, adapter_name, total_step).step(step)


def adalora_orth_loss(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """The weighted orthogonal regulariser of the model's AdaLoRA adapter (see ``AdaLoraController``)."""
    return _controller(model, adapter_name, None).orth_loss()


def _controller(model: nn.Module, adapter_name: str | None, total_step: int | None) -> AdaLoraController:
    name, _ = resolve_adapter(model, adapter_name)
    cache = state_of(model).controllers
    if name not in cache:
        cache[name] = AdaLoraController(model, name, total_step)
    elif total_step is not None and cache[name].schedule is None:
        cache[name].set_total_step(total_step)
    return cache[name]


# ---- the registry entry (its PEFT format, "ADALORA", is in adalora_peft.py) ----
ORTH_FORMS = ("squared", "peft")


def _check_orth_form(field_name: str, value: Any) -> None:
    check_choice(field_name, value, ORTH_FORMS)


def _validate(cfg: AdapterConfig) -> None:
    """The rules between AdaLoRA's fields (each field alone is checked by AdapterConfig)."""
    if cfg.target_r > cfg.init_r:
        raise ConfigError(
            f"target_r={cfg.target_r} is larger than init_r={cfg.init_r}; AdaLoRA only prunes ranks"
        )
    if cfg.total_step is not None:
        resolve_schedule(cfg.tinit, cfg.tfinal, cfg.delta_t, cfg.total_step)  # raises naming the fields
    elif isinstance(cfg.tinit, float) and isinstance(cfg.tfinal, float) and cfg.tinit + cfg.tfinal >= 1.0:
        raise ConfigError(
            f"tinit={cfg.tinit} + tfinal={cfg.tfinal} cover all the steps; as fractions they must add up "
            "to less than 1 so the budget has steps to fall over"
        )
    if cfg.use_rslora:
        raise ConfigError("use_rslora cannot be combined with method='adalora' (it scales by alpha/ranknum)")


ADALORA = register(
    Method(
        "adalora",
        _build_adalora,
        kinds=("linear",),
        peft=ADALORA_PEFT,
        validate=_validate,
        callbacks=adalora_callbacks,
        options={
            "orth_form": Option("squared", _check_orth_form, "'squared' (paper's R, mean) or 'peft'"),
            **ADALORA_LR_OPTIONS,
        },
        inits=ADALORA_INITS,
        optimizer=adalora_groups,
        doc="AdaLoRA, adaptive budget allocation (Zhang et al. 2023)",
    )
)
# The checked builder (a layer kind AdaLoRA does not adapt is a ConfigError naming the module).
build_adalora = ADALORA.build
