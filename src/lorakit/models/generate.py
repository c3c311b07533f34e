"""Text generation from a causal LM, with or without an adapter: greedy or sampled, with a KV cache.

Sampling draws from softmax(logits / temperature), restricted to the ``top_k`` most likely tokens and/or
the smallest set whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020);
``temperature=0`` is greedy (argmax). The prompt is tokenized the way SFT training tokenizes a prompt
(``lorakit.train.tasks``): the tokenizer's BOS if it adds one, then the text without other specials, so
an adapter trained on ``template: alpaca`` rows sees the same prefix.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from lorakit.models.tokenizer import adds_bos, has_chat_template

TEMPLATES = ("none", "alpaca", "chat")
# The Alpaca prompt (Taori et al. 2023), which SFT rows with ``template: alpaca`` are trained on too
# (``lorakit.train.tasks``).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def prompt_ids(tokenizer: Any, prompt: str, template: str = "none", input_text: str = "") -> list[int]:
    """Token ids of ``prompt`` rendered with ``template`` ("none", "alpaca" or "chat")."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is not supported; expected one of {list(TEMPLATES)}")
    if template == "chat":
        if not has_chat_template(tokenizer):
            raise ValueError("template='chat' needs a tokenizer with a chat template; this one has none")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    if template == "alpaca":
        tpl = ALPACA_PROMPT if input_text.strip() else ALPACA_PROMPT_NO_INPUT
        prompt = tpl.format(instruction=prompt, input=input_text)
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    return bos + list(tokenizer.encode(prompt, add_special_tokens=False))


def _pick(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    gen: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the first token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    ids: list[int],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int = 0,
) -> list[int]:
    """New token ids after ``ids`` (stops at ``eos_token_id``, which is included)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if not ids:
        raise ValueError("the prompt is empty (no tokens)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    x = torch.tensor([ids], device=device)
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2 renamed it
    past, out_ids = None, []
    for _ in range(max_new_tokens):
        out = model(input_ids=x, use_cache=True, **({cache_arg: past} if past is not None else {}))
        past = out.get("cache", None) or out.get("past_key_values", None)
        nxt = _pick(out.logits[:, -1], temperature, top_k, top_p, gen)
        out_ids.append(int(nxt))
        if eos_token_id is not None and out_ids[-1] == eos_token_id:
            break
        x = nxt[:, None]
    model.train(was_training)
    return out_ids


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    template: str = "none",
    seed: int = 0,
) -> str:
    """The completion text of ``prompt`` (special tokens removed)."""
    ids = prompt_ids(tokenizer, prompt, template)
    new = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_token_id, seed)
    return tokenizer.decode(new, skip_special_tokens=True)
