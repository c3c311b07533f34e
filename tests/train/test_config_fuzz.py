"""Property-based tests of the run-config parser (``lorakit train``'s YAML): a valid config in the real
shape with exactly one field broken must give a one-line ``ConfigError`` naming that field, never a raw
KeyError/TypeError/ValueError, and never be accepted; the same field set to a valid value is accepted and
survives ``to_dict``/``from_dict``. The schema below is the test's own statement of what each field
allows (written from the docstrings of ``lorakit.train.config`` and ``lorakit.config``), not read from
the code under test. Bounded in count: each test runs a fixed, derandomized set of examples."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lorakit.config import ConfigError
from lorakit.train.config import RunConfig, apply_overrides, load_run_config

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
INT64 = 2**63

# A config with every section and every field set, as a user writes it (cf. configs/defaults.yaml).
BASE: dict = {
    "model": {"name": "tiny-llama", "dtype": "auto", "tokenizer": "tok"},
    "data": {
        "train": "data/train.jsonl",
        "validation": None,
        "val_fraction": 0.0,
        "task": "sft",
        "fields": {"text": "sentence"},
        "format": "auto",
        "max_length": 512,
        "batching": "group",
        "max_train_rows": 100,
        "max_val_rows": 10,
    },
    "adapter": {
        "method": "lora",
        "r": 8,
        "alpha": 16,
        "dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "exclude_modules": None,
        "layers_to_transform": [0, 1],
        "layers_pattern": "layers",
        "rank_pattern": {"q_proj": 4},
        "alpha_pattern": {"v_proj": 8.0},
        "modules_to_save": [],
        "use_rslora": False,
        "init": "default",
        "bias": "none",
        "init_r": 12,
        "target_r": 8,
        "tinit": 0,
        "tfinal": 0,
        "delta_t": 1,
        "beta1": 0.85,
        "beta2": 0.85,
        "orth_reg_weight": 0.5,
        "total_step": None,
        "method_options": {},
    },
    "quant": {
        "dtype": "nf4",
        "blocksize": 64,
        "double_quant": True,
        "double_quant_blocksize": 256,
        "compute_dtype": "bfloat16",
        "skip": ["lm_head"],
    },
    "training": {
        "epochs": 3,
        "max_steps": 100,
        "batch_size": 4,
        "grad_accumulation": 8,
        "lr": "2e-4",
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "warmup_ratio": 0.03,
        "warmup_steps": None,
        "schedule": "linear",
        "max_grad_norm": 1.0,
        "mixed_precision": "auto",
        "gradient_checkpointing": True,
        "num_workers": 0,
        "eval_every": 10,
        "eval_at_start": True,
        "eval_batch_size": 8,
        "log_every": 1,
        "max_nonfinite": 3,
        "seed": 0,
        "device": "auto",
        "compile": False,
        "return_freed_memory": True,
        "distributed": "ddp",
        "distributed_timeout_s": 600.0,
        "report_to": [],
    },
    "output": {"dir": "out", "save_every": 10, "keep_last": 2, "progress": False, "plot": False},
}
# The same run as an AdaLoRA adapter (its fields are checked in ranges of their own).
ADALORA = copy.deepcopy(BASE)
ADALORA["adapter"].update(method="adalora", total_step=100, tinit=5, tfinal=5, rank_pattern={})


MIXED = ("auto", "no", "fp32", "bf16", "fp16")


# ------------------------------------------------------------------ the schema: field -> valid(value)
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _good(ok, strategy):
    """Attach the strategy of valid values a field's predicate ``ok`` allows (for the accepted side)."""
    ok.good = strategy.filter(ok)
    return ok


def _maybe_none(strategy, optional: bool):
    return st.one_of(st.none(), strategy) if optional else strategy


def _int(lo: int, optional: bool = False):
    values = st.one_of(st.integers(lo, lo + 100), st.integers(lo, INT64 - 1))
    return _good(lambda v: (optional and v is None) or (_is_int(v) and lo <= v < INT64), _maybe_none(values, optional))


def _steps(lo: int):
    """An AdaLoRA schedule field: a step count (int >= lo) or a fraction of the run (a float in (0, 1); 0.0 where
    0 steps is allowed)."""
    def ok(v) -> bool:
        if isinstance(v, float):
            return 0.0 < v < 1.0 or (v == 0.0 and lo == 0)
        return _is_int(v) and lo <= v < INT64

    return _good(ok, st.one_of(st.integers(lo, lo + 100), st.floats(0.001, 0.999)))


