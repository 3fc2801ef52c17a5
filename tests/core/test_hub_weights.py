"""core/model_ids.py, core/hub_weights.py, core/hub_cache.py, core/float_model.py and `vitq models
pull/import/cache`: hub weights fetched by huggingface_hub itself from a Hub-compatible server on 127.0.0.1
(tests/helpers/fake_hub.py) into a real Hugging Face cache, read back with the network off, and every way
of not having them refused at once, naming the three ways to get them."""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from core import build_model, evaluate, load_dataset, resolve_model_spec, run_quantization
from core.config import QuantConfig
from core.errors import ModelSpecError
from core.float_model import ModelAtChanceError, chance_check
from core.hub_weights import HubAccess, HubPolicy, ModelNotAllowedError, WeightsUnavailableError
from core.model_ids import parse_model_id
from tests.core.conftest import small_vit
from tests.helpers.factories import BUILTIN_WEIGHTS, FMNIST_TIMM
from tests.helpers.fake_hub import FakeHub, fmnist_repo
from vitq.cli import main as cli_main

REPO = "vitq-test/fmnist-vit-tiny"
TAGGED = "vit_tiny_patch16_224.augreg_in21k"
"""A timm name with a pretrained tag; timm keeps its weights in ``timm/vit_tiny_patch16_224.augreg_in21k``,
which the loopback hub serves with the bundled Fashion-MNIST weights (the kwargs below make them fit)."""
TAGGED_SPEC = {"timm_name": TAGGED, "timm_kwargs": FMNIST_TIMM["timm_kwargs"], "preprocess": FMNIST_TIMM["preprocess"]}
EVAL = "fashion-mnist:test:200"
BUILTIN_SHA = hashlib.sha256(BUILTIN_WEIGHTS.read_bytes()).hexdigest()
THREE_WAYS = ("VITQ_MODEL_CACHE", "vitq models pull", "vitq models import", "upload")


@pytest.fixture(scope="module")
def hub():
    with FakeHub({REPO: fmnist_repo(), f"timm/{TAGGED}": fmnist_repo()}) as server:
        yield server


@pytest.fixture(scope="module")
def filled_cache(hub, tmp_path_factory):
    """A Hugging Face cache written by huggingface_hub downloading from the loopback hub."""
    cache = tmp_path_factory.mktemp("hf-cache")
    online = HubPolicy(HubAccess.ONLINE, cache, endpoint=hub.url)
    for model_id in (f"hf-hub:{REPO}", TAGGED):
        spec = resolve_model_spec(TAGGED_SPEC if model_id == TAGGED else model_id, online)
        build_model(spec, online)
    return cache


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("text", "kind", "repo", "revision"), [
    ("hf-hub:org/repo", "hub", "org/repo", None),
    ("org/repo@v1.0", "hub", "org/repo", "v1.0"),
    ("timm/deit_small_patch16_224.fb_in1k", "hub", "timm/deit_small_patch16_224.fb_in1k", None),
    ("deit_small_patch16_224", "timm", "timm/deit_small_patch16_224.fb_in1k", None),
    ("deit_small_patch16_224.fb_in1k@0123abc", "timm", "timm/deit_small_patch16_224.fb_in1k", "0123abc"),
    ("fmnist-vit-tiny", "builtin", None, None),
])
def test_model_ids_as_timm_and_the_hub_write_them(text, kind, repo, revision):
    parsed = parse_model_id(text, frozenset({"fmnist-vit-tiny"}))
    assert parsed.kind == kind
    assert (parsed.hub.repo_id if parsed.hub else None) == repo
    assert (parsed.hub.revision if parsed.hub else None) == revision


def test_online_fetch_fills_a_real_hugging_face_cache_once_with_progress(hub, tmp_path):
    cache = tmp_path / "cache"
    online = HubPolicy(HubAccess.ONLINE, cache, endpoint=hub.url)
    before = hub.gets("model.safetensors")
    events: list[dict] = []
    spec = resolve_model_spec(f"hf-hub:{REPO}", online)
    assert spec.timm_name == "vit_tiny_patch16_224" and spec.timm_kwargs == FMNIST_TIMM["timm_kwargs"]
    assert spec.preprocess.mean == (0.286,) and spec.preprocess.input_size == (1, 28, 28)
    from core.float_model import load_float_model

    fetched_spec, model = load_float_model(spec, online, events.append)
    assert hub.gets("model.safetensors") == before + 1
    weights = [e for e in events if e["stage"] == "fetch_weights" and e["unit"] == "model.safetensors"]
    assert weights[-1]["done"] == weights[-1]["total_steps"] == BUILTIN_WEIGHTS.stat().st_size
    record = fetched_spec.fetched.provenance()
    assert record["weights_sha256"] == BUILTIN_SHA and record["repo_id"] == REPO and len(record["commit"]) == 40
    snapshot = cache / "models--vitq-test--fmnist-vit-tiny" / "snapshots" / record["commit"]
    assert (snapshot / "model.safetensors").is_symlink() and (snapshot / "config.json").is_file()
    # the same weights as the bundled model, loaded by hand
    builtin = build_model(resolve_model_spec("fmnist-vit-tiny"))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), builtin(x))
    # a second fetch reads the cache
    _, again = load_float_model(resolve_model_spec(f"hf-hub:{REPO}", online), online)
    assert hub.gets("model.safetensors") == before + 1


