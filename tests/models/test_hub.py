"""Model names resolve before any network access: typos of builtins, unknown ids with the hub unreachable,
and ids already in the local Hugging Face cache (issue 20 item 3)."""

import os
import socket
import subprocess
import sys
import time

import pytest

import lorakit as lk
from lorakit.models.builtin import ModelError
from lorakit.models.tokenizer import TokenizerError, load_tokenizer


@pytest.fixture
def unreachable_hub(monkeypatch):
    """HF_ENDPOINT on a closed local port: any connection is refused at once. (transformers is imported
    first so the timings below measure name resolution, not a cold import.)"""
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.mark.parametrize("typo,meant", [("tiny-lama", "tiny-llama"), ("Tiny-GPT2", "tiny-gpt2"), ("minlm", "minilm")])
def test_a_builtin_typo_is_caught_before_any_network_access(unreachable_hub, typo, meant):
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=f"did you mean '{meant}'"):
        lk.build_model(typo)
    with pytest.raises(TokenizerError, match=f"did you mean '{meant}'"):
        load_tokenizer(typo)
    assert time.perf_counter() - t0 < 2.0


def test_an_unknown_id_fails_at_once_when_the_hub_is_unreachable(unreachable_hub):
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="neither a builtin.*local directory.*cache.*unreachable"):
        lk.build_model("someone/no-such-model")
    assert time.perf_counter() - t0 < 2.0


def test_an_unknown_id_fails_at_once_in_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="offline mode"):
        lk.build_model("someone/no-such-model")
    assert time.perf_counter() - t0 < 2.0


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        lk.build_model(str(tmp_path / "nope" / "model"))


def test_an_id_in_the_local_cache_loads_without_network(tmp_path):
    """A model id already in HF_HOME's cache loads with the hub unreachable (no retries, no download)."""
    snap = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    model = lk.build_model("tiny-llama")
    model.save_pretrained(str(snap))
    refs = tmp_path / "hub" / "models--someone--tiny" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("0" * 40)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    code = (
        "import time, torch, lorakit as lk; from transformers import AutoModelForCausalLM; "
        "t = time.perf_counter(); m = lk.build_model('someone/tiny'); "
        "ref = lk.build_model('tiny-llama'); x = torch.tensor([[1, 2, 3]]); "
        "assert torch.equal(m(x).logits, ref(x).logits); print(round(time.perf_counter() - t, 2))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    took = float(out.stdout.split()[-1])
    assert took < 10, f"{took} s: a cached id must load without network retries"
