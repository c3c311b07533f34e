"""The model's adapter state: one object, written by inject/load/quantize, copied by deepcopy, removed by unload."""

import copy

import torch

import lorakit as lk
from lorakit.state import ATTR, AdapterState, peek_state, state_of


def _model(**cfg):
    torch.manual_seed(0)
    model = lk.build_model("tiny-llama", task="causal-lm").float()
    return lk.inject(model, lk.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"], **cfg))


def test_a_plain_model_has_no_state_and_reading_creates_none():
    model = lk.build_model("tiny-llama", task="causal-lm")
    assert lk.adapter_configs(model) == {} and lk.active_adapter(model) is None
    assert peek_state(model) is None and ATTR not in vars(model)


def test_inject_writes_one_state_object_and_it_is_the_only_lorakit_attribute():
    model = _model()
    state = peek_state(model)
    assert isinstance(state, AdapterState) and state.active == "default"
    assert state.configs is lk.adapter_configs(model) and list(state.configs) == ["default"]
    assert [a for a in vars(model) if "lorakit" in a] == [ATTR]


def test_deepcopy_copies_the_state_with_the_model():
    model = _model()
    twin = copy.deepcopy(model)  # what TRL does for its reference model
    assert peek_state(twin) is not peek_state(model)
    assert lk.adapter_configs(twin) == lk.adapter_configs(model) and lk.active_adapter(twin) == "default"
    lk.delete_adapter(twin, "default")
    assert list(lk.adapter_configs(model)) == ["default"]  # the original is untouched


def test_copy_is_a_snapshot_that_later_changes_do_not_reach():
    model = _model()
    snap = state_of(model).copy()
    lk.inject(model, lk.AdapterConfig(r=2, target_modules=["q_proj"]), adapter_name="b")
    assert list(snap.configs) == ["default"] and list(lk.adapter_configs(model)) == ["default", "b"]


def test_unload_removes_the_state_but_a_quantized_base_keeps_its_record():
    model = _model()
    lk.unload(model)
    assert peek_state(model) is None
    torch.manual_seed(0)
    q = lk.quantize(lk.build_model("tiny-llama", task="causal-lm").float())
    lk.inject(q, lk.AdapterConfig(r=4, target_modules=["q_proj"]))
    lk.unload(q, merge=False)
    state = peek_state(q)
    assert state is not None and state.configs == {} and isinstance(state.quant, lk.QuantConfig)
