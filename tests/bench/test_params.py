import pytest

import lorakit as lk


@pytest.mark.parametrize("name, targets", [("tiny-llama", ["q_proj", "v_proj"]), ("tiny-gpt2", ["c_attn"]),
                                           ("tiny-bert", "all-linear")])
def test_per_layer_counts_equal_r_times_d_plus_k(name, targets):
    model = lk.build_model(name)
    base_total = sum(p.numel() for p in model.parameters())
    lk.inject(model, lk.AdapterConfig(r=4, target_modules=targets))
    rep = lk.efficiency_report(model)
    assert rep.layers
    for row in rep.layers:
        d, k = row.shape
        assert row.adapter_params == 4 * (d + k)
        assert row.share == pytest.approx(4 * (d + k) / (d * k))
    assert rep.trainable_params == sum(r.adapter_params for r in rep.layers)
    assert rep.base_params == base_total
    assert rep.total_params == base_total + rep.adapter_params
    assert rep.ratio == pytest.approx(rep.trainable_params / rep.total_params)
    assert rep.reduction_pct == pytest.approx(100 * (1 - rep.trainable_params / base_total))
    d = rep.as_dict()
    assert d["layers"][0]["adapter_params"] == rep.layers[0].adapter_params and "ratio" in d
    assert "reduction vs full FT" in rep.table()


def test_modules_to_save_count_as_trainable():
    model = lk.build_model("tiny-bert", task="classification")
    lk.inject(model, lk.AdapterConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    rep = lk.efficiency_report(model)
    head = 64 * 2 + 2
    assert rep.trainable_params == sum(r.adapter_params for r in rep.layers) + head
