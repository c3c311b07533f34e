"""The server's bounds: documented defaults, validation, and the ``lorakit serve`` flags that set them."""

from __future__ import annotations

import argparse

import pytest

from lorakit.cli import serve
from lorakit.cli.main import main
from lorakit.serving.limits import Limits


def test_defaults_are_the_documented_ones():
    assert Limits().as_dict() == {
        "max_prompts": 64,
        "max_body_bytes": 1 << 20,
        "max_queue": 256,
        "retry_after_s": 1,
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_prompts=0), "max_prompts=0"),
        (dict(max_queue=True), "max_queue=True"),
        (dict(max_body_bytes=1.5), "max_body_bytes=1.5"),
        (dict(max_prompts=10, max_queue=5), "exceeds max_queue"),
    ],
)
def test_bad_limits_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Limits(**kwargs)


def test_serve_flags_default_to_the_api_and_reach_build_app(monkeypatch):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-llama"])
    assert (args.max_prompts, args.max_body_bytes, args.max_queue) == (64, 1 << 20, 256)
    seen = {}

    def fake_build_app(model, adapters, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr("lorakit.serving.server.build_app", fake_build_app)
    args = parser.parse_args(
        ["--model", "tiny-llama", "--max-prompts", "8", "--max-body-bytes", "4096", "--max-queue", "9"]
    )
    with pytest.raises(RuntimeError, match="stop here"):
        serve.run(args)
    assert (seen["max_prompts"], seen["max_body_bytes"], seen["max_queue"]) == (8, 4096, 9)


def test_serve_bad_bound_is_one_line(capsys):
    assert main(["serve", "--model", "tiny-llama", "--max-queue", "0"]) == 2
    err = capsys.readouterr().err
    assert "max_queue=0" in err and len(err.strip().splitlines()) == 1
