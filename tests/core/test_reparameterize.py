import pytest
import torch

from core.calibrate import calibrate_activations
from core.config import QuantConfig
from core.quantizers import UniformQuantizer
from core.reparameterize import reparameterize
from core.wrap import find_ln_pairs, set_quant_state, wrap_model
from tests.core.conftest import padded_swin, small_swin, small_vit


def _calibrated(model, x):
    wrapped = wrap_model(model, QuantConfig(w_bits=4, a_bits=4, method="isvit"))
    calibrate_activations(wrapped, x)
    return wrapped


def test_stage2_is_lossless_with_quantizers_off_float64_vit_and_swin():
    for factory, shape in ((small_vit, (1, 28, 28)), (small_swin, (3, 56, 56)), (padded_swin, (3, 56, 56))):
        torch.manual_seed(0)
        x = torch.randn(8, *shape)
        model = _calibrated(factory(), x).double()
        set_quant_state(model, weights=False, activations=False)
        xd = x.double()
        before = model(xd)
        assert reparameterize(model) > 0
        after = model(xd)
        rel = (after - before).norm() / before.norm()
        assert rel <= 1e-6, rel


def test_stage2_turns_post_ln_quantizers_layer_wise_with_mean_scale():
    x = torch.randn(8, 1, 28, 28)
    model = _calibrated(small_vit(), x)
    qkv_quant = model.blocks[0].attn.qkv.input_quantizer
    scales = qkv_quant.scale.clone()
    zeros = qkv_quant.zero_point.clone()
    assert scales.numel() == 192
    reparameterize(model)
    assert isinstance(qkv_quant, UniformQuantizer) and qkv_quant.scale.numel() == 1
    assert torch.isclose(qkv_quant.scale, scales.mean())
    assert qkv_quant.zero_point == zeros.mean().round()  # an integer z̃: lossless with quantizers on
    assert find_ln_pairs(model) == []


def _stage2_codes(factory, shape, bits):
    """For every post-LN quantizer: its codes on the same LayerNorm inputs before and after stage 2,
    and the pre-rounding values x/s_c (to tell a float near-tie from a real change)."""
    torch.manual_seed(0)
    x = torch.randn(16, *shape)
    model = wrap_model(factory(), QuantConfig(w_bits=bits, a_bits=bits, method="isvit"))
    calibrate_activations(model, x[:8])
    set_quant_state(model, weights=False, activations=True)
    pairs = find_ln_pairs(model)
    ln_inputs = {}
    handles = [ln.register_forward_pre_hook(lambda m, a: ln_inputs.__setitem__(id(m), a[0].detach()))
               for ln, _ in pairs]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    before = []
    with torch.no_grad():
        for ln, linear in pairs:
            y = ln(ln_inputs[id(ln)])
            q = linear.input_quantizer
            before.append((q.codes(y), y / q.scale))
        reparameterize(model)
        return [(codes, ratio, linear.input_quantizer.codes(ln(ln_inputs[id(ln)])))
                for (codes, ratio), (ln, linear) in zip(before, pairs, strict=True)]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("factory,shape", [(small_vit, (1, 28, 28)), (small_swin, (3, 56, 56))], ids=["vit", "swin"])
def test_stage2_keeps_every_activation_code_up_to_float_ties(factory, shape, bits):
    """With an integer z̃ the layer-wise codes are the channel-wise ones; in float32 a value within
    ~1e-5 of a rounding boundary may still land on the other side (a tie, not a change of method)."""
    for before, ratio, after in _stage2_codes(factory, shape, bits):
        differs = before != after
        assert differs.float().mean().item() <= 1e-4
        assert (before - after).abs().max().item() <= 1
        frac = ratio[differs] - ratio[differs].floor()
        assert ((frac - 0.5).abs() < 1e-4).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_stage2_leaves_the_logits_unchanged_with_activation_quantizers_on(bits):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    model = wrap_model(small_vit(), QuantConfig(w_bits=bits, a_bits=bits, method="isvit"))
    calibrate_activations(model, x[:8])
    set_quant_state(model, weights=False, activations=True)  # as in SOS: weights stay float until stage 3
    with torch.no_grad():
        before = model(x)
        assert reparameterize(model) > 0
        after = model(x)
    assert ((after - before).norm() / before.norm()).item() <= 1e-5


