"""lorakit adapters trained by ``trl.SFTTrainer`` and ``transformers.Trainer`` (unchanged), with
``LorakitCallback``: each checkpoint's adapter, loaded in lorakit on a fresh base and in PEFT, gives the
logits of the model in memory at that step.

QLoRA runs on lorakit's own NF4; its PEFT side runs on a bitsandbytes NF4 base of the same weights. The
4-bit codes of the two are identical; the double-quantized absmax constants differ by one 8-bit step in
under 1% of blocks (tests/quant/test_nf4.py), so their logits agree within ``NF4_TOL`` (stated below; measured 6e-6 at float32 compute),
while the trained adapter itself moves the logits by more than ten times that (measured ~0.7).
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

import lorakit as lk
from helpers import logits_of

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from lorakit.integrations import LorakitCallback, byte_tokenizer  # noqa: E402

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
X = torch.tensor([[257, 49, 43, 50, 61, 51, 258], [257, 55, 43, 56, 61, 49, 53]])
NF4_TOL = 1e-4  # max |logit difference| lorakit NF4 vs bitsandbytes NF4, same weights and adapter


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tokenizer():
    return byte_tokenizer()


def test_byte_tokenizer_equals_lorakit_byte_tokenizer():
    from lorakit.models.tokenizer import ByteTokenizer

    ours, hf = ByteTokenizer(), byte_tokenizer()
    for text in ["1+2=3", "héllo wörld ✓ 日本", "a <s> b</s> <pad>", "  spaces\n\ttab", ""]:
        assert hf(text)["input_ids"] == ours.encode(text), text
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text, add_special_tokens=False)
        assert hf(text, "pair")["input_ids"] == ours.encode(text, "pair")
        assert hf.decode(ours.encode(text, add_special_tokens=False)) == text
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, len(hf)) == (256, 257, 258, 260)


def rows(n=24):
    out = []
    for i in range(n):
        a, b = i % 10, (i * 7) % 10
        out.append({"input_ids": [257] + [ord(c) for c in f"{a}+{b}={a + b}"] + [258]})
    return out


def base(seed=0):
    return lk.build_model("tiny-llama", seed=seed).float()


def logits(model, train_mode=False):
    """``train_mode``: bitsandbytes' CPU eval path repacks 4-bit weights for AVX512-BF16 kernels, which
    need every output size divisible by their block (tiny-llama's MLP, 172, is not); in train mode it
    dequantizes as on GPU. Nothing here has dropout, so train and eval mode compute the same function."""
    model.train(train_mode)
    with torch.no_grad():
        return logits_of(model(X))


def lorakit_side(ckpt, qlora):
    """A fresh base (quantized the same way for QLoRA) with the checkpoint's adapter."""
    fresh = base()
    if qlora:
        lk.quantize(fresh, lk.QuantConfig(compute_dtype="float32"))
    return lk.load_adapter(fresh, ckpt)


def peft_side(ckpt, tmp_path, qlora):
    if not qlora:
        return peft.PeftModel.from_pretrained(base(), ckpt)
    pytest.importorskip("bitsandbytes")
    path = str(tmp_path / "base")
    base().save_pretrained(path)
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"],
    )
    bnb_base = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu")
    return peft.PeftModel.from_pretrained(bnb_base, ckpt)


class Snapshots(transformers.TrainerCallback):
    """The in-memory model's logits at every save (before the Trainer moves on)."""

    def __init__(self):
        self.logits = {}

    def on_save(self, args, state, control, model=None, **kw):
        was = model.training
        self.logits[state.global_step] = logits(model)
        model.train(was)


