import math

import pytest
import torch

from core.quantizers import SULQ, Log2Quantizer, LogSqrt2Quantizer, SelectQuantizer, UniformQuantizer, mse_range_search
from core.quantizers.sulq import ETA_GRID
from core.quantizers.uniform import WEIGHT_PERCENTILES, fake_quant


def _paper_softmax_values(n: int = 20000) -> torch.Tensor:
    """Values spanning [1.08e-8, 0.868], log-uniformly, as in the paper's Fig. 1 example."""
    lo, hi = math.log2(1.08e-8), math.log2(0.868)
    t = torch.linspace(lo, hi, n, dtype=torch.float64)
    return torch.exp2(t).float()


def test_plain_log2_collapses_the_tail_into_one_code():
    x = _paper_softmax_values()
    q = Log2Quantizer(3).codes(x)
    exponents = torch.round(-torch.log2(x))
    assert exponents.min() == 0 and exponents.max() == 26
    assert torch.all(q[exponents >= 7] == 7)  # rounded exponents 7 … 26 all become code 7
    assert (q == 7).float().mean() > 0.7  # most of the range is a single code


def test_sulq_spreads_exactly_2_to_the_b_codes_over_the_range():
    x = _paper_softmax_values()
    sulq = SULQ(3)
    sulq.calibrate(x)
    codes = sulq.codes(x)
    assert set(codes.unique().tolist()) == set(range(8))
    # never 2^b + 1 codes: the calibrated range itself maps the data onto 0 … 7, before codes() clamps
    unclamped = torch.round(-torch.log2(x + sulq.eta) / sulq.scale) + sulq.zero_point
    assert unclamped.min() == 0 and unclamped.max() == 7
    real = SULQ(3, integer_exponent=False)
    real.calibrate(x)
    real.enabled = True
    assert len(real(x).unique()) == 8


def test_sulq_with_a_small_shift_gives_every_code_a_fair_share_of_the_tail():
    x = _paper_softmax_values()
    sulq = SULQ(3, eta_grid=(1e-6,))
    sulq.calibrate(x)
    counts = torch.bincount(sulq.codes(x).long(), minlength=8).float() / x.numel()
    assert counts.min() > 0.04 and counts.max() < 0.3


def test_sulq_eta_comes_from_the_grid_and_beats_plain_log2_on_softmax_like_data():
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(64, 3, 50, 50) * 3, dim=-1)
    sulq, log2 = SULQ(3), Log2Quantizer(3)
    sulq.calibrate(attn)
    sulq.enabled = log2.enabled = True
    assert any(math.isclose(float(sulq.eta), v, rel_tol=1e-6) for v in ETA_GRID)
    err_sulq = (sulq(attn) - attn).pow(2).mean()
    err_log2 = (log2(attn) - attn).pow(2).mean()
    assert err_sulq < err_log2


def test_sulq_integer_exponent_switch_gives_powers_of_two():
    x = _paper_softmax_values()
    sulq = SULQ(4, integer_exponent=True)
    sulq.calibrate(x)
    sulq.enabled = True
    y = sulq(x) + sulq.eta
    exps = torch.log2(y)
    assert torch.allclose(exps, exps.round(), atol=1e-4)
    real = SULQ(4, integer_exponent=False)
    real.calibrate(x)
    real.enabled = True
    y = torch.log2(real(x) + real.eta)
    assert not torch.allclose(y, y.round(), atol=1e-3)


def test_logsqrt2_maps_values_beyond_the_last_code_to_zero():
    x = torch.tensor([1.0, 0.5, 2**-0.5, 1e-9])
    q = LogSqrt2Quantizer(3)
    q.scale = torch.tensor(1.0)
    q.enabled = True
    y = q(x)
    assert y[0] == 1.0 and torch.isclose(y[1], torch.tensor(0.5)) and torch.isclose(y[2], torch.tensor(2**-0.5))
    assert y[3] == 0.0


def test_uniform_per_tensor_round_trip_and_codes():
    torch.manual_seed(0)
    x = torch.randn(1000)
    q = UniformQuantizer(4)
    q.calibrate(x)
    q.enabled = True
    codes = q.codes(x)
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.allclose(q(x), q.scale * (codes - q.zero_point), atol=1e-6)
    sqnr = 10 * torch.log10(x.pow(2).sum() / (q(x) - x).pow(2).sum())
    assert sqnr > 15


def test_per_channel_search_is_vectorised_and_matches_row_by_row():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * torch.linspace(0.1, 5, 32)[:, None]
    scale, zero = mse_range_search(w, 4, 0, WEIGHT_PERCENTILES)
    for row in (0, 7, 31):
        s, z = mse_range_search(w[row : row + 1], 4, None, WEIGHT_PERCENTILES)
        assert torch.isclose(scale[row], s[0]) and zero[row] == z[0]
    # MSE choice is never worse than plain min/max
    s_mm, z_mm = mse_range_search(w, 4, 0, (1.0,))
    err = (fake_quant(w, scale[:, None], zero[:, None], 4) - w).pow(2).mean(1)
    err_mm = (fake_quant(w, s_mm[:, None], z_mm[:, None], 4) - w).pow(2).mean(1)
    assert torch.all(err <= err_mm + 1e-9)


