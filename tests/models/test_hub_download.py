"""Hub ids online and offline (issue 18 item 6), through transformers' and huggingface_hub's own download
and cache code against a local stand-in hub (tests/models/fake_hub.py): an id downloads into HF_HOME's cache
when the hub is reachable, then loads from that cache with offline mode set and with the hub gone. A snapshot
that holds only some files (config.json read first, the weights or tokenizer not yet) is not taken for a
complete one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from models.fake_hub import COMMIT, fake_hub

# one child process per phase: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE when it is imported
_LOAD = (
    "import torch, lorakit as lk; from lorakit.models.tokenizer import load_tokenizer\n"
    "from lorakit.models.builtin import require_causal_lm\n"
    "require_causal_lm('someone/tiny')  # caches config.json alone, as lorakit generate/serve do first\n"
    "m = lk.build_model('someone/tiny'); ref = lk.build_model('tiny-llama')\n"
    "x = torch.tensor([[1, 2, 3, 4]])\n"
    "assert torch.equal(m(x).logits, ref(x).logits), 'downloaded weights differ'\n"
    "tok = load_tokenizer('someone/tiny')\n"
    "print(tok.encode('a lorakit test', add_special_tokens=False))\n"
)


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    return subprocess.run(
        [sys.executable, "-c", _LOAD], env={**base, **env}, capture_output=True, text=True, timeout=180
    )


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_hub_id_downloads_into_the_cache_then_loads_offline(tmp_path):
    import lorakit as lk
    from lorakit.models.tokenizer import load_tokenizer

    repo = tmp_path / "repos" / "someone" / "tiny"
    lk.build_model("tiny-llama").save_pretrained(str(repo))
    load_tokenizer("minilm").save_pretrained(str(repo))  # a real WordPiece tokenizer beside the weights
    expected = load_tokenizer("minilm").encode("a lorakit test", add_special_tokens=False)
    home = str(tmp_path / "home")

    with fake_hub(str(tmp_path / "repos")) as (endpoint, log):
        online = _run({"HF_HOME": home, "HF_ENDPOINT": endpoint})
    assert online.returncode == 0, online.stderr[-3000:]
    assert online.stdout.split("\n")[-2] == str(expected)
    assert f"GET /someone/tiny/resolve/{COMMIT}/model.safetensors" in log  # really downloaded
    assert f"GET /someone/tiny/resolve/{COMMIT}/tokenizer.json" in log
    snapshot = os.path.join(home, "hub", "models--someone--tiny", "snapshots", COMMIT)
    assert os.path.isfile(os.path.join(snapshot, "model.safetensors"))
    assert os.path.isfile(os.path.join(snapshot, "tokenizer.json"))

    # the server is gone: offline mode, and a closed port without offline mode, both load from the cache
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}):
        offline = _run({"HF_HOME": home, **env})
        assert offline.returncode == 0, (env, offline.stderr[-3000:])
        assert offline.stdout.split("\n")[-2] == str(expected)
