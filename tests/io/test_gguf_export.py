"""GGUF export read back with ggml's own reader (gguf.GGUFReader): keys, tensor names, shapes, dtypes,
and that llama.cpp's formula on the written pairs, (alpha / r) * B @ A, rebuilds lorakit's delta weight
per module (rsLoRA, rank/alpha patterns, AdaLoRA). The check against llama.cpp itself is
benchmarks/check_llama_cpp.py (needs the ``llamacpp`` extra)."""

import json

import numpy as np
import pytest
import torch

import lorakit as lk
from helpers import randomize_adapter
from lorakit.cli.main import main
from lorakit.io.gguf_export import GGUFExportError, export_gguf, rope_permute
from lorakit.surgery.inject import adapted_layers

gguf = pytest.importorskip("gguf")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "plain": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora-patterns-embedding": dict(
        r=4, alpha=8, target_modules=ALL + ["embed_tokens", "lm_head"], use_rslora=True,
        rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
    ),
    "adalora": dict(method="adalora", init_r=6, target_r=2, alpha=5, target_modules=["q_proj", "k_proj", "up_proj"]),
}


def _adapter(tmp_path, case: str):
    model = lk.build_model("tiny-llama")
    lk.inject(model, lk.AdapterConfig(**CASES[case]))
    randomize_adapter(model, "default", seed=3)
    if case == "adalora":  # prune some ranks (lambda = 0), as the budget does
        for _, layer in adapted_layers(model):
            with torch.no_grad():
                layer.adapters["default"].lora_E[::2] = 0.0
    path = tmp_path / "adapter"
    lk.save_adapter(model, path, base_model_name_or_path="tiny-llama")
    return model, path


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(reader) -> dict:
    return {t.name: torch.from_numpy(np.array(t.data)).float() for t in reader.tensors}


