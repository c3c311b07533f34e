"""save_adapter writes a model card README.md as PEFT does (issue 18 item 5): Hub front matter, method and
settings, the run's data and metrics, the lorakit version, and how to load it; PEFT still loads the dir."""

import torch

import lorakit as lk
from lorakit.io.model_card import model_card


def test_save_adapter_writes_a_card_and_peft_still_loads_the_directory(tmp_path):
    peft = __import__("pytest").importorskip("peft")
    model = lk.inject(lk.build_model("tiny-llama"), lk.AdapterConfig(r=4, alpha=8, target_modules=["q_proj"]))
    out = lk.save_adapter(model, str(tmp_path / "a"), base_model_name_or_path="someone/tiny")
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.startswith('---\nbase_model: "someone/tiny"\nlibrary_name: peft\n')
    assert "# LoRA adapter for someone/tiny" in card and f"lorakit {lk.__version__}" in card
    assert "- r: `4`" in card and '- target_modules: `["q_proj"]`' in card
    assert "PeftModel.from_pretrained" in card and "AutoModelForCausalLM" in card and "llama.cpp" in card
    base = lk.build_model("tiny-llama")
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(peft.PeftModel.from_pretrained(base, out)(x).logits, model(x).logits)


def test_the_card_carries_the_runs_data_and_metrics():
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": True, "task_type": "SEQ_CLS",
              "base_model_name_or_path": "minilm"}
    card = model_card(config, {"data": "sst2/train.tsv", "steps": 120, "metrics": {"eval_accuracy": 0.8312}})
    assert "# DoRA adapter for minilm" in card and "- data: `sst2/train.tsv`" in card
    assert "- steps: 120" in card and "- eval_accuracy: 0.8312" in card
    assert "AutoModelForSequenceClassification" in card and 'task="classification"' in card


def test_a_card_without_a_known_base_names_no_base_model():
    card = model_card({"peft_type": "LORA", "r": 2})
    assert "base_model:" not in card and "<base model>" in card


def test_the_trainer_writes_its_metrics_into_the_card(tmp_path):
    from lorakit.train.trainer import train
    from train.test_trainer import run_config

    res = train(run_config(tmp_path, max_steps=2))
    card = open(f"{res.adapter_dir}/README.md").read()
    assert "- steps: 2" in card and "- eval_loss: " in card and "sft.jsonl" in card