def _as_float(v, strings: bool):
    """What a float field reads: a number, or (YAML 1.1 reads 2e-4 as a string) a numeric string."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) or (isinstance(v, str) and not strings):
        return None
    try:
        return float(v)
    except (ValueError, OverflowError):
        return None


def _float(lo: float, hi: float = math.inf, lo_open=False, hi_open=True, optional=False, strings=True):
    def ok(v) -> bool:
        if optional and v is None:
            return True
        f = _as_float(v, strings)
        if f is None or not math.isfinite(f):
            return False
        return (f > lo if lo_open else f >= lo) and (f < hi if hi_open else f <= hi)

    top = min(hi, 1e300)
    numbers = st.floats(lo, top, exclude_min=lo_open, exclude_max=hi_open and top == hi)
    values = st.one_of(numbers, numbers.map(repr)) if strings else numbers
    return _good(ok, _maybe_none(values, optional))


def _bool(v) -> bool:
    return isinstance(v, bool)


def _choice(*allowed):
    return _good(lambda v: isinstance(v, str) and v in allowed, st.sampled_from(allowed))


def _text(optional: bool = False):
    """A name or path: a non-blank string without NUL that the OS can encode."""

    def ok(v) -> bool:
        if optional and v is None:
            return True
        if not isinstance(v, str) or not v.strip() or "\x00" in v:
            return False
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    return _good(ok, _maybe_none(st.text(min_size=1, max_size=10), optional))


def _regex(v) -> bool:
    if not isinstance(v, str) or not v:
        return False
    try:
        re.compile(v)
    except (re.error, OverflowError, RecursionError):
        return False
    return True


def _targets(v) -> bool:
    if v is None or v == "all-linear":
        return True
    if isinstance(v, str):
        return _regex(v)
    return isinstance(v, list) and bool(v) and all(isinstance(s, str) and s for s in v)


def _layers(v) -> bool:
    if v is None or _int(0)(v):
        return True
    return isinstance(v, list) and bool(v) and all(_int(0)(i) for i in v)


TRACKERS = ("tensorboard", "mlflow", "trackio")


def _report_to_ok(v) -> bool:
    """None / "none" / one tracker name / a list of distinct tracker names."""
    if v is None or isinstance(v, str) and (v == "none" or v in TRACKERS):
        return True
    return isinstance(v, list) and all(isinstance(s, str) and s in TRACKERS for s in v) and len(set(v)) == len(v)


_REPORT_TO = _good(_report_to_ok, st.one_of(st.sampled_from([None, "none", *TRACKERS]),
                                            st.lists(st.sampled_from(TRACKERS), unique=True, max_size=3)))


def _str_list(v) -> bool:
    return v is None or isinstance(v, list) and all(isinstance(s, str) and s for s in v)


def _rank_value(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return math.isfinite(v) and v >= 1 and int(v) == v and v < INT64


def _pattern(value_ok, values):
    ok = lambda v: v is None or (  # noqa: E731
        isinstance(v, dict) and all(_regex(k) and value_ok(x) for k, x in v.items())
    )
    return _good(ok, st.one_of(st.none(), st.dictionaries(REGEX_OK, values, max_size=2)))


def _pow2(v) -> bool:
    return _is_int(v) and 2 <= v < INT64 and v & (v - 1) == 0


def _device(v) -> bool:
    if not isinstance(v, str):
        return False
    if v == "auto":
        return True
    try:
        torch.device(v)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


NAMES = st.lists(st.sampled_from(["q_proj", "v_proj", "lm_head", "layers.0.mlp", "0"]), min_size=1, max_size=3)
REGEX_OK = st.sampled_from(["q_proj", ".*\\.v_proj", "k_proj$", "(q|v)_proj", " "])
_good(_bool, st.booleans())
_good(_targets, st.one_of(st.none(), st.just("all-linear"), NAMES, REGEX_OK))
_good(_layers, st.one_of(st.none(), st.integers(0, 99), st.lists(st.integers(0, 99), min_size=1, max_size=3)))
_good(_str_list, st.one_of(st.none(), st.just([]), NAMES))
_good(_pow2, st.integers(1, 62).map(lambda e: 2**e))
_good(_device, st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "meta"]))


def _fields(v) -> bool:
    names = ("text", "text_pair", "label", "prompt", "completion", "instruction", "input", "output", "messages")
    return isinstance(v, dict) and all(k in names and isinstance(x, str) and x for k, x in v.items())


def _betas(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_float(0.0, 1.0)(b) for b in v)


_FIELD_NAMES = ["text", "text_pair", "label", "prompt", "completion", "instruction", "input", "output", "messages"]
_good(_fields, st.dictionaries(st.sampled_from(_FIELD_NAMES), st.text(min_size=1, max_size=6), max_size=3))
_good(_betas, st.lists(_float(0.0, 1.0).good, min_size=2, max_size=2))
_SEED = _good(lambda v: _is_int(v) and -INT64 <= v < INT64, st.integers(-INT64, INT64 - 1))


SCHEMA: dict[str, dict] = {
    "model": {"name": _text(), "dtype": _choice("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
              "tokenizer": _text(optional=True)},
    "data": {
        "train": _text(),
        "validation": _text(optional=True),
        "val_fraction": _float(0.0, 1.0),
        "task": _choice("sft", "classification"),
        "fields": _fields,
        "format": _choice("auto", "messages", "alpaca", "prompt_completion", "text"),
        "max_length": _int(1),
        "batching": _choice("group", "pad", "pack"),
        "max_train_rows": _int(1, optional=True),
        "max_val_rows": _int(1, optional=True),
    },
    "adapter": {
        "method": _choice("lora", "dora", "adalora"),
        "r": _int(1),
        "alpha": _float(0.0, lo_open=True),
        "dropout": _float(0.0, 1.0),
        "target_modules": _targets,
        "exclude_modules": _targets,
        "layers_to_transform": _layers,
        "layers_pattern": _text(optional=True),
        "rank_pattern": _pattern(_rank_value, st.one_of(st.integers(1, 64), st.just(2.0))),
        "alpha_pattern": _pattern(_float(0.0, lo_open=True, strings=False), st.floats(1e-3, 1e3)),
        "modules_to_save": _str_list,
        "use_rslora": _bool,
        "init": _choice("default", "gaussian", "pissa"),
        "bias": _choice("none"),
        "init_r": _int(1),
        "target_r": _int(1),
        "tinit": _steps(0),
        "tfinal": _steps(0),
        "delta_t": _steps(1),
        "beta1": _float(0.0, 1.0, lo_open=True),
        "beta2": _float(0.0, 1.0, lo_open=True),
        "orth_reg_weight": _float(0.0),
        "total_step": _int(1, optional=True),
        # the built-in methods declare no options of their own (tests/adapters/test_registry.py adds one)
        "method_options": _good(lambda v: v is None or v == {}, st.one_of(st.none(), st.just({}))),
    },
    "quant": {
        "dtype": _choice("nf4", "fp4", "int8"),
        "blocksize": _pow2,
        "double_quant": _bool,
        "double_quant_blocksize": _pow2,
        "compute_dtype": _choice("bfloat16", "bf16", "float16", "fp16", "float32", "fp32"),
        "skip": _str_list,
    },
    "training": {
        "epochs": _int(1),
        "max_steps": _int(1, optional=True),
        "batch_size": _int(1),
        "grad_accumulation": _int(1),
        "lr": _float(0.0, lo_open=True),
        "optimizer": _choice("adamw"),
        "weight_decay": _float(0.0),
        "betas": _betas,
        "eps": _float(0.0),
        "warmup_ratio": _float(0.0, 1.0),
        "warmup_steps": _int(0, optional=True),
        "schedule": _choice("linear", "cosine", "constant"),
        "max_grad_norm": _float(0.0, optional=True),
        # YAML 1.1 reads `mixed_precision: no` as False; the parser takes False as "no"
        "mixed_precision": _good(lambda v: v is False or (isinstance(v, str) and v in MIXED),
                                 st.sampled_from([False, *MIXED])),
        "gradient_checkpointing": _bool,
        "num_workers": _int(0, optional=True),
        "eval_every": _int(1, optional=True),
        "eval_at_start": _bool,
        "eval_batch_size": _int(1, optional=True),
        "log_every": _int(1),
        "max_nonfinite": _int(1),
        "seed": _SEED,
        "device": _device,
        "compile": _bool,
        "return_freed_memory": _bool,
        "distributed": _good(lambda v: v is None or (isinstance(v, str) and v in ("none", "ddp", "fsdp")),
                             st.sampled_from([None, "none", "ddp", "fsdp"])),
        "distributed_timeout_s": _float(0.0, 7 * 24 * 3600.0, lo_open=True, hi_open=False, optional=True),
        "report_to": _REPORT_TO,
    },
    "output": {"dir": _text(), "save_every": _int(0, optional=True), "keep_last": _int(1),
               "progress": _bool, "plot": _bool},
}
FIELDS = [(s, k) for s, keys in SCHEMA.items() for k in keys]
REQUIRED = {("model", "name"), ("data", "train"), ("output", "dir")}


def test_schema_covers_every_field():
    """The schema above lists every field the parser knows (a new field needs a line here)."""
    cfg = RunConfig.from_dict(BASE)
    assert {s: sorted(v) for s, v in cfg.to_dict().items()} == {s: sorted(v) for s, v in SCHEMA.items()}
    for section, key in FIELDS:
        assert SCHEMA[section][key](BASE[section][key]), (section, key)
        assert SCHEMA[section][key](ADALORA[section][key]), (section, key)


# --------------------------------------------------------------------------- generated bad values
HUGE = st.sampled_from([10**30, 2**63, 2**64, -(2**63) - 1, 10**400, 1e300, -1e300])
NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf", "-inf", ".nan", "1e400"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "yes", "1e-4", "2", "True", "null", "[]"]),
    HUGE,
    NONFINITE,
)
CONTAINERS = st.one_of(
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-3, 3), st.none()), SCALARS, max_size=3),
)
ANY_VALUE = st.one_of(SCALARS, CONTAINERS)
REGEXES = st.sampled_from(["q_proj", "(", "a{99999999999}", "(" * 200 + ")" * 200, "", ".*", "[", "k_proj$"])
# Values in the shape of a field but wrong inside (a list of the wrong items, a bad pattern, ...).
SHAPED = st.one_of(
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=4), st.none(), st.floats(-2, 2)), max_size=3),
    st.dictionaries(REGEXES, st.one_of(SCALARS, st.integers(-3, 3)), min_size=1, max_size=2),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=3),
    st.lists(st.integers(-(2**70), 2**70), min_size=1, max_size=3),
    REGEXES,
)
VALUES = st.one_of(ANY_VALUE, SHAPED)


def with_field(base: dict, section: str, key: str, value) -> dict:
    data = copy.deepcopy(base)
    data[section][key] = value
    return data


def check_error(err: ConfigError, *names: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for name in names:
        assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg), (name, msg)


def parse(data: dict) -> RunConfig:
    """from_dict with a round trip check on success: a config that parses means what it says."""
    cfg = RunConfig.from_dict(data, base_dir="/base")
    assert RunConfig.from_dict(cfg.to_dict(), base_dir="/base") == cfg
    return cfg


# ------------------------------------------------------------------------------------------- tests
@settings(FUZZ, max_examples=400)
@given(st.sampled_from(FIELDS), VALUES, st.sampled_from([BASE, ADALORA]))
def test_one_broken_field_is_a_one_line_error_naming_it(field, value, base):
    section, key = field
    assume(not SCHEMA[section][key](value))
    with pytest.raises(ConfigError) as err:
        parse(with_field(base, section, key, value))
    check_error(err.value, section, key)


@settings(FUZZ, max_examples=150)
@given(st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f), SCHEMA[f[0]][f[1]].good)))
def test_a_valid_field_is_accepted(field_value):
    """The other side: whatever the schema allows parses (and round-trips), so the errors above are not
    the parser refusing everything. Based on the LoRA config, where one field cannot break a rule
    between fields."""
    (section, key), value = field_value
    parse(with_field(BASE, section, key, value))


STRUCTURE = st.one_of(
    st.tuples(st.just("missing"), st.sampled_from(sorted(REQUIRED | {("model", None), ("data", None),
                                                                      ("output", None)}, key=str))),
    st.tuples(st.just("unknown"), st.sampled_from([*SCHEMA, None]), st.one_of(st.text(max_size=8),
                                                                          st.integers(), st.none())),
    st.tuples(st.just("scalar"), st.sampled_from(list(SCHEMA)),
              st.one_of(st.booleans(), st.integers(), st.text(max_size=5), st.lists(SCALARS, max_size=2),
                        st.floats())),
    st.tuples(st.just("top"), st.one_of(SCALARS, st.lists(SCALARS, max_size=3))),
)


@settings(FUZZ, max_examples=200)
@given(STRUCTURE, st.sampled_from([BASE, ADALORA]))
def test_broken_structure_is_a_one_line_error(change, base):
    """A required field or section missing, an unknown key or section, a section that is a scalar or a
    list instead of a mapping, or the whole document not a mapping."""
    data = copy.deepcopy(base)
    kind = change[0]
    if kind == "missing":
        section, key = change[1]
        if key:
            del data[section][key]
        else:
            del data[section]
        names, reprs = [section] + ([key] if key else []), []
    elif kind == "unknown":
        section, key = change[1], change[2]
        target = data if section is None else data[section]
        assume(key not in target)
        target[key] = 1
        names, reprs = ([] if section is None else [section]), [repr(key)]
    elif kind == "scalar":
        section, value = change[1], change[2]
        assume(value is not None and not (section in ("training", "adapter", "quant") and value == {}))
        data[section] = value
        names, reprs = [section], []
    else:
        data, names, reprs = change[1], [], []
    with pytest.raises(ConfigError) as err:
        parse(data)
    check_error(err.value, *names)
    for r in reprs:
        assert r in str(err.value), (r, str(err.value))


def test_null_optional_sections_are_defaults():
    """``training:``, ``adapter:`` and ``quant:`` left empty (null) mean the defaults / no quantization."""
    for section in ("training", "adapter", "quant"):
        cfg = parse({**copy.deepcopy(BASE), section: None})
        assert getattr(cfg, section) is None if section == "quant" else getattr(cfg, section) is not None


@settings(FUZZ, max_examples=200)
@given(st.sampled_from(FIELDS), VALUES)
def test_set_overrides_with_one_bad_value(field, value):
    """``--set section.key=value`` (the value parsed as YAML) breaks one field the same way."""
    section, key = field
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        if text.endswith("\n...") or text.endswith(" ..."):
            text = text.rsplit("...", 1)[0].strip()
        parsed = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        assume(False)
    assume("\n" not in text and not SCHEMA[section][key](parsed))
    data = copy.deepcopy(BASE)
    data["data"]["train"] = "/abs/train.jsonl"
    with pytest.raises(ConfigError) as err:
        parse(apply_overrides(data, [f"{section}.{key}={text}"]))
    check_error(err.value, section, key)


@settings(FUZZ, max_examples=200)
@given(
    st.one_of(
        st.text(max_size=30),
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from([f"{s}.{k}" for s, k in FIELDS]), st.text(max_size=12)),
        st.builds(
            lambda s, k, v: f"{s}.{k}={v}",
            st.sampled_from([*SCHEMA, "", "train", "training.lr", "data.fields"]),
            st.text(max_size=8),
            st.sampled_from(["1", "[1, 2]", "{a: 1}", "null", "{", "'", "!!python/object:os.system", "&a [*a]"]),
        ),
    )
)
def test_any_set_override_is_parsed_or_a_one_line_error(item):
    """Arbitrary ``--set`` strings: the result is a config or a one-line ConfigError, nothing else."""
    data = copy.deepcopy(BASE)
    try:
        parse(apply_overrides(data, [item]))
    except ConfigError as e:
        check_error(e)


@settings(FUZZ, max_examples=50)
@given(st.sampled_from(FIELDS), VALUES)
def test_yaml_file_with_one_bad_field(tmp_path_factory, field, value):
    """The path ``lorakit train config.yaml`` takes: the error starts with the file and names the field."""
    section, key = field
    data = with_field(BASE, section, key, value)
    try:
        text = yaml.safe_dump(data)
        parsed = yaml.safe_load(text)[section][key]
    except yaml.YAMLError:
        assume(False)
    assume(not SCHEMA[section][key](parsed))
    path = tmp_path_factory.getbasetemp() / "fuzz_run.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(err.value).startswith(str(path))
    check_error(err.value, section, key)
