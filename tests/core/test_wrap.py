import copy

import pytest
import timm
import torch

from core.config import QuantConfig
from core.errors import ModelSpecError
from core.quant_attention import QuantAttention, QuantWindowAttention
from core.quant_linear import QuantConv2d, QuantLinear
from core.wrap import find_ln_pairs, find_units, wrap_model
from tests.core.conftest import padded_swin, small_swin, small_vit

CASES = [
    ("vit", small_vit, (1, 28, 28)),
    ("swin", small_swin, (3, 56, 56)),
    ("swin-padded", padded_swin, (3, 56, 56)),
]


@pytest.mark.parametrize("method", ["isvit", "repq", "ptq-uniform"])
@pytest.mark.parametrize(("name", "factory", "shape"), CASES)
def test_wrapped_model_with_quantizers_off_matches_the_original_in_float64(name, factory, shape, method):
    model = factory().double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    expected = model(x)
    wrapped = wrap_model(copy.deepcopy(model), QuantConfig(w_bits=4, a_bits=4, method=method))
    assert torch.allclose(wrapped(x), expected, rtol=0, atol=1e-12)


def test_vit_wrapping_replaces_fused_attention_with_explicit_quantizable_matmuls():
    model = wrap_model(small_vit(), QuantConfig(w_bits=4, a_bits=4))
    attn = model.blocks[0].attn
    assert isinstance(attn, QuantAttention)
    assert isinstance(attn.qkv, QuantLinear) and isinstance(attn.proj, QuantLinear)
    assert isinstance(model.head, QuantLinear) and isinstance(model.patch_embed.proj, QuantConv2d)
    assert model.patch_embed.proj.input_quantizer is None  # the image itself is not quantized
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    # post-LN inputs (qkv, fc1) are channel-wise for isvit; proj/fc2/head layer-wise
    assert attn.qkv.input_quantizer.channel_dim == -1 and model.blocks[0].mlp.fc1.input_quantizer.channel_dim == -1
    assert attn.proj.input_quantizer.channel_dim is None and model.head.input_quantizer.channel_dim is None
    assert find_units(model) == ["patch_embed", "blocks.0", "blocks.1", "head"]
    assert len(find_ln_pairs(model)) == 4


def test_swin_keeps_relative_position_bias_and_shift_masks():
    original = small_swin()
    model = wrap_model(copy.deepcopy(original), QuantConfig(w_bits=4, a_bits=4))
    attns = [m for m in model.modules() if isinstance(m, QuantWindowAttention)]
    assert attns and all(a.relative_position_bias_table.requires_grad is not None for a in attns)
    shifted = [b for b in model.modules() if type(b).__name__ == "SwinTransformerBlock" and any(b.shift_size)]
    assert shifted and all(b.attn_mask is not None for b in shifted)
    # with large relative-position biases the wrapped model still matches the original exactly
    big = copy.deepcopy(original).double()
    with torch.no_grad():
        for module in big.modules():
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_(0, 3)
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    assert not torch.allclose(big(x), original.double()(x), atol=1e-6)
    wrapped_big = wrap_model(copy.deepcopy(big), QuantConfig(w_bits=4, a_bits=4))
    assert torch.allclose(wrapped_big(x), big(x), rtol=0, atol=1e-12)
    units = find_units(model)
    assert units[0] == "patch_embed" and units[-1] == "head.fc" and "layers.1.downsample" in units


def test_ptq_uniform_keeps_every_activation_layer_wise():
    model = wrap_model(small_vit(), QuantConfig(w_bits=4, a_bits=4, method="ptq-uniform"))
    assert find_ln_pairs(model) == []


def test_unsupported_architectures_are_refused_with_a_clear_error():
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3,
                              block_fn=timm.models.vision_transformer.ParallelScalingBlock)
    with pytest.raises(ModelSpecError, match="ParallelScalingBlock"):
        wrap_model(model, QuantConfig(w_bits=4, a_bits=4))
