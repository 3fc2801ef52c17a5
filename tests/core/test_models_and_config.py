import json
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

import core
from core import QuantConfig, build_model, list_builtin_models, resolve_model_spec
from core.errors import InvalidConfigError, ModelSpecError
from core.models import count_parameters
from tests.core.conftest import small_vit


def test_builtin_reference_model_is_bundled_with_its_preprocessing():
    spec = resolve_model_spec("fmnist-vit-tiny")
    assert spec.timm_kwargs == {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10}
    assert spec.preprocess.mean == (0.286,) and spec.preprocess.input_size == (1, 28, 28)
    model = build_model(spec)
    assert sum(p.numel() for p in model.parameters()) == 5353738
    assert [m["id"] for m in list_builtin_models()] == ["fmnist-vit-tiny"]


@pytest.mark.parametrize(("value", "message"), [
    ("resnet50", "unknown model 'resnet50'"),
    ("deit_smal_patch16_224", "did you mean deit_small_patch16_224"),
    ("deit_small_patch16_224.in1k", "its tags: fb_in1k"),
    ("hf-hub:no slash", "org/repo"),
    ({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"checkpoint_path": "/etc/passwd"}}, "may not set"),
    ({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"no_such_kwarg": 1}}, "could not build"),
    ({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"embed_dim": 30720, "depth": 64}}, "limit"),
    ({"timm_name": "vit_tiny_patch16_224", "bogus": 1}, "unknown model spec field"),
    ({"timm_name": "vit_tiny_patch16_224", "preprocess": {"std": [0.0, 1.0, 1.0]}}, "std must be positive"),
    (42, "model id"),
    ({"timm_name": "vit_tiny_patch16_224", "weights": "trained"}, "weights must be pretrained or random"),
])
def test_bad_model_specs_get_a_clear_error(value, message):
    with pytest.raises(ModelSpecError, match=message):
        build_model(resolve_model_spec(value))


def _spec(tmp_path, weights_name):
    spec = {"timm_name": "vit_tiny_patch16_224", "checkpoint": weights_name,
            "timm_kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 2}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return resolve_model_spec(str(path))


def test_spec_json_with_safetensors_and_pth_weights_loads(tmp_path):
    model = small_vit()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    x = torch.randn(2, 1, 28, 28)
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.safetensors").read_bytes())  # named by content, not suffix
    for name in ("w.safetensors", "w.pth", "w.bin"):
        loaded = build_model(_spec(tmp_path, name))
        assert torch.equal(loaded(x), model(x))


def test_weights_that_do_not_fit_name_the_mismatch(tmp_path):
    state = {k: v.contiguous() for k, v in small_vit(embed_dim=96).state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelSpecError, match="shape mismatch: .*checkpoint"):
        build_model(_spec(tmp_path, "w.safetensors"))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pth_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "w.pth", "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(ModelSpecError, match="weights_only"):
        build_model(_spec(tmp_path, "w.pth"))
    assert "pwned" not in capsys.readouterr().out


def test_timm_kwargs_pretrained_is_refused_for_the_model_id(monkeypatch):
    with pytest.raises(ModelSpecError, match="timm name or hub id means its pretrained weights"):
        resolve_model_spec({"timm_name": "deit_tiny_patch16_224", "timm_kwargs": {"pretrained": True}})


@pytest.mark.parametrize("fields", [
    {"w_bits": 1, "a_bits": 4}, {"w_bits": 9, "a_bits": 4}, {"w_bits": "x", "a_bits": 4}, {"w_bits": 4.0, "a_bits": 4},
    {"w_bits": 4, "a_bits": 4, "method": "gptq"}, {"w_bits": 4, "a_bits": 4, "iters": -1},
    {"w_bits": 4, "a_bits": 4, "method": "repq", "sos": False}, {"w_bits": True, "a_bits": 4},
])
def test_invalid_configs_fail_before_any_work(fields):
    with pytest.raises(InvalidConfigError):
        QuantConfig(**fields)


def test_config_round_trips_through_an_allow_listed_dict():
    config = QuantConfig(w_bits=3, a_bits=4, method="isvit", softmax_quantizer="log2", sos=False)
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InvalidConfigError, match="unknown config field"):
        QuantConfig.from_dict({**config.to_dict(), "__class__": "x"})
    paper = QuantConfig(w_bits=6, a_bits=6, preset="paper").resolved()
    assert (paper.iters, paper.calib_size, paper.batch_size, paper.lr) == (200, 1024, 64, 4e-5)
    assert QuantConfig(w_bits=4, a_bits=4, preset="paper").resolved().iters == 1000


def test_importing_core_pulls_in_no_web_or_queue_code():
    import subprocess
    import sys

    code = (
        "import sys, core; "
        "print([m for m in ('fastapi', 'celery', 'sqlalchemy', 'api', 'worker') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert "quantize" in core.__all__


@pytest.mark.parametrize(
    "timm_name, kwargs",
    [
        ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg", "img_size": [28, 28], "patch_size": 4,
                                  "act_layer": "gelu", "init_values": 1e-5, "mlp_ratio": 2, "fc_norm": None}),
        ("swin_tiny_patch4_window7_224", {"depths": [1, 1, 1, 1], "window_size": 7, "mlp_ratio": 2, "qkv_bias": False}),
    ],
)
def test_timm_kwargs_of_the_annotated_json_types_build(timm_name, kwargs):
    assert count_parameters(resolve_model_spec({"timm_name": timm_name, "timm_kwargs": kwargs})) > 0


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"class_token": "no"}, "class_token must be true or false for VisionTransformer, not 'no'"),
        ({"qkv_bias": 0}, "qkv_bias must be true or false"),
        ({"depth": 2, "embed_dim": 19.5}, "embed_dim must be an integer"),
        ({"mlp_ratio": True}, "mlp_ratio must be a number"),
        ({"init_values": "small"}, "init_values must be a number or null"),
        ({"img_size": ["28", "28"], "patch_size": 4}, "img_size must be an integer or a list of integers"),
    ],
)
def test_timm_kwargs_of_the_wrong_json_type_name_the_kwarg(kwargs, fragment):
    with pytest.raises(ModelSpecError, match=re.escape(fragment)):
        count_parameters(resolve_model_spec({"timm_name": "vit_tiny_patch16_224", "timm_kwargs": kwargs}))