def test_stage2_with_the_papers_mean_zero_point_is_not_lossless():
    """The non-integer z̃ of the paper moves the codes: the reason vitq rounds it."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    model = wrap_model(small_vit(), QuantConfig(w_bits=4, a_bits=4, method="isvit"))
    calibrate_activations(model, x[:8])
    set_quant_state(model, weights=False, activations=True)
    before = model(x)
    for _, linear in find_ln_pairs(model):
        linear.input_quantizer.zero_point = linear.input_quantizer.zero_point + 0.3  # z̃ = mean(z) + 0.3: fractional
    reparameterize(model)
    assert ((model(x) - before).norm() / before.norm()).item() > 1e-3


@pytest.mark.parametrize("bits", [3, 4])
def test_the_reported_stage2_change_is_exactly_zero_in_float64_and_float32_noise_is_reported_beside_it(bits):
    from core import quantize

    torch.manual_seed(0)
    x = torch.randn(32, 1, 28, 28)
    q = quantize(small_vit(), QuantConfig(w_bits=bits, a_bits=bits, preset="smoke", iters=1), x)
    assert q.reparam_logit_change <= 1e-12
    record = q.reparam_float32
    assert record["codes"] == 2 * 2 * 32 * 50 * 192 and 0 <= record["codes_changed"] <= record["codes"] * 1e-4
    assert record["logit_change_float32"] >= 0 and record["float32_rounding_noise"] >= 0


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("factory", [small_swin, padded_swin], ids=["whole-windows", "padded"])
def test_stage2_leaves_a_swins_logits_unchanged_with_quantizers_on_float64(factory, bits):
    """The padded case: timm pads the attention input with zeros after the LayerNorm, and zero in the folded
    space is not zero in the original one; the block pads with the folded image of zero instead."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 56, 56)
    model = wrap_model(factory(), QuantConfig(w_bits=bits, a_bits=bits, method="isvit"))
    calibrate_activations(model, x[:8])
    model = model.double()
    set_quant_state(model, weights=False, activations=True)  # as in SOS: weights stay float until stage 3
    with torch.no_grad():
        before = model(x.double())
        assert reparameterize(model) > 0
        after = model(x.double())
    assert ((after - before).norm() / before.norm()).item() <= 1e-9


def test_a_padded_swins_checkpoint_keeps_its_pad_values_and_an_older_one_without_them_still_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from core import load, quantize, save

    torch.manual_seed(0)
    x = torch.randn(16, 3, 56, 56)
    q = quantize(padded_swin(), QuantConfig(w_bits=4, a_bits=4, preset="smoke", iters=1, calib_size=16), x)
    pads = {k: v for k, v in q.model.state_dict().items() if k.endswith(".attn.pad_value")}
    assert len(pads) == 4 and all(v.abs().max() > 0 for v in pads.values())  # set by stage 2
    spec = {"timm_name": "swin_tiny_patch4_window7_224", "timm_kwargs": {"img_size": 56, "window_size": 4,
            "depths": [2, 2], "num_heads": [2, 4], "embed_dim": 32, "num_classes": 10}}
    save(q, tmp_path / "checkpoint.safetensors", metadata={"model": spec})
    loaded = load(tmp_path / "checkpoint.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x[:4]), q.model.eval()(x[:4]))
    # a checkpoint from before pad values existed: zero padding, as it was made
    tensors = load_file(str(tmp_path / "checkpoint.safetensors"))
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        metadata = f.metadata()
    save_file({k: v for k, v in tensors.items() if k not in pads}, str(tmp_path / "old.safetensors"), metadata)
    old = load(tmp_path / "old.safetensors")
    assert all(v.abs().max() == 0 for k, v in old.state_dict().items() if k.endswith(".attn.pad_value"))