def test_fused_kernel_matches_the_reference_formula_including_non_integer_zero_points():
    torch.manual_seed(0)
    x = torch.randn(4096) * 3
    for zero in (3.0, 2.4):
        q = UniformQuantizer(3)
        q.set_params(torch.tensor(0.5), torch.tensor(zero))
        q.enabled = True
        ref = fake_quant(x, q.scale, q.zero_point, 3)
        assert torch.allclose(q(x), ref, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "channel_dim", "params"),
    [((64, 50, 96), None, (0.5, 3.0)), ((64, 50, 96), None, (0.5, 2.4)), ((64, 50, 96), -1, None),
     ((96, 48), 0, None)],
)
def test_evaluation_without_grad_is_bit_exact_with_the_fused_training_kernels(shape, channel_dim, params):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 2
    x.view(-1)[:512] = (torch.arange(512) - 256) * 0.25  # x/s = k/2: exact ties at s = 0.5, odd z included
    q = UniformQuantizer(3, channel_dim=channel_dim)
    q.calibrate(x)
    if params is not None:
        q.set_params(torch.tensor(params[0]), torch.tensor(params[1]))
    q.enabled = True
    with torch.enable_grad():
        trained = q(x.clone().requires_grad_(True)).detach()
    with torch.no_grad():
        evaluated = q(x)
    assert torch.equal(trained, evaluated)


@pytest.mark.parametrize("quantizer", [UniformQuantizer(4), SULQ(4), LogSqrt2Quantizer(4), Log2Quantizer(4)])
def test_quantizers_pass_gradients_straight_through(quantizer):
    x = torch.softmax(torch.randn(8, 16), -1).requires_grad_(True)
    quantizer.calibrate(x.detach())
    quantizer.enabled = True
    quantizer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_disabled_quantizer_is_identity_and_calibration_passes_through():
    x = torch.randn(10)
    q = UniformQuantizer(2)
    assert torch.equal(q(x), x)
    q.calibrating = True
    assert torch.equal(q(x), x) and bool(q.initialized)


def test_zero_points_outside_the_code_range_still_quantize_correctly():
    torch.manual_seed(0)
    w = torch.rand(8, 16) + 0.5  # every channel positive: zero points fall below 0
    q = UniformQuantizer(4, channel_dim=0, percentiles=WEIGHT_PERCENTILES)
    q.calibrate(w)
    assert (q.zero_point < 0).any()
    q.enabled = True
    assert torch.allclose(q(w), fake_quant(w, q.scale, q.zero_point, 4), atol=1e-6)
    assert (q(w) - w).abs().max() < 0.1
    t = UniformQuantizer(4)
    t.calibrate(w.flatten())
    t.enabled = True
    assert torch.allclose(t(w), fake_quant(w, t.scale, t.zero_point, 4), atol=1e-6)


def _softmax_maps(bits_scale: float = 3.0) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.softmax(torch.randn(4, 3, 50, 50) * bits_scale, dim=-1)


def test_select_quantizer_keeps_the_candidate_with_the_smaller_calibration_mse():
    x = _softmax_maps()
    select = SelectQuantizer([SULQ(4), LogSqrt2Quantizer(4)])
    select.calibrating = True
    assert torch.equal(select(x), x)  # calibration passes the tensor through
    select.calibrating = False
    errors = []
    for candidate in (SULQ(4), LogSqrt2Quantizer(4)):
        candidate.calibrate(x)
        errors.append((candidate.quantize(x) - x).pow(2).mean().item())
    assert int(select.choice) == min(range(2), key=errors.__getitem__)
    select.enabled = True
    assert all(c.enabled for c in select.candidates)  # the candidates follow the switch
    assert torch.equal(select(x), select.chosen.quantize(x))


def test_stage1_picks_the_post_softmax_quantizer_by_the_units_own_loss():
    from core.calibrate import calibrate_activations
    from core.config import QuantConfig
    from core.reconstruct import choose_softmax_quantizers, run_unit, unit_loss
    from core.wrap import set_quant_state, wrap_model
    from tests.core.conftest import small_vit

    torch.manual_seed(0)
    x = torch.randn(32, 1, 28, 28)
    fp = small_vit()
    model = wrap_model(small_vit(), QuantConfig(w_bits=3, a_bits=3))
    calibrate_activations(model, x)
    set_quant_state(model, weights=False, activations=True)
    block = model.blocks[0]
    select = block.attn.matmul.attn_quantizer
    assert isinstance(select, SelectQuantizer)
    with torch.no_grad():
        inputs = model.patch_embed(x)
        inputs = torch.cat([model.cls_token.expand(32, -1, -1), inputs], dim=1) + model.pos_embed
        targets = run_unit(fp.blocks[0], inputs, 16)
    losses = []
    for index in range(2):
        select.choice.fill_(index)
        losses.append(float(unit_loss(block, inputs, targets, 16)))
    chosen = choose_softmax_quantizers(block, inputs, targets, 16)
    assert int(select.choice) == min(range(2), key=losses.__getitem__)
    assert chosen == {"attn.matmul.attn_quantizer": type(select.chosen).__name__}
