"""``lorakit serve`` end to end: a subprocess on a free 127.0.0.1 port answers over HTTP; bad arguments
fail with one line and exit 2."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lorakit.cli.main import main

from .helpers import write_adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_subprocess(tmp_path):
    dirs = write_adapters(str(tmp_path), ["alpha"])
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "serve",
        "--model",
        "tiny-llama",
        "--adapter",
        f"alpha={dirs['alpha']}",
        "--port",
        str(port),
        "--max-loaded",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 150  # a cold interpreter importing torch on a busy machine
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert models == ["tiny-llama", "alpha"]
        r = httpx.post(
            f"{url}/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3}, timeout=30
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_bad_arguments(tmp_path, capsys):
    assert main(["serve", "--model", "tiny-llama", "--adapter", f"a={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
