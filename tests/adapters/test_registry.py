"""The method registry: a method defined here, outside lorakit, works through the normal API.

"toy" is a LoRA-like update with a scale of its own, ``h = W0 x + tau * B A x``: ``tau`` is a config
field only this method has (``method_options``), it adapts linear layers only, and it has its own PEFT
``peft_type`` and tensor names. The fixture registers it and always takes it out again.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import lorakit as lk
from lorakit import methods
from lorakit.adapters.base import copy_peft_state, method_callbacks
from lorakit.cli.main import main
from lorakit.config import ConfigError
from lorakit.methods import Method, Option, PeftCodec, json_field

TARGETS = ["q_proj", "v_proj"]
IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


class ToyLinear(nn.Module):
    """h = W0 x + tau * B A x; A (r, k) random, B (d, r) zero, so the model starts equal to the base."""

    def __init__(self, in_features: int, out_features: int, r: int, tau: float, device=None) -> None:
        super().__init__()
        self.r, self.scaling = r, tau
        self.toy_A = nn.Parameter(torch.randn(r, in_features, device=device) / in_features**0.5)
        self.toy_B = nn.Parameter(torch.zeros(out_features, r, device=device))

    def forward(self, x, base_out, access):
        a, b = self.toy_A, self.toy_B
        return base_out + (self.scaling * F.linear(F.linear(x.to(a.dtype), a), b)).to(base_out.dtype)

    def delta_weight(self, access):
        return self.scaling * self.toy_B @ self.toy_A

    def peft_state(self):
        return {"toy_A": self.toy_A, "toy_B": self.toy_B}

    def load_peft_state(self, state):
        copy_peft_state("toy", self.peft_state(), state)


def _build(access, cfg, module_name):
    return ToyLinear(access.in_features, access.out_features, cfg.rank_for(module_name), cfg.option("tau"),
                     device=access.device)


def _check_tau(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name}={value!r} is invalid; expected a positive number")


class Marker:
    """A trainer callback the method asks for (the registry's callbacks slot)."""


TOY = Method(
    "toy",
    _build,
    kinds=("linear",),
    options={"tau": Option(1.0, _check_tau, "scale of the update")},
    peft=PeftCodec(
        "LK_TOY",
        to_peft=lambda cfg, adapters: {"tau": cfg.option("tau")},
        from_peft=lambda d: {"r": json_field(d, "r", int, 8),
                             "method_options": {"tau": json_field(d, "tau", (int, float), 1.0)}},
        rank_keys=("toy_A",),
    ),
    callbacks=lambda model, name, cfg: [Marker()],
)


@pytest.fixture
def toy():
    methods.register(TOY)
    try:
        yield TOY
    finally:
        methods.unregister("toy")
    assert "toy" not in methods.names()


def _base():
    torch.manual_seed(0)
    return lk.build_model("tiny-llama").eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_method_registered_outside_lorakit_injects_trains_saves_and_loads(toy, tmp_path):
    cfg = lk.AdapterConfig(method="toy", r=2, target_modules=TARGETS, method_options={"tau": 0.5})
    model = lk.inject(_base(), cfg)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lk.AdaptedLayer)}
    assert len(layers) == 4 and all(isinstance(m.adapters["default"], ToyLinear) for m in layers.values())
    assert [type(c) for c in method_callbacks(model)] == [Marker]

    # one training step through the usual loop: only the toy's tensors train, and B moves off zero
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    own = {id(p) for m in layers.values() for p in m.adapters["default"].parameters()}
    assert {id(p) for p in trainable} == own
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    model.eval()
    name, layer = next(iter(layers.items()))
    adapter = layer.adapters["default"]
    assert adapter.toy_B.abs().sum() > 0

    # the layer computes the equation written out, with its own tau
    x = torch.randn(3, layer.base.in_features)
    with torch.no_grad():
        want = F.linear(x, layer.base.weight) + 0.5 * (x @ adapter.toy_A.t() @ adapter.toy_B.t())
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)

    ref = _logits(model)
    assert not torch.allclose(ref, _logits(_base()))
    lk.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LK_TOY" and saved["tau"] == 0.5 and saved["r"] == 2

    loaded = lk.load_adapter(_base(), tmp_path)
    assert lk.adapter_configs(loaded)["default"].method_options == {"tau": 0.5}
    torch.testing.assert_close(_logits(loaded), ref, rtol=1e-5, atol=1e-6)


def test_its_layer_kinds_and_own_field_are_checked(toy):
    with pytest.raises(lk.TargetError, match="'toy' supports linear layers only; 'model.embed_tokens'"):
        lk.find_targets(_base(), lk.AdapterConfig(method="toy", target_modules=["embed_tokens"]))
    with pytest.raises(ConfigError, match=r"method_options\.tau=-1 is invalid"):
        lk.AdapterConfig(method="toy", method_options={"tau": -1})
    with pytest.raises(ConfigError, match="unknown key 'taux' for method='toy' \\(did you mean 'tau'\\?\\)"):
        lk.AdapterConfig(method="toy", method_options={"taux": 1})
    with pytest.raises(ConfigError, match="unknown key 'tau' for method='lora'"):
        lk.AdapterConfig(method="lora", method_options={"tau": 1})
    assert lk.AdapterConfig(method="toy").option("tau") == 1.0
    # a YAML run config takes the method and its options
    from lorakit.train.config import RunConfig

    run = RunConfig.from_dict(yaml.safe_load(
        "model: {name: tiny-llama}\ndata: {train: t.jsonl}\noutput: {dir: out}\n"
        "adapter: {method: toy, method_options: {tau: 0.25}}\n"
    ), base_dir="/base")
    assert run.adapter.option("tau") == 0.25 and RunConfig.from_dict(run.to_dict(), base_dir="/base") == run


def test_cli_choices_come_from_the_registry(toy, capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert "{lora,dora,adalora,toy}" in capsys.readouterr().out
    methods.unregister("toy")
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert "{lora,dora,adalora}" in capsys.readouterr().out


def test_unknown_method_and_variants():
    with pytest.raises(ConfigError, match=r"method='toy' is not supported; expected one of \['lora', 'd"):
        lk.AdapterConfig(method="toy")
    assert methods.setups() == ("full", "lora", "qlora", "loftq", "olora", "corda", "loraplus", "dora", "adalora")
    assert methods.adapter_method("qlora") == "lora" and methods.adapter_method("full") is None
    with pytest.raises(ConfigError, match="taken by a training setup"):
        methods.register(Method("qlora", _build))
