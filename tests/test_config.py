import pytest
import torch

from lorakit.config import AdapterConfig, ConfigError, QuantConfig


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(r=0), "r=0"),
        (dict(r=-3), "r=-3"),
        (dict(r=2.5), "r=2.5"),
        (dict(alpha=0), "alpha=0"),
        (dict(alpha=-1.0), "alpha=-1.0"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(dropout=-0.1), "dropout=-0.1"),
        (dict(method="lorax"), "method='lorax'"),
        (dict(init="kaiming"), "init='kaiming'"),
        (dict(target_modules="q_proj("), "does not compile"),
        (dict(target_modules=[]), "empty list"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
        (dict(rank_pattern={"(": 4}), "does not compile"),
        (dict(layers_to_transform=[-1]), "layers_to_transform"),
        (dict(method="adalora", init_r=4, target_r=8), "target_r=8 is larger than init_r=4"),
        (dict(method="adalora", beta1=1.0), "beta1"),
        (dict(method="adalora", tinit=10, tfinal=10, total_step=15), "total_step=15 is too small"),
        (dict(method="dora", init="pissa"), "pissa"),
    ],
)
def test_bad_adapter_config_names_the_field(kwargs, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        AdapterConfig(**kwargs)
    assert fragment in str(err.value)


def test_unknown_method_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'dora'"):
        AdapterConfig(method="doar")


def test_from_dict_rejects_unknown_key_with_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'target_modules'"):
        AdapterConfig.from_dict({"target_module": ["q_proj"]})


def test_round_trip_dict_and_patterns():
    cfg = AdapterConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.0\..*": 3})
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert cfg.rank_for("model.layers.1.self_attn.v_proj") == 4
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 3
    assert cfg.alpha_for("model.layers.1.self_attn.v_proj") == 16


def test_quant_config_validation():
    assert QuantConfig(compute_dtype="fp32").compute_dtype == torch.float32
    with pytest.raises(ConfigError, match="blocksize=48"):
        QuantConfig(blocksize=48)
    with pytest.raises(ConfigError, match="dtype='nf3'"):
        QuantConfig(dtype="nf3")
    with pytest.raises(ConfigError, match="compute_dtype"):
        QuantConfig(compute_dtype="float8")


def test_public_api_resolves():
    import lorakit

    for name in lorakit.__all__:
        assert getattr(lorakit, name) is not None, name
