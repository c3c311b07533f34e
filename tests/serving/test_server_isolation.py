"""One bad request never touches another: a prompt that cannot run (``prompt: ""`` on a tokenizer that adds
no BOS, GPT-2 style) is refused on its own with a 400, before batching, while a valid request sent at the
same moment (same batch window) completes with the right text."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

import lorakit
from lorakit.io import load_adapter
from lorakit.models.tokenizer import ByteTokenizer
from lorakit.serving.engine import Engine
from lorakit.serving.registry import AdapterRegistry
from lorakit.serving.server import ServerThread, create_app

from .helpers import write_adapters


class NoBosTokenizer(ByteTokenizer):
    """The byte tokenizer, but like GPT-2's: ``add_special_tokens`` adds no BOS (nor EOS)."""

    def encode(self, text, text_pair=None, add_special_tokens=True):
        return super().encode(text, text_pair, add_special_tokens=False)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_adapters(str(tmp_path_factory.mktemp("adapters")), ["ad0"])


@pytest.fixture(scope="module")
def url(dirs):
    model = lorakit.build_model("tiny-llama")
    registry = AdapterRegistry(model)
    registry.register("ad0", dirs["ad0"], load=True)
    # a long batch window, so requests sent together are decoded together
    engine = Engine(model, NoBosTokenizer(), registry, batch_wait_s=0.3)
    srv = ServerThread(create_app(engine, "tiny-llama", max_context=128)).start()
    yield srv.url
    srv.stop()


def offline_no_bos(dirs, prompt: str, max_tokens: int) -> str:
    model = lorakit.build_model("tiny-llama")
    load_adapter(model, dirs["ad0"], "ad0")
    tok = NoBosTokenizer()
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=256
        )[0, ids.shape[1] :].tolist()
    out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
    return tok.decode(out, skip_special_tokens=True)


def test_empty_prompt_without_bos_fails_alone(url, dirs):
    async def together():
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            bodies = [
                {"model": "ad0", "prompt": "", "max_tokens": 4},
                {"model": "ad0", "prompt": "The cat", "max_tokens": 6, "temperature": 0},
                {"model": "ad0", "prompt": ["fine", ""], "max_tokens": 4},
            ]
            return await asyncio.gather(*(ac.post("/v1/completions", json=b) for b in bodies))

    empty, good, mixed = asyncio.run(together())
    assert empty.status_code == 400, empty.text
    err = empty.json()["error"]
    assert err["param"] == "prompt" and err["code"] == "empty_prompt" and "BOS" in err["message"]
    assert mixed.status_code == 400 and "prompt 1" in mixed.json()["error"]["message"]
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["text"] == offline_no_bos(dirs, "The cat", 6)
