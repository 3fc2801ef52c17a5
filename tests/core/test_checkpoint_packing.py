"""Packed weight codes in checkpoint.safetensors: b bits per weight below 8 bits, bit-exact round trip,
and version-1 (unpacked) checkpoints still load."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core import QuantConfig, load, quantize, read_checkpoint_metadata, save
from core.bitpack import pack_codes, packed_size, unpack_codes
from core.checkpoint import weight_codes
from core.wrap import weight_layers
from tests.core.conftest import small_vit

SPEC = {"timm_name": "vit_tiny_patch16_224",
        "timm_kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 2},
        "preprocess": {"mean": [0.286], "std": [0.353]}}


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trips_every_width_and_odd_lengths(bits):
    gen = torch.Generator().manual_seed(bits)
    for shape in ((7,), (3, 5), (192, 48), (1,), (0,)):
        codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_size(codes.numel(), bits)
        assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_four_bit_codes_are_nibbles_low_first():
    packed = pack_codes(torch.tensor([0x1, 0xA, 0xF, 0x3, 0x7], dtype=torch.uint8), 4)
    assert packed.tolist() == [0xA1, 0x3F, 0x07]


def test_codes_that_do_not_fit_or_bytes_that_do_not_match_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (8,))


@pytest.fixture(scope="module", params=[3, 8])
def saved(request, tmp_path_factory):
    bits = request.param
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    qmodel = quantize(small_vit(), QuantConfig(w_bits=bits, a_bits=bits, method="repq", preset="smoke",
                                               calib_size=16), images)
    path = save(qmodel, tmp_path_factory.mktemp("ckpt") / "checkpoint.safetensors", metadata={"model": SPEC})
    return bits, qmodel, path


def test_load_reproduces_the_fake_quant_weights_and_outputs_bit_for_bit(saved):
    bits, qmodel, path = saved
    loaded = load(path)
    with torch.no_grad():
        for name, layer in weight_layers(qmodel.model):
            expected = layer.weight_quantizer(layer.weight)
            assert torch.equal(loaded.get_submodule(name).weight, expected), name
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        assert torch.equal(loaded(x), qmodel.model(x))


def test_codes_below_8_bits_take_b_bits_per_weight(saved):
    bits, qmodel, path = saved
    header = read_checkpoint_metadata(path)
    assert header["format_version"] == 2 and header["code_packing"] == "bitpack-lsb"
    with safe_open(str(path), framework="pt") as f:
        for name, layer in weight_layers(qmodel.model):
            stored = f.get_tensor(name + ".weight_codes")
            assert stored.dtype == torch.uint8
            if bits < 8:
                assert stored.dim() == 1 and stored.numel() == packed_size(layer.weight.numel(), bits)
            else:
                assert stored.shape == layer.weight.shape
            codes = weight_codes(stored, bits, layer.weight.shape, 2)
            assert torch.equal(codes, layer.weight_quantizer.codes(layer.weight.detach()).to(torch.uint8))


def test_a_version_1_checkpoint_with_unpacked_codes_still_loads(saved, tmp_path):
    bits, qmodel, path = saved
    if bits == 8:
        pytest.skip("8-bit codes are stored the same way in both versions")
    tensors = load_file(str(path))
    for name, layer in weight_layers(qmodel.model):
        tensors[name + ".weight_codes"] = layer.weight_quantizer.codes(layer.weight.detach()).to(torch.uint8)
    header = read_checkpoint_metadata(path)
    header["format_version"] = 1
    header.pop("code_packing")
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata={"vitq": json.dumps(header)})
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load(old)(x), load(path)(x))
    assert old.stat().st_size > path.stat().st_size
