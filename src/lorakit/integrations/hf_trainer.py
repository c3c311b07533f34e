"""A lorakit-adapted model under ``transformers.Trainer`` / ``trl.SFTTrainer``, with PEFT-format checkpoints.

    model = lk.inject(lk.quantize(AutoModelForCausalLM.from_pretrained(path)), lk.AdapterConfig(r=8))
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="out"), train_dataset=ds,
                         callbacks=[LorakitCallback()])
    trainer.train()   # out/checkpoint-N/ and out/ hold adapter_model.safetensors + adapter_config.json

The Trainers need nothing else: a model adapted by ``lorakit.inject`` is still the ``PreTrainedModel`` it
was (lorakit swaps layers in place), with only the adapter's tensors trainable, and lorakit's NF4
(``lorakit.quantize``) sets none of the ``is_quantized`` / ``hf_quantizer`` attributes with which
transformers refuses "purely quantized" models (``trainer_utils.validate_quantization_for_training``). A
model loaded with a bitsandbytes ``quantization_config`` does set them, and transformers refuses it
unless it is a PEFT model: use ``lorakit.quantize`` (or ``lorakit.load_quantized``) for QLoRA here.

What the callback changes, and why:

- A Trainer saves a non-PEFT model with ``save_pretrained``: the whole ``state_dict``, frozen base and NF4
  codes included, in every checkpoint. The callback lists every tensor that is not trainable in the
  model's ``_keys_to_ignore_on_save`` (which ``save_pretrained`` honours), so ``checkpoint-N/model.safetensors``
  holds only the trainable tensors under the model's own names: adapter-sized, and what
  ``trainer.train(resume_from_checkpoint=...)`` loads back (the Trainer loads it with ``strict=False`` and
  expects exactly those keys missing). It is not a loadable model; the adapter files are.
- On each save (rank 0 only) it writes the active adapter with :func:`lorakit.save_adapter` into
  ``checkpoint-N`` (PEFT format: ``PeftModel.from_pretrained`` and ``lorakit.load_adapter`` read it), and at
  the end of training into ``args.output_dir``.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from lorakit.io import save_adapter
from lorakit.state import active_adapter, adapter_configs

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - only without the hf extra
    raise ImportError('lorakit.integrations.hf_trainer needs transformers: pip install "lorakit[hf]"') from e

CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def _unwrap(model: nn.Module) -> nn.Module:
    """The model the Trainer was given (past DDP's ``.module`` and torch.compile's ``_orig_mod``)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_trainable_only(model: nn.Module) -> set[str]:
    """Make ``model.save_pretrained`` write only its trainable tensors: every other ``state_dict`` key goes
    into ``model._keys_to_ignore_on_save``. Returns the keys that are still saved."""
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    ignored = set(model.state_dict()) - keep
    model._keys_to_ignore_on_save = ignored
    return keep


class LorakitCallback(TrainerCallback):
    """Writes the lorakit adapter in PEFT format into every Trainer checkpoint and the output dir.

    Args:
        adapter_name: the adapter to save (default: the model's active adapter when training starts).
        trainable_only: keep ``checkpoint-N/model.safetensors`` to the trainable tensors (see the module
            docstring); False leaves the Trainer's full save as it is.
    """

    def __init__(self, adapter_name: str | None = None, trainable_only: bool = True) -> None:
        self.adapter_name = adapter_name
        self.trainable_only = trainable_only

    def _prepare(self, model: nn.Module | None) -> nn.Module:
        if model is None:
            raise ValueError("LorakitCallback: the Trainer passed no model to its callbacks")
        model = _unwrap(model)
        names = list(adapter_configs(model))
        if not names:
            raise ValueError(
                f"LorakitCallback: the {type(model).__name__} has no lorakit adapter; "
                "add one with lorakit.inject(model, AdapterConfig(...)) before building the Trainer"
            )
        if self.adapter_name is None:
            self.adapter_name = active_adapter(model) or names[0]
        elif self.adapter_name not in names:
            raise ValueError(f"LorakitCallback: adapter_name={self.adapter_name!r} is not in the model; it has {names}")
        if self.trainable_only:
            save_trainable_only(model)
        return model

    def on_init_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> None:
        self._prepare(model)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> None:
        self._prepare(model)  # again: a callback added after the Trainer was built missed on_init_end

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> None:
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
            self.save(model, path, args, state)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> None:
        if state.is_world_process_zero:
            self.save(model, args.output_dir, args, state)

    def save(self, model: nn.Module | None, path: str, args: Any, state: Any) -> str:
        """The adapter into ``path`` (other files there stay), with the step and last logs for its card."""
        model = self._prepare(model)
        logs = [h for h in getattr(state, "log_history", []) if "loss" in h or "eval_loss" in h]
        run = {"steps": state.global_step, "metrics": logs[-1] if logs else None}
        return save_adapter(model, path, adapter_name=self.adapter_name or "default", run=run)
