"""The one set of field checks (lorakit.validation) that the adapter, quant and run configs share."""

import dataclasses

import pytest
import torch

from lorakit.config import ConfigError, QuantConfig
from lorakit.validation import DTYPES, check_choice, parse_dtype, read_section


def test_every_dtype_name_parses_and_the_run_config_and_quant_config_accept_the_same_names():
    assert {parse_dtype("dtype", n) for n in DTYPES} == {torch.float32, torch.float16, torch.bfloat16}
    for name in DTYPES:
        assert QuantConfig(compute_dtype=name).compute_dtype == DTYPES[name]
    with pytest.raises(ConfigError, match=r"compute_dtype='float8' is not supported"):
        parse_dtype("compute_dtype", "float8")


def test_check_choice_names_the_closest_choice_and_rejects_non_strings():
    with pytest.raises(ConfigError, match=r"x='cosin' is not supported; .* \(did you mean 'cosine'\?\)"):
        check_choice("x", "cosin", ("linear", "cosine"))
    with pytest.raises(ConfigError, match=r"x=1 is not supported"):
        check_choice("x", 1, ("1",))


@dataclasses.dataclass(frozen=True)
class _Section:
    name: str
    lr: float = 1e-3


def test_read_section_checks_keys_and_types_against_the_dataclass():
    assert read_section(_Section, "s", {"name": "a", "lr": "2e-4"}) == _Section("a", 2e-4)
    with pytest.raises(ConfigError, match=r"s: unknown key 'nmae' \(did you mean 'name'\?\)"):
        read_section(_Section, "s", {"nmae": "a"})
    with pytest.raises(ConfigError, match=r"s.name is missing"):
        read_section(_Section, "s", {})
