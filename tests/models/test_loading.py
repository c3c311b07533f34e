"""Loading a pretrained model prints nothing that looks like a failure (issue 20 item 8)."""

import warnings

import lorakit as lk


def test_a_fresh_classifier_head_is_expected_not_reported(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        model = lk.build_model("minilm", task="classification", num_labels=3)
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "MISSING" not in err and "\x1b[" not in err, err
    assert model.classifier.out_features == 3


def test_weights_really_missing_are_one_warning(recwarn):
    lk.build_model("minilm", task="causal-lm")  # MiniLM's checkpoint has no LM-head transform
    msgs = [str(w.message) for w in recwarn.list if "missing from the checkpoint" in str(w.message)]
    assert len(msgs) == 1 and "cls.predictions" in msgs[0]
