"""CorDA (init="corda"): covariances, factors and residual equal to PEFT 0.21's ``preprocess_corda`` + init on the
same weights and rows, the factors against the equation, the saved file right on a fresh base, and the errors."""

import json
import warnings

import pytest
import torch

import lorakit as lk
from helpers import assert_residual_init_equals_peft, logits_of, perturb, plain_consumer
from lorakit.adapters.corda import calibration, collect_covariances, corda_factors
from lorakit.io import load_adapter, save_adapter
from lorakit.surgery.targets import find_targets

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
warnings.filterwarnings("ignore", message=".*changes the base weights.*")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TARGETS = ["q_proj", "v_proj", "down_proj"]
# 24 calibration rows of 16 tokens: 384 samples for inputs of 64 and 172 features (a full-rank covariance)
ROWS = torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(0))
X = torch.tensor([[1, 5, 9, 200, 33, 7, 3], [4, 4, 100, 2, 255, 0, 17]])


def model_of():
    return lk.build_model("tiny-llama", task="causal-lm", seed=0).float()


def one_by_one(model):
    return lambda: [model(ROWS[i : i + 1]) for i in range(len(ROWS))]


def corda_model(mode="ipm", r=4):
    model = model_of()
    cfg = lk.AdapterConfig(init="corda", r=r, alpha=8, target_modules=TARGETS, method_options={"corda_method": mode})
    covs = collect_covariances(model, find_targets(model, cfg), one_by_one(model))
    with calibration(covs):
        lk.inject(model, cfg)
    return model, covs


def peft_corda(mode="ipm", r=4):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = model_of()
    config = peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=mode))
    preprocess_corda(model, config, run_model=one_by_one(model))
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_factors_and_residual_equal_peft_on_the_same_weights_and_rows(mode):
    mine, _ = corda_model(mode)
    theirs = peft_corda(mode)
    assert_residual_init_equals_peft(mine, theirs, model_of())
    with torch.no_grad():
        torch.testing.assert_close(logits_of(mine(X)), logits_of(model_of()(X)), rtol=1e-5, atol=1e-5)


def test_factors_are_the_svd_of_w_times_the_covariance():
    """The equation: s B A = U_r S_r V_r^T C'^-1 with W C' = U S V^T; ipm takes the top r, kpm the bottom r, and
    both parts together give back W."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(12, 10, generator=g, dtype=torch.float64), torch.randn(200, 10, generator=g, dtype=torch.float64)
    cov = x.t() @ x / 200
    fixed = cov + torch.eye(10, dtype=torch.float64) * torch.diagonal(cov).mean() * 0.01
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    inv = torch.linalg.inv(fixed)
    top = u[:, :3] @ torch.diag(s[:3]) @ vh[:3] @ inv
    rest = u[:, 3:] @ torch.diag(s[3:]) @ vh[3:] @ inv
    a, b = corda_factors(w.float(), cov.float(), 3, 2.0, "ipm")
    torch.testing.assert_close((2.0 * b @ a).double(), top, rtol=1e-4, atol=1e-4)
    a, b = corda_factors(w.float(), cov.float(), 7, 2.0, "kpm")
    torch.testing.assert_close((2.0 * b @ a).double(), rest, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(top + rest, w, rtol=1e-9, atol=1e-9)


def test_covariance_is_the_mean_of_each_rows_normalised_x_t_x():
    layer = torch.nn.Sequential(torch.nn.Linear(3, 2))
    xs = [torch.tensor([[1.0, -4.0, 2.0], [0.5, 1.0, 3.0]]), torch.tensor([[-2.0, 1.0, 1.0]])]
    covs = collect_covariances(layer, ["0"], lambda: [layer(x) for x in xs])
    want = sum((x / x.max().abs()).t() @ (x / x.max().abs()) for x in xs) / 2
    torch.testing.assert_close(covs["0"], want)


def test_saved_file_is_right_on_a_fresh_base_for_lorakit_peft_and_a_plain_consumer(tmp_path):
    model, _ = corda_model()
    perturb(model)
    with torch.no_grad():
        ref = logits_of(model(X))
        assert (ref - logits_of(model_of()(X))).abs().max() > 1e-3
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # converted: rank 2r on the unchanged base
    with torch.no_grad():
        torch.testing.assert_close(logits_of(plain_consumer(model_of(), tmp_path)(X)), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits_of(load_adapter(model_of(), tmp_path)(X)), ref, rtol=1e-5, atol=1e-5)
        theirs = peft.PeftModel.from_pretrained(model_of(), tmp_path).eval()
        torch.testing.assert_close(logits_of(theirs(X)), ref, rtol=1e-5, atol=1e-5)


def test_peft_file_saved_unconverted_is_refused_in_one_line(tmp_path):
    theirs = peft_corda()
    theirs.save_pretrained(tmp_path)
    with pytest.raises(lk.ConfigError) as e:
        load_adapter(model_of(), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "corda" in msg and "path_initial_model_for_weight_conversion" in msg


def test_errors_name_what_is_missing():
    cfg = lk.AdapterConfig(init="corda", r=4, target_modules=["q_proj"])
    with pytest.raises(lk.ConfigError, match="needs the input covariance of 'model.layers.0.self_attn.q_proj'"):
        lk.inject(model_of(), cfg)
    with pytest.raises(lk.ConfigError, match="corda_method is an option of init=.corda. but init=.default."):
        lk.AdapterConfig(r=4, method_options={"corda_method": "kpm"})
    with pytest.raises(lk.ConfigError, match="corda_rows"):
        lk.AdapterConfig(r=4, init="corda", method_options={"corda_rows": 0})
    model = model_of()
    with pytest.raises(lk.ConfigError, match="never called 'model.layers.1.self_attn.q_proj'"):
        collect_covariances(model, ["model.layers.1.self_attn.q_proj"], lambda: None)


def test_the_trainer_calibrates_on_its_first_rows_one_at_a_time_and_saves_a_converted_file(tmp_path, monkeypatch):
    import dataclasses

    from lorakit.adapters import corda
    from lorakit.train.trainer import train
    from train.test_trainer import run_config

    cfg = run_config(tmp_path, max_steps=2)
    cfg = dataclasses.replace(cfg, adapter=cfg.adapter.replace(init="corda", method_options={"corda_rows": 5}))
    seen = []
    real = corda.collect_covariances

    def spy(model, names, run):
        def counted():
            hook = model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["input_ids"].shape),
                                                   with_kwargs=True)
            try:
                run()
            finally:
                hook.remove()
        return real(model, names, counted)

    monkeypatch.setattr("lorakit.train.build.collect_covariances", spy)
    res = train(cfg)
    assert len(seen) == 5 and all(s[0] == 1 for s in seen)  # five rows, each alone
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8 and "corda_rows" not in json.dumps(config)
    assert res.summary["steps"] == 2


def test_a_quantized_base_is_refused_in_one_line(tmp_path):
    from lorakit.train.config import RunConfig
    from train.test_trainer import run_config

    d = run_config(tmp_path).to_dict()
    d["adapter"]["init"] = "corda"
    d["quant"] = {"dtype": "nf4"}
    with pytest.raises(lk.ConfigError, match="adapter.init='corda' decomposes the dense base weights"):
        RunConfig.from_dict(d)
