"""Per-unit mixed precision (``QuantConfig.per_unit_bits``) in every part: config, wrapping, quantize,
the unit cache, the checkpoint and ``core.load``, the ONNX export, sizes and sensitivity."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from onnx import TensorProto

from core import InvalidConfigError, QuantConfig, load, quantize, read_checkpoint_metadata, save
from core.export import export_checkpoint, read_onnx_metadata
from core.quantizers import SelectQuantizer
from core.sensitivity import model_bytes, unit_sensitivity
from core.unit_cache import UnitCache
from core.wrap import find_units, quantizers, weight_layers, wrap_model
from tests.core.conftest import small_vit

SPEC = {"timm_name": "vit_tiny_patch16_224",
        "timm_kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 2},
        "preprocess": {"mean": [0.286], "std": [0.353]}}
MIXED = {"blocks.1": {"w_bits": 8, "a_bits": 8}, "head": {"w_bits": 6, "a_bits": 4}}


def _images(n=32):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _config(**extra):
    return QuantConfig(w_bits=3, a_bits=3, method="isvit", preset="smoke", calib_size=32, **extra)


def test_per_unit_bits_validate_and_round_trip():
    config = _config(per_unit_bits={"head": [6, 4], "blocks.1": {"w_bits": 8, "a_bits": 8}})
    assert config.per_unit_bits == {"blocks.1": (8, 8), "head": (6, 4)}
    assert config.to_dict()["per_unit_bits"] == MIXED
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert config.unit_bits("head") == (6, 4) and config.unit_bits("blocks.0") == (3, 3)
    assert config.bits_label() == "W3A3 + 1 unit W6A4 + 1 unit W8A8" and config.mixed
    assert config.min_bits() == 3 and not _config().mixed and _config().bits_label() == "W3A3"
    for bad in ({"head": [9, 4]}, {"head": [4]}, {"head": {"w_bits": 4}}, {"": [4, 4]}, ["head"],
                {"head": [True, 4]}):
        with pytest.raises(InvalidConfigError):
            _config(per_unit_bits=bad)


def test_each_quantizer_gets_its_units_bits_and_unknown_units_are_refused():
    model = wrap_model(small_vit(), _config(per_unit_bits=MIXED))
    assert find_units(model) == ["patch_embed", "blocks.0", "blocks.1", "head"]
    expected = {"patch_embed": (3, 3), "blocks.0": (3, 3), "blocks.1": (8, 8), "head": (6, 4)}
    for name, layer in weight_layers(model):
        unit = next(u for u in expected if name == u or name.startswith(u + "."))
        assert layer.weight_quantizer.bits == expected[unit][0], name
    for name, quantizer in quantizers(model):
        unit = next(u for u in expected if name.startswith(u + "."))
        assert quantizer.bits == expected[unit][1], name
        if isinstance(quantizer, SelectQuantizer):
            assert {c.bits for c in quantizer.candidates} == {expected[unit][1]}
    with pytest.raises(InvalidConfigError, match="blocks.7"):
        wrap_model(small_vit(), _config(per_unit_bits={"blocks.7": [4, 4]}))


def test_a_mixed_model_saves_loads_and_exports_bit_for_bit(tmp_path):
    qmodel = quantize(small_vit(), _config(per_unit_bits=MIXED), _images())
    path = save(qmodel, tmp_path / "checkpoint.safetensors", metadata={"model": SPEC})
    header = read_checkpoint_metadata(path)
    assert header["config"]["per_unit_bits"] == MIXED
    loaded = load(path)
    x = _images(8)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel.model(x))
        for name, layer in weight_layers(qmodel.model):
            assert loaded.get_submodule(name).weight_quantizer.bits == layer.weight_quantizer.bits
    onnx_path = export_checkpoint(path, tmp_path / "model.onnx")
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    code_types = {node.input[0]: inits[node.input[0]] for node in graph.node
                  if node.op_type == "DequantizeLinear" and node.input[0] in inits}
    four_bit = [n for n, dtype in code_types.items() if dtype == TensorProto.UINT4]
    eight_bit = [n for n, dtype in code_types.items() if dtype == TensorProto.INT8]
    # blocks.0 and the patch embedding (3 bits) go to uint4; blocks.1 (8) and the head (6) are int8 (codes - 128)
    assert any("blocks.0" in n for n in four_bit) and not any("blocks.1" in n or "head" in n for n in four_bit)
    assert any("blocks.1" in n for n in eight_bit) and any("head" in n for n in eight_bit)
    assert read_onnx_metadata(onnx_path)["per_unit_bits"] == MIXED


def test_the_unit_cache_restores_units_and_gives_the_same_model():
    model, images = small_vit(), _images()
    cache = UnitCache()
    quantize(model, _config(), images, unit_cache=cache)  # uniform W3A3: every unit computed, nothing reused
    assert cache.hits == 0 and cache.misses == 2 * 4
    mixed = _config(per_unit_bits={"blocks.1": [8, 8]})
    cached = quantize(model, mixed, images, unit_cache=cache)
    # stage 1: patch_embed, blocks.0 and head keep their bits; stage 3: patch_embed and blocks.0 (their prefix)
    assert cache.hits == 5
    assert sum(bool(r.get("cached")) for r in cached.reconstruction) == 5
    fresh = quantize(model, mixed, images)
    x = _images(8)
    with torch.no_grad():
        assert torch.equal(cached.model(x), fresh.model(x))


def test_model_bytes_follow_the_weight_widths_and_the_checkpoint(tmp_path):
    model = small_vit()
    sizes = {bits: model_bytes(model, QuantConfig(w_bits=bits, a_bits=8)) for bits in (2, 3, 4, 8)}
    assert sizes[2] < sizes[3] < sizes[4] < sizes[8]
    mixed = model_bytes(model, QuantConfig(w_bits=3, a_bits=8, per_unit_bits={"blocks.1": [8, 8]}))
    assert sizes[3] < mixed < sizes[8]
    qmodel = quantize(model, QuantConfig(w_bits=3, a_bits=3, method="repq", preset="smoke", calib_size=32,
                                         per_unit_bits={"blocks.1": [8, 8]}), _images())
    path = save(qmodel, tmp_path / "c.safetensors", metadata={"model": SPEC})
    overhead = path.stat().st_size - mixed  # the header and the activation quantizers' parameters
    assert 0 < overhead < 20_000, overhead


def test_sensitivity_ranks_units_and_grows_at_fewer_bits():
    model, images = small_vit(), _images(64)
    low = unit_sensitivity(model, QuantConfig(w_bits=2, a_bits=3, preset="smoke"), images, torch.device("cpu"))
    high = unit_sensitivity(model, QuantConfig(w_bits=8, a_bits=8, preset="smoke"), images, torch.device("cpu"))
    assert [s["unit"] for s in low] == ["patch_embed", "blocks.0", "blocks.1", "head"]
    for a, b in zip(low, high, strict=True):
        assert a["logit_error"] is not None and math.isfinite(a["logit_error"]), a
        assert a["logit_error"] > b["logit_error"] >= 0, (a, b)
    assert low[1]["params"] > low[0]["params"] > 0