def test_cache_only_reads_the_cache_and_never_the_network(filled_cache):
    cache_only = HubPolicy(HubAccess.CACHE_ONLY, filled_cache, endpoint=f"http://127.0.0.1:{_closed_port()}")
    builtin = resolve_model_spec("fmnist-vit-tiny")
    by_hand = evaluate(build_model(builtin), load_dataset(EVAL, builtin.preprocess))
    assert by_hand["top1"] > 0.7
    for value in (f"hf-hub:{REPO}", REPO, TAGGED_SPEC):
        spec = resolve_model_spec(value, cache_only)
        assert evaluate(build_model(spec, cache_only), load_dataset(EVAL, spec.preprocess)) == by_hand


@pytest.mark.parametrize("access", [HubAccess.OFF, HubAccess.CACHE_ONLY, HubAccess.ONLINE])
def test_weights_that_cannot_be_had_fail_at_once_naming_the_three_ways(access, tmp_path):
    policy = HubPolicy(access, tmp_path / "empty", endpoint=f"http://127.0.0.1:{_closed_port()}", timeout_s=5)
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as caught:
        build_model(resolve_model_spec("deit_tiny_patch16_224.fb_in1k", policy), policy)
    elapsed = time.perf_counter() - started
    assert all(way in caught.value.message for way in THREE_WAYS), caught.value.message
    assert caught.value.code == "weights_unavailable"
    assert elapsed < 5, elapsed  # no retry loop (timm's pretrained=True waited 46-52 s offline)


def test_an_organisation_off_the_allow_list_is_refused_before_any_request(hub, tmp_path):
    policy = HubPolicy(HubAccess.ONLINE, tmp_path, allowed_orgs=("timm",), endpoint=hub.url)
    before = sum(hub.requests.values())
    with pytest.raises(ModelNotAllowedError, match="not on this service's allow-list"):
        resolve_model_spec(f"hf-hub:{REPO}", policy)
    assert sum(hub.requests.values()) == before


def test_an_architecture_without_weights_is_refused_unless_random_is_asked():
    with pytest.raises(ModelSpecError, match="has no weights.*\"weights\": \"random\""):
        build_model(resolve_model_spec("vit_base_patch16_gap_224"))
    tiny = {"timm_name": "vit_base_patch16_gap_224", "weights": "random",
            "timm_kwargs": {"depth": 1, "embed_dim": 64, "num_heads": 2, "img_size": 32, "num_classes": 3}}
    assert build_model(resolve_model_spec(tiny)).training is False


def test_vitq_evaluate_of_a_timm_name_without_cached_weights_exits_2_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITQ_MODEL_CACHE", str(tmp_path))
    monkeypatch.delenv("VITQ_HUB_ACCESS", raising=False)
    started = time.perf_counter()
    assert cli_main(["evaluate", "deit_small_patch16_224", "--data", EVAL]) == 2
    assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert "timm/deit_small_patch16_224.fb_in1k" in err and "vitq models pull deit_small_patch16_224" in err


def test_models_pull_and_import_carry_weights_to_an_air_gapped_cache(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    carried = tmp_path / "carried"
    assert cli_main(["models", "pull", f"hf-hub:{REPO}", "--cache", str(carried), "--quiet"]) == 0
    assert BUILTIN_SHA in capsys.readouterr().out
    site = tmp_path / "site"
    assert cli_main(["models", "import", str(carried), "--cache", str(site)]) == 0
    assert REPO in capsys.readouterr().out
    cache_only = HubPolicy(HubAccess.CACHE_ONLY, site)
    assert build_model(resolve_model_spec(f"hf-hub:{REPO}", cache_only), cache_only) is not None
    # a timm checkpoint file imported under the repository timm names for a tag
    file_dir = tmp_path / "file"
    file_dir.mkdir()
    (file_dir / "model.safetensors").write_bytes(BUILTIN_WEIGHTS.read_bytes())
    assert cli_main(["models", "import", str(file_dir / "model.safetensors"), "--as", f"timm/{TAGGED}",
                     "--cache", str(site)]) == 0
    spec = resolve_model_spec(TAGGED_SPEC, cache_only)
    assert build_model(spec, cache_only) is not None
    assert cli_main(["models", "cache", "--cache", str(site)]) == 0
    listed = capsys.readouterr().out
    assert REPO in listed and f"timm/{TAGGED}" in listed


def test_a_float_model_at_chance_fails_before_quantization_unless_allowed(tmp_path):
    torch.manual_seed(0)
    model = small_vit()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    spec = {"timm_name": "vit_tiny_patch16_224", "checkpoint": str(tmp_path / "w.safetensors"),
            "timm_kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 2},
            "preprocess": FMNIST_TIMM["preprocess"]}
    assert load_file(str(tmp_path / "w.safetensors"))  # weights given: this is not a random-weights spec
    config = QuantConfig(w_bits=4, a_bits=4, method="ptq-uniform", preset="smoke", calib_size=16)
    started = time.perf_counter()
    with pytest.raises(ModelAtChanceError, match="no better than chance") as caught:
        run_quantization(spec, config, "fashion-mnist:train:16", EVAL, tmp_path / "out", exports=())
    assert caught.value.code == "fp_accuracy_at_chance"
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()
    refused_s = time.perf_counter() - started
    report = run_quantization(spec, config, "fashion-mnist:train:16", EVAL, tmp_path / "out", exports=(),
                              allow_chance_fp=True)
    assert report["fp_chance"]["at_chance"] and report["fp_chance"]["allowed"]
    assert report["weights"]["source"] == "checkpoint"
    assert refused_s < 30


def test_chance_level_is_the_majority_class_rate_plus_three_standard_errors():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    check = chance_check(0.5, labels)
    assert check["chance_top1"] == 0.5 and check["at_chance"]
    assert not chance_check(0.7, labels)["at_chance"]
    assert not chance_check(0.0, torch.zeros(10, dtype=torch.int64))["at_chance"]  # one class: cannot tell