def check_checkpoints(out, snaps, model, tmp_path, qlora):
    base_logits = logits(lorakit_side_empty(qlora))
    for step, ref in snaps.logits.items():
        ckpt = os.path.join(out, f"checkpoint-{step}")
        files = set(os.listdir(ckpt))
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files, files
        # the Trainer's own save holds only the trainable tensors (no frozen base, no NF4 codes)
        from safetensors.torch import load_file

        saved = load_file(os.path.join(ckpt, "model.safetensors"))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(saved) == trainable
        ours = logits(lorakit_side(ckpt, qlora))
        assert (ours - ref).abs().max() < 1e-5, step
        theirs = logits(peft_side(ckpt, tmp_path, qlora), train_mode=qlora)
        tol = NF4_TOL if qlora else 1e-5
        assert (theirs - ref).abs().max() < tol, (step, (theirs - ref).abs().max())
        assert (ref - base_logits).abs().max() > 10 * tol  # the adapter trained: the check can fail
    final = json.load(open(os.path.join(out, "adapter_config.json")))
    assert final["peft_type"] == "LORA"


def lorakit_side_empty(qlora):
    fresh = base()
    return lk.quantize(fresh, lk.QuantConfig(compute_dtype="float32")) if qlora else fresh


def test_sft_trainer_qlora_on_lorakit_nf4(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = lk.quantize(base(), lk.QuantConfig(compute_dtype="float32"))
    lk.inject(model, lk.AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    snaps = Snapshots()
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
        learning_rate=5e-2, logging_steps=1, report_to="none", use_cpu=True, max_length=32,
        gradient_checkpointing=False, seed=0, disable_tqdm=True, bf16=False,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows()), processing_class=tokenizer(),
        callbacks=[LorakitCallback(), snaps],
    )
    trainer.train()
    assert sorted(snaps.logits) == [2, 4]
    check_checkpoints(str(tmp_path / "out"), snaps, model, tmp_path, qlora=True)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_hf_trainer_lora_and_dora(tmp_path, method):
    from datasets import Dataset

    model = lk.inject(base(), lk.AdapterConfig(method=method, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    snaps = Snapshots()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
        learning_rate=5e-2, logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, bf16=False,
    )
    tok = tokenizer()
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows()), data_collator=collator,
        callbacks=[LorakitCallback(), snaps],
    )
    trainer.train()
    assert sorted(snaps.logits) == [2, 4]
    check_checkpoints(str(tmp_path / "out"), snaps, model, tmp_path, qlora=False)
    if method == "dora":
        cfg = json.load(open(tmp_path / "out" / "checkpoint-4" / "adapter_config.json"))
        assert cfg["use_dora"] is True


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """The trainable-only model.safetensors is what ``resume_from_checkpoint`` needs: 2 + 2 steps equal 4."""
    from datasets import Dataset

    def run(out, steps, resume=None):
        model = lk.inject(base(), lk.AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
            report_to="none", use_cpu=True, seed=0, disable_tqdm=True, bf16=False,
        )
        collator = transformers.DataCollatorForLanguageModeling(tokenizer(), mlm=False)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows()),
                                       data_collator=collator, callbacks=[LorakitCallback()])
        if steps < 4:
            trainer.add_callback(Stop(steps))
        trainer.train(resume_from_checkpoint=resume)
        return model

    class Stop(transformers.TrainerCallback):
        def __init__(self, at):
            self.at = at

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= self.at:
                control.should_training_stop = True

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert torch.allclose(logits(straight), logits(resumed), atol=1e-6)
    assert not torch.equal(logits(straight), logits(lorakit_side(str(tmp_path / "b" / "checkpoint-2"), False)))


def test_model_without_adapter_is_a_clear_error(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="has no lorakit adapter; add one with lorakit.inject"):
        transformers.Trainer(model=base(), args=args, callbacks=[LorakitCallback()])


def test_copy_is_unaffected():
    """save_trainable_only changes the model object it is given, not the class."""
    from lorakit.integrations.hf_trainer import save_trainable_only

    m = lk.inject(base(), lk.AdapterConfig(r=2, target_modules=["q_proj"]))
    other = copy.deepcopy(base())
    keep = save_trainable_only(m)
    assert keep and all("lora" in k for k in keep)
    assert not other._keys_to_ignore_on_save
