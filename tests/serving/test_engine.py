"""Engine pieces: sampling, stop strings / UTF-8 streaming, a failing adapter load fails only its request."""

from __future__ import annotations

import torch

import lorakit
from lorakit.models.tokenizer import ByteTokenizer
from lorakit.serving import BASE
from lorakit.serving.engine import Engine, GenRequest, sample
from lorakit.serving.metrics import percentile
from lorakit.serving.registry import AdapterRegistry


def test_sample_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 2.9, -9.0]])
    zero = torch.zeros(2)
    assert sample(logits, zero, torch.ones(2)).tolist() == [1, 0]
    torch.manual_seed(0)
    # top_p=0.5 keeps only the most likely token of each row, whatever the temperature
    for _ in range(20):
        assert sample(logits, torch.full((2,), 2.0), torch.full((2,), 0.5)).tolist() == [1, 0]
    drawn = {tuple(sample(logits, torch.tensor([0.0, 1.5]), torch.ones(2)).tolist()) for _ in range(50)}
    assert {d[0] for d in drawn} == {1} and {d[1] for d in drawn} == {0, 1}  # row 0 greedy, row 1 samples


def test_feed_stop_strings_and_partial_utf8():
    tok, events = ByteTokenizer(), []
    req = GenRequest([257], BASE, max_tokens=50, emit=events.append, stop=["END"])
    for b in "héllo EN".encode():
        assert not req.feed(b, tok, {258})
    assert "".join(e[1] for e in events) == "héllo "  # "EN" held back: it may start the stop string
    assert req.feed(ord("D"), tok, {258}) and req.finish_reason == "stop" and req.text == "héllo "
    events.clear()
    req = GenRequest([257], BASE, max_tokens=2, emit=events.append)
    assert not req.feed("é".encode()[0], tok, {258}) and events == []  # half a character: wait
    assert req.feed("é".encode()[1], tok, {258}) and req.finish_reason == "length" and req.text == "é"
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([], 99) is None


def test_failed_adapter_load_fails_only_its_request():
    model = lorakit.build_model("tiny-llama")

    def loader(m, path, name):
        raise ValueError(f"{path}: adapter_model.safetensors is truncated")

    reg = AdapterRegistry(model, loader=loader)
    reg.sources["broken"] = "/nowhere/broken"  # registered earlier, directory damaged since
    engine = Engine(model, ByteTokenizer(), reg)
    got: dict[str, list] = {"ok": [], "bad": []}
    ok = GenRequest([257, 65], BASE, max_tokens=3, emit=got["ok"].append)
    bad = GenRequest([257, 66], "broken", max_tokens=3, emit=got["bad"].append)
    engine.run_batch([bad, ok])
    assert got["bad"][-1][0] == "error" and "truncated" in got["bad"][-1][1]
    assert got["ok"][-1][0] == "done" and got["ok"][-1][1]["usage"]["completion_tokens"] >= 1
    snap = engine.metrics.snapshot()
    assert snap["errors_by_status"] == {"500": 1} and snap["requests"] == 1
