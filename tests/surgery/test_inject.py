import copy

import pytest
import torch
from torch import nn

import lorakit as lk


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def test_inject_in_place_freezes_base_and_returns_same_object():
    model = tiny()
    out = lk.inject(model, lk.AdapterConfig(r=2, target_modules=["0", "2"]))
    assert out is model
    assert isinstance(model[0], lk.AdaptedLayer) and isinstance(model[1], nn.ReLU)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.adapters.default.lora_A.weight", "0.adapters.default.lora_B.weight",
                         "2.adapters.default.lora_A.weight", "2.adapters.default.lora_B.weight"]


def test_same_adapter_name_twice_is_an_error():
    model = lk.inject(tiny(), lk.AdapterConfig(target_modules=["0"]))
    with pytest.raises(lk.AdapterStateError, match="'default' is already in the model"):
        lk.inject(model, lk.AdapterConfig(target_modules=["2"]))


@pytest.mark.parametrize("bad", ["a/b", "a.b", "", "base", "x y"])
def test_bad_adapter_names(bad):
    with pytest.raises(lk.ConfigError, match="adapter_name"):
        lk.inject(tiny(), lk.AdapterConfig(target_modules=["0"]), adapter_name=bad)


def test_failed_injection_leaves_model_untouched():
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lk.TargetError):
        lk.inject(model, lk.AdapterConfig(target_modules=["0", "1"]))  # "1" is a ReLU
    assert not any(isinstance(m, lk.AdaptedLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_several_adapters_switch_disable_delete():
    model = tiny()
    x = torch.randn(3, 8)
    base_out = model(x)
    lk.inject(model, lk.AdapterConfig(r=2, target_modules=["0"]), adapter_name="a")
    lk.inject(model, lk.AdapterConfig(r=4, target_modules=["0", "2"]), adapter_name="b", activate=False)
    assert lk.active_adapter(model) == "a"
    for layer in (model[0], model[2]):
        for p in layer.adapters.parameters():
            p.data.normal_()
    out_a = model(x)
    lk.set_adapter(model, "b")
    out_b = model(x)
    assert not torch.allclose(out_a, out_b)
    assert all(p.requires_grad == (".b." in n) for n, p in model.named_parameters() if "adapters" in n)
    with lk.disabled(model):
        torch.testing.assert_close(model(x), base_out)
    torch.testing.assert_close(model(x), out_b)
    lk.delete_adapter(model, "b")
    assert lk.active_adapter(model) == "a"
    assert isinstance(model[2], nn.Linear)  # no adapter left there: reverted to the base module
    torch.testing.assert_close(model(x), out_a)
    with pytest.raises(lk.AdapterStateError, match="no adapter named 'b'"):
        lk.set_adapter(model, "b")


def test_layer_merge_round_trip_and_double_merge():
    model = lk.inject(tiny(), lk.AdapterConfig(r=2, target_modules=["0"]))
    model[0].adapters["default"].lora_B.weight.data.normal_()
    x = torch.randn(5, 8)
    unmerged = model(x)
    w0 = model[0].base.weight.clone()
    model[0].merge("default")
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-5)
    with pytest.raises(lk.AdapterStateError, match="already merged"):
        model[0].merge("default")
    model[0].unmerge()
    torch.testing.assert_close(model[0].base.weight, w0, atol=1e-6, rtol=1e-5)


def test_merge_refuses_non_finite():
    model = lk.inject(tiny(), lk.AdapterConfig(r=2, target_modules=["0"]))
    model[0].adapters["default"].lora_B.weight.data.fill_(float("inf"))
    w0 = model[0].base.weight.clone()
    with pytest.raises(lk.AdapterStateError, match="non-finite"):
        model[0].merge("default")
    assert torch.equal(model[0].base.weight, w0)