def test_rope_permute_pairs_rows_as_llama_cpp_rotates_them():
    # HF rotates row i with row i + hd/2 of each head; llama.cpp rotates rows 2i and 2i+1
    n_head, hd = 2, 8
    rows = torch.arange(n_head * hd).float().unsqueeze(1)
    out = rope_permute(rows, n_head).squeeze(1)
    for h in range(n_head):
        for i in range(hd // 2):
            assert out[h * hd + 2 * i] == h * hd + i
            assert out[h * hd + 2 * i + 1] == h * hd + i + hd // 2


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_gguf_rebuilds_lorakit_delta_per_module(tmp_path, case):
    model, path = _adapter(tmp_path, case)
    out = tmp_path / "adapter.gguf"
    assert main(["export", str(path), "--format", "gguf", "-o", str(out)]) == 0
    reader = gguf.GGUFReader(str(out))
    kv = _fields(reader)
    assert kv["general.architecture"] == "llama" and kv["general.type"] == "adapter"
    assert kv["adapter.type"] == "lora"
    alpha = kv["adapter.lora.alpha"]
    assert alpha == pytest.approx(CASES[case]["alpha"])
    tensors = _tensors(reader)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    names = {n: layer for n, layer in adapted_layers(model)}
    nmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    expected = {nmap.get_name(n + ".weight", try_suffixes=(".weight",)) for n in names}
    assert {k.rsplit(".", 1)[0] for k in tensors} == expected
    cfg = model.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for name, layer in names.items():
        target = nmap.get_name(name + ".weight", try_suffixes=(".weight",))
        a, b = tensors[target + ".lora_a"], tensors[target + ".lora_b"]
        delta = layer.adapters["default"].delta_weight(layer.access).detach().float()
        if target == "token_embd.weight":
            # llama.cpp: lora_a (vocab, r) rows are looked up per token, then lora_b (dim, r) maps them
            rank = b.shape[1]
            assert a.shape == (cfg.vocab_size, rank)
            rebuilt = (alpha / rank) * a @ b.t()  # (vocab, dim)
        else:
            rank = a.shape[0]  # ggml ne[1] of lora_a == ne[0] of lora_b: the rank llama.cpp divides by
            assert b.shape == (delta.shape[0], rank) and a.shape == (rank, delta.shape[1])
            rebuilt = (alpha / rank) * b @ a
            kind = target.split(".")[-2]
            if kind in heads:
                delta = rope_permute(delta, heads[kind])
        torch.testing.assert_close(rebuilt, delta, rtol=1e-5, atol=1e-6, msg=f"{name} -> {target}")
    if case == "adalora":  # pruned ranks are dropped: rank 3 of init_r 6
        assert {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_a")} == {3}


def test_rank_and_alpha_patterns_reach_the_written_pairs(tmp_path):
    # the corrected B differs from the saved B exactly where lorakit's scale is not alpha/r
    model, path = _adapter(tmp_path, "rslora-patterns-embedding")
    export_gguf(path, tmp_path / "a.gguf")
    tensors = _tensors(gguf.GGUFReader(str(tmp_path / "a.gguf")))
    v = tensors["blk.0.attn_v.weight.lora_b"]
    saved_v = dict(adapted_layers(model))["model.layers.0.self_attn.v_proj"].adapters["default"].lora_B.weight
    # rsLoRA r=2: lorakit scale 8/sqrt(2), llama.cpp 8/2 -> B grows by sqrt(2)
    torch.testing.assert_close(v, saved_v.detach() * 2**0.5, rtol=1e-6, atol=0)
    assert tensors["blk.1.ffn_down.weight.lora_a"].shape[0] == 6


def test_merged_gguf_keys_types_and_weights(tmp_path):
    model, path = _adapter(tmp_path, "plain")
    merged = lk.unload(model, merge=True)
    out = tmp_path / "merged.gguf"
    assert main(["export", str(path), "--format", "gguf", "-o", str(out), "--merged", "--outtype", "f16"]) == 0
    reader = gguf.GGUFReader(str(out))
    kv = _fields(reader)
    assert kv["general.type"] == "model" and kv["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert kv["llama.block_count"] == 2 and kv["llama.embedding_length"] == 64
    assert kv["llama.attention.head_count"] == 4 and kv["llama.attention.head_count_kv"] == 2
    assert kv["llama.feed_forward_length"] == 172 and kv["llama.rope.dimension_count"] == 16
    assert kv["llama.vocab_size"] == 260 and kv["tokenizer.ggml.model"] == "llama"
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == 260 and tokens[65] == "<0x41>" and tokens[257] == "<s>"
    types = {t.name: t for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert len(types) == 2 * 9 + 3  # 9 per block, token_embd + output_norm + output
    sd = merged.state_dict()
    q = torch.from_numpy(np.array(types["blk.0.attn_q.weight"].data)).float()
    want = rope_permute(sd["model.layers.0.self_attn.q_proj.weight"], 4).half().float()
    torch.testing.assert_close(q, want, rtol=0, atol=0)
    v = torch.from_numpy(np.array(types["blk.1.attn_v.weight"].data)).float()
    torch.testing.assert_close(v, sd["model.layers.1.self_attn.v_proj.weight"].half().float(), rtol=0, atol=0)


def test_merged_bf16_decodes_to_the_bf16_weights(tmp_path):
    model, path = _adapter(tmp_path, "plain")
    merged = lk.unload(model, merge=True)
    export_gguf(path, tmp_path / "m.gguf", merged=True, out_type="bf16")
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}["blk.0.ffn_up.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.BF16
    raw = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(172, 64)
    assert torch.equal(raw, merged.state_dict()["model.layers.0.mlp.up_proj.weight"].bfloat16())


def _saved(tmp_path, model_name: str, **cfg):
    model = lk.build_model(model_name)
    lk.inject(model, lk.AdapterConfig(**cfg))
    path = tmp_path / "ad"
    lk.save_adapter(model, path, base_model_name_or_path=model_name)
    return path


@pytest.mark.parametrize(
    "model_name, cfg, message",
    [
        ("tiny-llama", dict(method="dora", r=2, target_modules=["q_proj"]), "DoRA magnitudes"),
        ("tiny-llama", dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        ("tiny-gpt2", dict(r=2, target_modules=["c_attn"]), "model_type 'gpt2'"),
    ],
)
def test_what_llama_cpp_cannot_read_is_a_one_line_error(tmp_path, capsys, model_name, cfg, message):
    path = _saved(tmp_path, model_name, **cfg)
    with pytest.raises(GGUFExportError, match=message):
        export_gguf(path, tmp_path / "x.gguf")
    assert main(["export", str(path), "--format", "gguf", "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


def test_dora_and_modules_to_save_export_merged(tmp_path):
    path = _saved(tmp_path, "tiny-llama", method="dora", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    export_gguf(path, tmp_path / "m.gguf", merged=True)
    assert len(gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors) == 21


def test_bad_outtype_is_an_error(tmp_path):
    path = _saved(tmp_path, "tiny-llama", r=2, target_modules=["q_proj"])
    with pytest.raises(GGUFExportError, match="outtype='q4'"):
        export_gguf(path, tmp_path / "x.gguf", out_type="q4")


@pytest.mark.parametrize("target, message", [("lm_head", "tied lm_head"), ("embed_tokens", "tied embedding")])
def test_lora_on_tied_embeddings_is_an_error(tmp_path, target, message):
    from transformers import AutoModelForCausalLM

    from lorakit.io.gguf_export import export_adapter_gguf
    from lorakit.models.builtin import builtin_config

    cfg = builtin_config("tiny-llama")
    cfg.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(cfg)
    lk.inject(model, lk.AdapterConfig(r=2, target_modules=["q_proj", target]))
    with pytest.raises(GGUFExportError, match=message):
        export_adapter_gguf(model, tmp_path / "x.gguf")


def hf_llama_dir(path, texts=("hello world, the quick brown fox", "jumps over the lazy dog 123")):
    """A local Llama directory with a byte-level BPE tokenizer.json trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from lorakit.models.builtin import builtin_config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    cfg = builtin_config("tiny-llama")
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 320, 0, 1, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return fast


def test_merged_gguf_carries_an_hf_bpe_tokenizer(tmp_path):
    fast = hf_llama_dir(tmp_path / "base")
    model = lk.build_model(str(tmp_path / "base"))
    lk.inject(model, lk.AdapterConfig(r=2, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    summary = export_gguf(tmp_path / "ad", tmp_path / "m.gguf", merged=True)
    assert summary["vocab"] == "Hugging Face BPE tokenizer"
    kv = _fields(gguf.GGUFReader(str(tmp_path / "m.gguf")))
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    vocab = fast.get_vocab()
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == 320 and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(vocab)] == f"[PAD{len(vocab)}]"
    assert kv["tokenizer.ggml.bos_token_id"] == 0 and kv["tokenizer.ggml.eos_token_id"] == 1
    assert len(kv["tokenizer.ggml.merges"]) == len(
        json.loads(fast.backend_tokenizer.to_str())["model"]["merges"])


def test_an_unmapped_tokenizer_falls_back_to_token_ids_with_a_warning(tmp_path):
    hf_llama_dir(tmp_path / "base")
    tj = tmp_path / "base" / "tokenizer.json"
    data = json.loads(tj.read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    tj.write_text(json.dumps(data))
    model = lk.build_model(str(tmp_path / "base"))
    lk.inject(model, lk.AdapterConfig(r=2, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    with pytest.warns(UserWarning, match="pre_tokenizer .*Whitespace.*token ids"):
        summary = export_gguf(tmp_path / "ad", tmp_path / "m.gguf", merged=True)
    assert summary["vocab"] == "none (token ids)"
    assert _fields(gguf.GGUFReader(str(tmp_path / "m.gguf")))["tokenizer.ggml.model"] == "none"
