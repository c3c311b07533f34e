"""Reference architectures for model sizes given as "7B", in Hugging Face config field names.

Reference shapes for sizes (from the papers that published them):
- LLaMA 7B/13B/33B/65B: Touvron et al. 2023 (arXiv:2302.13971), Table 2; vocab 32000, SwiGLU MLP
  with intermediate size 2/3*4h rounded to a multiple of 256, untied output head.
- Llama-2 70B: Touvron et al. 2023 (arXiv:2307.09288): h 8192, 80 layers, 64 heads, 8 KV heads, MLP 28672.
- Llama-3 8B and Llama-3.2 1B/3B: Meta model cards (vocab 128256, 8 KV heads; 1B/3B tie embeddings).
- GPT-3 175B: Brown et al. 2020 (arXiv:2005.14165), Table 2.1: 96 layers, h 12288, 96 heads,
  context 2048, vocab 50257, plain 4h GELU MLP, learned positions, tied embeddings.
"""

from __future__ import annotations

from typing import Any

# size -> (reference name, config dict in Hugging Face field names)
_LLAMA1 = dict(model_type="llama", vocab_size=32000, tie_word_embeddings=False)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, num_key_value_heads=8)
REFERENCE_SIZES: dict[str, tuple[str, dict[str, Any]]] = {
    "1B": (
        "Llama-3.2-1B",
        dict(
            _LLAMA3,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            head_dim=64,
            tie_word_embeddings=True,
        ),
    ),
    "3B": (
        "Llama-3.2-3B",
        dict(
            _LLAMA3,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            head_dim=128,
            tie_word_embeddings=True,
        ),
    ),
    "7B": (
        "LLaMA-7B",
        dict(
            _LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
        ),
    ),
    "8B": (
        "Llama-3-8B",
        dict(
            _LLAMA3,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            tie_word_embeddings=False,
        ),
    ),
    "13B": (
        "LLaMA-13B",
        dict(
            _LLAMA1, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
        ),
    ),
    "33B": (
        "LLaMA-33B",
        dict(
            _LLAMA1, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52
        ),
    ),
    "65B": (
        "LLaMA-65B",
        dict(
            _LLAMA1, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64
        ),
    ),
    "70B": (
        "Llama-2-70B",
        dict(
            _LLAMA1,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
        ),
    ),
    "175B": (
        "GPT-3-175B",
        dict(
            model_type="gpt",
            vocab_size=50257,
            hidden_size=12288,
            intermediate_size=49152,
            num_hidden_layers=96,
            num_attention_heads=96,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            hidden_dropout=0.1,
            attention_dropout=0.1,
        ),
    ),
}
ALIASES = {"30B": "33B", "6.7B": "7B"}
