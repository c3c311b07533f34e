"""Property-based tests of ``lorakit.load_adapter`` on PEFT-format directories: a valid saved adapter
(LoRA, DoRA, AdaLoRA with pruned ranks) with exactly one thing broken -- a config field, a tensor, the
JSON, the safetensors bytes -- must raise an ``AdapterFileError`` on one line naming the file and the
field, key or module, never a raw KeyError/TypeError/RuntimeError; and the model it was loaded into must
be exactly as it was: the same parameter objects with the same bits, buffers, module tree, hooks,
requires_grad, ``lorakit*`` attributes and output on a fixed input. After each batch the valid adapter
still loads into that same model and gives the saving model's output. Bounded and derandomized."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

import lorakit as lk
from helpers import logits_of
from lorakit.adapters.adalora import AdaLoraController
from lorakit.io import AdapterFileError, load_adapter, save_adapter

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
PREFIX = "base_model.model."
X = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
CONFIGS = {
    "lora": lk.AdapterConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4.0}
    ),
    "dora": lk.AdapterConfig(method="dora", r=2, target_modules=["q_proj", "o_proj"]),
    "adalora": lk.AdapterConfig(
        method="adalora", init_r=4, target_r=2, tinit=2, tfinal=3, total_step=20, target_modules=["q_proj", "v_proj"]
    ),
}
TARGETS = {m: list(c.target_modules) for m, c in CONFIGS.items()}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build():
    return lk.build_model("tiny-llama", seed=0).float().eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """method -> (directory, config json, tensors, logits of the model that saved it)."""
    out = {}
    for method, cfg in CONFIGS.items():
        torch.manual_seed(1)
        model = lk.inject(build(), cfg)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
            if method == "adalora":  # prune ranks, so the file carries PEFT's rank_pattern masks
                for i, a in enumerate(AdaLoraController(model).layers.values()):
                    a.apply_mask(torch.tensor([True, i % 2 == 0, False, True]))
        path = save_adapter(model, tmp_path_factory.mktemp(method))
        with torch.no_grad():
            ref = logits_of(model(X)).clone()
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        out[method] = (path, config, load_file(os.path.join(path, "adapter_model.safetensors")), ref)
    assert out["adalora"][1]["rank_pattern"], "the AdaLoRA file must carry kept-rank masks"
    return out


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.detach().cpu().contiguous().view(torch.uint8).numpy())


def fingerprint(model) -> dict:
    """Everything a load could change, bit-exact; parameters also by identity (an optimizer holds them)."""
    with torch.no_grad():
        out = _bits(logits_of(model(X)))
    return {
        "modules": [
            (n, type(m).__name__, m.training, list(m._forward_pre_hooks), list(m._forward_hooks))
            for n, m in model.named_modules(remove_duplicate=False)
        ],
        "params": [
            (n, id(p), p.requires_grad, p.dtype, tuple(p.shape), _bits(p))
            for n, p in model.named_parameters(remove_duplicate=False)
        ],
        "buffers": [(n, b.dtype, tuple(b.shape), _bits(b)) for n, b in model.named_buffers(remove_duplicate=False)],
        "attrs": {k: repr(v) for k, v in vars(model).items() if "lorakit" in k},
        "active": lk.active_adapter(model),
        "configs": dict(lk.adapter_configs(model)),
        "output": out,
    }


def _holder(saved):
    model = build()
    load_adapter(model, saved["lora"][0], adapter_name="first")
    return model


@pytest.fixture
def models(saved):
    """A plain base, and one already holding an active adapter 'first' (which must stay as it is);
    with the functions that build them again."""
    makers = [build, lambda: _holder(saved)]
    return [[m, fingerprint(m), make] for make in makers for m in [make()]]


def write(workdir, config=None, tensors=None, config_text=None, weights=None):
    """An adapter directory with the given contents (what is not given is left out)."""
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    if config_text is None and config is not None:
        config_text = json.dumps(config)
    if config_text is not None:
        with open(os.path.join(workdir, "adapter_config.json"), "wb") as f:
            f.write(config_text if isinstance(config_text, bytes) else config_text.encode("utf-8", "surrogatepass"))
    if weights is None and tensors is not None:
        weights = save(tensors)
    if weights is not None:
        with open(os.path.join(workdir, "adapter_model.safetensors"), "wb") as f:
            f.write(weights)
    return workdir


def check_refused(models, workdir, *names):
    """Loading ``workdir`` fails with one line naming the directory's file and one of ``names``, and leaves
    each model exactly as it was."""
    for entry in models:
        model, before, make = entry
        try:
            load_adapter(model, workdir)
        except AdapterFileError as e:
            msg = str(e)
        else:
            entry[0] = make()  # the next examples start from an untouched model again
            entry[1] = fingerprint(entry[0])
            pytest.fail("a broken adapter was loaded without an error")
        assert "\n" not in msg and str(workdir) in msg, msg
        assert not names or any(n in msg for n in names), (names, msg)
        after = fingerprint(model)
        for key in before:
            assert after[key] == before[key], key


def check_valid_load(models, saved, method):
    """The valid adapter still loads into the models that refused the broken ones (then is removed)."""
    path, _, _, ref = saved[method]
    for model, before, _ in models:
        load_adapter(model, path, adapter_name="valid", activate=True)
        with torch.no_grad():
            out = logits_of(model(X))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        lk.delete_adapter(model, "valid")
        if before["active"] is not None:
            lk.set_adapter(model, before["active"])


# ------------------------------------------------------------------------------- config field values
NUMBERS_BAD = [math.nan, math.inf, -math.inf, 10**400, -1, 0, -0.5]
WRONG_TYPES = ["x", "", True, [], [1], {}, {"a": 1}]


def _common_bad(method: str) -> dict[str, list]:
    first, second = TARGETS[method]
    return {
        "peft_type": ["IA3", "lora", "", None, 5, ["LORA"], {"a": 1}, "ADALORA" if method != "adalora" else "LORA"],
        "lora_alpha": NUMBERS_BAD + WRONG_TYPES,
        "lora_dropout": [math.nan, math.inf, -0.1, 1, 1.0, 5, 10**400, "0.1", True, [], {}],
        "target_modules": [[first], [second], ["k_proj"], "all-linear", [first, second, "k_proj"], ["nothing"],
                           [], [""], "", "(", first, [1], [first, None], 5, True, {first: 1}],
        "exclude_modules": [[first], [second], "(", 5, True, [1], [], "", {"a": 1}],
        "layers_to_transform": [[0], [1], [5], [-1], -1, 0, "0", ["a"], [1.5], [True], True, 1.5, {}, [2**70], 10**30,
                                []],
        "layers_pattern": [5, True, [], [5], ["a", "b"], {}, ""],
        "alpha_pattern": [{first: v} for v in [0, -1, math.nan, math.inf, "4", True, None, [1], 10**400]]
        + [5, [], "q", {"(": 1.0}, {"": 1.0}],
        "use_rslora": ["yes", 1, 0, [], {}, "true"] + ([True] if method == "adalora" else []),
        "use_dora": (["yes", 1, 0, [], {}] + ([True] if method == "lora" else [])
                     + ([False, None] if method == "dora" else [])),
        "bias": ["all", "lora_only", 5, True, [], ""],
        "init_lora_weights": ["loftq", "olora", "corda", 5, [], {}, ""],
        "modules_to_save": ["lm_head", [5], [""], 5, True, {"a": 1}, ["lm_head"], ["model.embed_tokens"], [first]],
        "lora_bias": [True],
        "layer_replication": [[[0, 1]]],
        "use_qalora": [True],
        "target_parameters": [["model.layers.0.mlp.up_proj.weight"]],
        "trainable_token_indices": [[1, 2]],
        "task_type": [5, [], {}, True],
        "base_model_name_or_path": [5, [], {}, True],
    }


def _rank_bad(method: str, config: dict) -> dict[str, list]:
    first = TARGETS[method][0]
    if method != "adalora":
        r = config["r"]
        bad = {"r": [0, -1, r - 1, r + 1, 10**12, 10**30, 2**63, float(r), str(r), True, None, [r], math.nan]}
        bad["rank_pattern"] = [{first: v} for v in [0, -1, r + 1, 2.5, math.nan, math.inf, "2", True, 10**12, None]]
        bad["rank_pattern"] += [{"(": 2}, {"": 2}, 5, [], first]
        if method == "lora":
            bad["rank_pattern"] += [None, {}]  # the file's v_proj tensors hold rank 2, not r
        return bad
    masks = config["rank_pattern"]
    key = sorted(masks)[0]
    mask = masks[key]
    flipped = [not b if i == 0 else b for i, b in enumerate(mask)]
    return {
        "init_r": [0, -1, len(mask) - 1, len(mask) + 1, 10**9, 10**30, str(len(mask)), float(len(mask)), True, None,
                   [4]],
        "target_r": [0, -1, len(mask) + 1, 10**30, "2", 2.0, True, [2], None],
        "tinit": [-1, "0", 1.5, True, [], 10**30, 20, 2**63],
        "tfinal": [-1, "0", 1.5, True, [], 10**30, 20, 2**63],
        "deltaT": [0, -1, "1", 1.5, True, [], 2**63],
        "beta1": [0, 1, -0.5, 1.5, math.nan, math.inf, True, [], "x"],
        "beta2": [0, 1, -0.5, 1.5, math.nan, math.inf, True, [], "x"],
        "orth_reg_weight": [-1, math.nan, math.inf, -math.inf, True, [], 10**400, "x"],
        "total_step": [0, -1, 5, "20", 20.5, True, [], 2**63],
        "rank_pattern": [
            None, {}, 5, [], "x",
            {**masks, key: mask[:-1]}, {**masks, key: mask + [True]}, {**masks, key: [int(b) for b in mask]},
            {**masks, key: ["True"] * len(mask)}, {**masks, key: flipped}, {**masks, key: None}, {**masks, key: 5},
            {**masks, f"{PREFIX}model.layers.0.self_attn.k_proj.lora_E": mask},
            {k: v for k, v in masks.items() if k != key},
        ],
    }


# Generated values of a type a field never takes, by the kind of field.
_SCALAR = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=6), st.none())
_LISTS = st.lists(_SCALAR, max_size=3)
_DICTS = st.dictionaries(st.text(max_size=6), _SCALAR, min_size=1, max_size=2)
_INTS = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True))
JUNK = {
    "number": st.one_of(st.text(max_size=6), _LISTS, _DICTS, st.booleans()),
    "bool": st.one_of(st.text(max_size=6), st.integers(), _LISTS, _DICTS),
    "name": st.one_of(_INTS, _LISTS, _DICTS, st.booleans()),
    "choice": st.one_of(st.text(max_size=8).filter(lambda t: t != "none"), _INTS, _LISTS, _DICTS, st.booleans()),
    "modules": st.one_of(_INTS, _DICTS, st.booleans(), st.lists(st.one_of(_INTS, st.none()), min_size=1, max_size=3)),
    "names": st.one_of(st.text(max_size=6), _INTS, _DICTS, st.booleans(), st.lists(_INTS, min_size=1, max_size=2)),
    "layers": st.one_of(st.text(max_size=4), st.floats().filter(lambda f: f != int(f) if math.isfinite(f) else True),
                        _DICTS, st.lists(st.text(max_size=3), min_size=1, max_size=2)),
    "pattern": st.one_of(st.text(max_size=6), _INTS, _LISTS, st.booleans()),
    "init": st.one_of(st.text(max_size=8).filter(lambda t: t not in ("gaussian", "eva", "orthogonal", "pissa", "olora")
                                                 and not t.startswith("pissa_niter_")), _INTS, _LISTS, _DICTS),
}
KINDS = {
    "lora_alpha": "number", "lora_dropout": "number", "r": "number", "init_r": "number", "target_r": "number",
    "tinit": "number", "tfinal": "number", "deltaT": "number", "beta1": "number", "beta2": "number",
    "orth_reg_weight": "number", "total_step": "number", "use_rslora": "bool", "use_dora": "bool",
    "task_type": "name", "base_model_name_or_path": "name", "bias": "choice", "target_modules": "modules",
    "exclude_modules": "modules", "modules_to_save": "names", "layers_to_transform": "layers",
    "layers_pattern": "modules", "rank_pattern": "pattern", "alpha_pattern": "pattern",
    "init_lora_weights": "init",
}


def config_edits(method: str, config: dict) -> st.SearchStrategy:
    """(field, value) pairs, each making the saved config wrong for its own tensors ("<del>" removes the
    field): values known to be wrong for this file, and generated ones of a type the field never takes."""
    listed = [(k, v) for k, values in {**_common_bad(method), **_rank_bad(method, config)}.items() for v in values]
    listed += [("peft_type", "<del>"), ("r", "<del>")] if method != "adalora" else [("init_r", "<del>")]
    # each codec reads its own fields (others are ignored, as PEFT does; AdaLoRA ignores r)
    own = set(_common_bad(method)) | set(_rank_bad(method, config))
    fields = sorted(k for k in KINDS if k in own)
    junk = st.sampled_from(fields).flatmap(lambda f: st.tuples(st.just(f), JUNK[KINDS[f]]))
    return st.one_of(st.sampled_from(listed), junk)




def _field_names(field: str) -> tuple[str, ...]:
    """What a message about ``field`` may name: the field, its lorakit name, or the tensors it governs."""
    alias = {"lora_alpha": "alpha", "lora_dropout": "dropout", "deltaT": "delta_t", "init_lora_weights": "init"}
    return (field, alias.get(field, field), "adapter_model.safetensors")


@pytest.mark.parametrize("method", list(CONFIGS))
def test_one_broken_config_field(models, saved, tmp_path, method):
    path, config, tensors, _ = saved[method]
    weights = save(tensors)
    @settings(FUZZ, max_examples=90)
    @given(config_edits(method, config))
    def run(edit):
        field, value = edit
        data = dict(config)
        if value == "<del>":
            data.pop(field)
        else:
            data[field] = value
        check_refused(models, write(tmp_path / "a", config=data, weights=weights), *_field_names(field))

    run()
    check_valid_load(models, saved, method)


# ------------------------------------------------------------------------------------------ tensors
EXTRA_KEYS = [
    f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight",
    f"{PREFIX}model.layers.0.self_attn.q_proj.lora_C.weight",
    f"{PREFIX}model.layers.9.self_attn.q_proj.lora_A.weight",
    f"{PREFIX}lm_head.weight",
    f"{PREFIX}model.layers.0.self_attn.q_proj.base_layer.weight",  # a base weight, here of the wrong shape
    "model.layers.0.self_attn.q_proj.lora_A.weight",
    PREFIX,
]
BAD_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _bad_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    out = [(), (*shape, 1), (1, *shape), (max(1, math.prod(shape)),)]
    for i in range(len(shape)):
        out.append(shape[:i] + (shape[i] + 1,) + shape[i + 1 :])
        out.append(shape[:i] + (shape[i] - 1,) + shape[i + 1 :])
    if len(shape) == 2:
        out.append(shape[::-1])
    return [s for s in dict.fromkeys(out) if s != shape]


def tensor_edits(tensors: dict) -> st.SearchStrategy:
    keys = sorted(tensors)
    one = st.sampled_from(keys)
    return st.one_of(
        st.tuples(st.just("drop"), one),
        st.tuples(st.just("shape"), one).flatmap(
            lambda e: st.tuples(st.just(e[0]), st.just(e[1]), st.sampled_from(_bad_shapes(tuple(tensors[e[1]].shape))))
        ),
        st.tuples(st.just("dtype"), one, st.sampled_from(BAD_DTYPES)),
        st.tuples(st.just("nonfinite"), one, st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 10**6)),
        st.tuples(st.just("rename"), one, st.sampled_from([".x", "_", "A", ".weight"])),
        st.tuples(st.just("extra"), st.one_of(st.sampled_from(EXTRA_KEYS), st.text(min_size=1, max_size=12).map(
            lambda s: PREFIX + s))),
    )


def apply_tensor_edit(tensors: dict, edit: tuple) -> tuple[dict, list[str]]:
    """The edited tensors and the names a message about the edit may give (its key or module)."""
    out = dict(tensors)
    kind, key = edit[0], edit[1]
    module = key[len(PREFIX) :].split(".lora_")[0] if key.startswith(PREFIX) else key
    names = [key, module, repr(key)[1:-1]]
    if kind == "drop":
        del out[key]
    elif kind == "shape":
        out[key] = torch.zeros(edit[2])
    elif kind == "dtype":
        out[key] = tensors[key].to(edit[2])
    elif kind == "nonfinite":
        t = tensors[key].clone()
        assume(t.numel() > 0)
        t.view(-1)[edit[3] % t.numel()] = edit[2]
        out[key] = t
    elif kind == "rename":
        out[key + edit[2]] = out.pop(key)
    else:
        assume(key not in out)
        out[key] = torch.zeros(3, 3)
    return out, names


@pytest.mark.parametrize("method", list(CONFIGS))
def test_one_broken_tensor(models, saved, tmp_path, method):
    path, config, tensors, _ = saved[method]

    @settings(FUZZ, max_examples=60)
    @given(tensor_edits(tensors))
    def run(edit):
        broken, names = apply_tensor_edit(tensors, edit)
        check_refused(models, write(tmp_path / "t", config=config, tensors=broken), *names)

    run()
    check_valid_load(models, saved, method)


# ------------------------------------------------------------------------------------- damaged files
def file_damage(config_text: str, weights: bytes) -> st.SearchStrategy:
    header_len = struct.unpack("<Q", weights[:8])[0]
    not_space = st.integers(0, 255).filter(lambda b: b not in b" \t\r\n")
    return st.one_of(
        st.tuples(st.just("json-truncate"), st.integers(0, len(config_text) - 1)),
        st.tuples(st.just("json-replace"), st.sampled_from(
            ["", "[]", "5", '"x"', "null", "true", "NaN", "[" * 100_000, '{"r": 1' + "0" * 5000 + "}",
             "\ufeff" + config_text, "[" + config_text + "]"])),
        st.tuples(st.just("json-bytes"), st.binary(min_size=1, max_size=4).filter(lambda b: b[:1] >= b"\x80")),
        st.tuples(st.just("st-truncate"), st.integers(0, len(weights) - 1)),
        st.tuples(st.just("st-length"), st.integers(0, 2**64 - 1).filter(lambda n: n != header_len)),
        st.tuples(st.just("st-header-byte"), st.integers(8, 8 + header_len - 1), not_space),
        st.tuples(st.just("st-append"), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("st-replace"), st.one_of(st.binary(max_size=64), st.sampled_from(
            [b"", b"{}", config_text.encode(), struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 8) + b'{"a": 1}']))),
    )


@pytest.mark.parametrize("method", list(CONFIGS))
def test_damaged_files(models, saved, tmp_path, method):
    path, config, tensors, _ = saved[method]
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
        config_text = f.read()
    with open(os.path.join(path, "adapter_model.safetensors"), "rb") as f:
        weights = f.read()

    @settings(FUZZ, max_examples=60)
    @given(file_damage(config_text, weights))
    def run(damage):
        kind, arg = damage[0], damage[1]
        text, data = config_text, weights
        if kind == "json-truncate":
            text = config_text[:arg]
            assume(text.strip() != config_text.strip())
        elif kind == "json-replace":
            text = arg
        elif kind == "json-bytes":
            text = arg + config_text.encode()
        elif kind == "st-truncate":
            data = weights[:arg]
        elif kind == "st-length":
            data = struct.pack("<Q", arg) + weights[8:]
        elif kind == "st-header-byte":
            assume(weights[arg] != damage[2])
            data = weights[:arg] + bytes([damage[2]]) + weights[arg + 1 :]
        elif kind == "st-append":
            data = weights + arg
        else:
            data = arg
        name = "adapter_config.json" if kind.startswith("json") else "adapter_model.safetensors"
        check_refused(models, write(tmp_path / "f", config_text=text, weights=data), name)

    run()
    check_valid_load(models, saved, method)


def test_not_an_adapter_directory(models, saved, tmp_path):
    """A file where the directory should be, a directory where a file should be, a file left out."""
    path, config, tensors, _ = saved["lora"]
    (tmp_path / "file").write_text("x")
    check_refused(models, tmp_path / "file")
    d = write(tmp_path / "dirs", config=config)
    os.makedirs(os.path.join(d, "adapter_model.safetensors"))
    check_refused(models, d, "adapter_model.safetensors")
    d = write(tmp_path / "noconfig", tensors=tensors)
    os.makedirs(os.path.join(d, "adapter_config.json"))
    check_refused(models, d, "adapter_config.json")
    check_valid_load(models, saved, "lora")


def test_save_file_and_in_memory_save_agree(saved, tmp_path):
    """The tests above write files with ``safetensors.torch.save``; it is the same format as save_file."""
    _, _, tensors, _ = saved["dora"]
    save_file(tensors, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == save(tensors)
