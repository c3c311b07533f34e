"""Loading a pretrained model prints nothing that looks like a failure (issue 20 item 8)."""

import warnings

import pytest

import lorakit as lk
from lorakit.models.builtin import ModelError, require_causal_lm


def test_a_fresh_classifier_head_is_expected_not_reported(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        model = lk.build_model("minilm", task="classification", num_labels=3)
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "MISSING" not in err and "\x1b[" not in err, err
    assert model.classifier.out_features == 3


def test_weights_really_missing_are_one_warning(tmp_path, recwarn):
    from safetensors.torch import load_file, save_file

    lk.build_model("tiny-llama").save_pretrained(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["model.norm.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    lk.build_model(str(tmp_path))
    msgs = [str(w.message) for w in recwarn.list if "missing from the checkpoint" in str(w.message)]
    assert len(msgs) == 1 and "model.norm.weight" in msgs[0]


def test_an_encoder_is_refused_as_a_causal_lm():
    """`lorakit generate --model minilm` printed "stuff stuff stuff" (issue 20 item 5)."""
    with pytest.raises(ModelError, match="encoder.*not a causal language model"):
        require_causal_lm("minilm")
    with pytest.raises(ModelError, match="not a causal language model"):
        require_causal_lm("tiny-bert")
    require_causal_lm("tiny-gpt2")  # decoders pass
    from lorakit.cli.main import main

    assert main(["generate", "--model", "minilm", "--prompt", "hello"]) == 2


def test_serving_an_encoder_is_refused_at_start():
    """`lorakit serve --model minilm --adapter qs=...` gave an opaque modules_to_save error (issue 20 item 5)."""
    from lorakit.serving.server import build_app

    with pytest.raises(ModelError, match="not a causal language model"):
        build_app("minilm", adapters={})
