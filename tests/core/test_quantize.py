import copy
import sys

import pytest
import torch

from core import QuantConfig, quantize
from core.errors import CancelledError, DatasetError
from core.reconstruct import capture_unit_io, chain_links, holdout_split, reconstruct_unit, run_unit, unit_loss
from core.wrap import find_units
from tests.core.conftest import small_swin, small_vit


def _calib(n=32, shape=(1, 28, 28)):
    torch.manual_seed(0)
    return torch.randn(n, *shape)


def test_should_stop_cancels_within_one_optimisation_step():
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 5

    events = []
    with pytest.raises(CancelledError):
        quantize(small_vit(), QuantConfig(w_bits=4, a_bits=4, preset="smoke", iters=50), _calib(),
                 progress=events.append, should_stop=should_stop)
    steps = [e for e in events if e["stage"] == "stage1"]
    assert len(steps) <= 5  # no work after the first True


def test_progress_counts_every_step_of_both_stages_in_order():
    events = []
    quantize(small_vit(), QuantConfig(w_bits=4, a_bits=4, preset="smoke", iters=3), _calib(), progress=events.append)
    steps = [e for e in events if e["stage"] in ("stage1", "stage3") and e["loss"] is None and e["unit"]]
    units = 4  # patch_embed, 2 blocks, head
    # index/total say which unit of how many (``blocks.0 2/4``); done/total_steps count the steps
    where = dict.fromkeys((e["unit"], e["index"], e["total"]) for e in steps if e["stage"] == "stage3")
    assert list(where) == [("patch_embed", 0, units), ("blocks.0", 1, units), ("blocks.1", 2, units),
                           ("head", 3, units)]
    done = [e["done"] for e in steps]
    assert done == sorted(done) and done[-1] == 2 * units * 3
    assert all(e["total_steps"] == 2 * units * 3 for e in steps)
    # stage 1's patch embedding has nothing quantized before it: skipped, its 3 steps reported at once
    first = [e for e in steps if e["stage"] == "stage1" and e["unit"] == "patch_embed"]
    assert [e["done"] for e in first] == [3]
    # the other three train together in stage 1 (one step moves all three), one after another in stage 3
    assert done[1:4] == [6, 9, 12] and {e["unit"] for e in steps[1:4]} == {"blocks.0 to head (3 at once)"}
    assert done[4:] == list(range(13, 2 * units * 3 + 1))
    assert {e["stage"] for e in events} >= {"calibrate", "stage1", "stage2", "stage3"}


def test_quantize_leaves_the_callers_model_untouched_and_trains_only_quantized_copies():
    model = small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = quantize(model, QuantConfig(w_bits=3, a_bits=3, preset="smoke", iters=4), _calib())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = [r for r in result.reconstruction if r["stage"] == "stage3"]
    assert len(changed) == 4 and result.reparam_logit_change is not None


def test_cached_chain_gives_the_same_unit_inputs_as_running_the_model_prefix():
    from core.config import QuantConfig as Config
    from core.wrap import wrap_model

    for factory, shape in ((small_vit, (1, 28, 28)), (small_swin, (3, 56, 56))):
        model = wrap_model(factory(), Config(w_bits=4, a_bits=4))
        x = _calib(8, shape)
        units = find_units(model)
        links = chain_links(model, units, x[:2])
        for i, linked in enumerate(links):
            if linked:
                prev_in = capture_unit_io(model, units[i - 1], x, 4, output=False)
                via_chain = run_unit(model.get_submodule(units[i - 1]), prev_in, 4)
                direct = capture_unit_io(model, units[i], x, 4, output=False)
                assert torch.allclose(via_chain, direct, atol=1e-6), units[i]


def test_calibration_data_must_be_images():
    with pytest.raises(DatasetError):
        quantize(small_vit(), QuantConfig(w_bits=4, a_bits=4, preset="smoke"), torch.randn(4, 28))


def test_evaluation_can_be_cancelled_between_batches():
    from core.data import load_dataset
    from core.evaluate import predict_logits
    from core.models import Preprocess

    data = load_dataset("fashion-mnist:test:600", Preprocess(mean=(0.286,), std=(0.353,), input_size=(1, 28, 28)))
    polls = {"n": 0}

    def stop_after_one_batch():
        polls["n"] += 1
        return polls["n"] > 1

    with pytest.raises(CancelledError, match="evaluation"):
        predict_logits(small_vit(), data, should_stop=stop_after_one_batch)
    assert polls["n"] == 2


def _unit_data(seed=0):
    torch.manual_seed(seed)
    unit = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    target_net = copy.deepcopy(unit)
    with torch.no_grad():
        for p in target_net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(256, 8)
    with torch.no_grad():
        return unit, x, target_net(x)


def test_reconstruction_keeps_trained_parameters_only_when_they_beat_the_start_on_held_out_images():
    unit, x, y = _unit_data()
    result = reconstruct_unit(unit, x, y, iters=60, batch_size=32, lr=1e-2, seed=0)
    assert not result.reverted and result.loss_end < result.loss_start
    assert result.loss_end == pytest.approx(float(unit_loss(unit, x[holdout_split(256, 0, x.device)[1]],
                                                             y[holdout_split(256, 0, x.device)[1]], 64)))


def test_reconstruction_that_makes_a_unit_worse_is_undone():
    unit, x, y = _unit_data()
    start = [p.detach().clone() for p in unit.parameters()]
    result = reconstruct_unit(unit, x, y, iters=5, batch_size=32, lr=0.9, seed=0)  # a step size that diverges
    assert result.reverted and result.loss_trained > result.loss_start == result.loss_end
    assert all(torch.equal(p, q) for p, q in zip(unit.parameters(), start, strict=True))


def test_a_unit_with_nothing_to_learn_is_skipped():
    unit, x, _ = _unit_data()
    with torch.no_grad():
        y = unit(x)
    steps = []
    result = reconstruct_unit(unit, x, y, iters=10, batch_size=32, lr=1e-2, seed=0, on_step=steps.append)
    assert result.skipped and result.loss_start == result.loss_end == 0.0 and steps == [9]


def _margin_rule(check):
    diff = check["difference"]
    return "reconstructed" if diff["mean"] + diff["margin_se"] * diff["stderr"] < 0 else "baseline"


def test_isvit_keeps_its_reconstruction_only_where_it_beats_repqs_model_on_held_out_images():
    calib = _calib(64)
    config = QuantConfig(w_bits=3, a_bits=3, preset="smoke", iters=4, calib_size=64)
    isvit = quantize(small_vit(), config, calib)
    check = isvit.baseline_check
    assert check["heldout_images"] == 8 and check["kept"] == _margin_rule(check)
    mse = check["logit_mse"]
    # the baseline is exactly RepQ-ViT's model: same held-out error as a repq run on the same images
    repq = quantize(small_vit(), QuantConfig(w_bits=3, a_bits=3, method="repq", preset="smoke", calib_size=64), calib)
    fp = small_vit()
    held = calib[holdout_split(64, 0, calib.device)[1]]
    with torch.no_grad():
        repq_mse = float((repq.model(held) - fp(held)).double().pow(2).mean())
        kept_mse = float((isvit.model(held) - fp(held)).double().pow(2).mean())
    assert repq_mse == pytest.approx(mse["baseline"], rel=1e-5)
    assert kept_mse == pytest.approx(mse[check["kept"]], rel=1e-5)


class _OffsetLogits(torch.nn.Module):
    """The float model's logits plus an offset of a chosen size per image: a model whose error on the
    held-out images is known exactly."""

    def __init__(self, fp, offsets):
        super().__init__()
        self.fp, self.offsets = fp, offsets

    def forward(self, x):
        return self.fp(x) + self.offsets[: x.shape[0], None]


@pytest.mark.parametrize(("noisy", "kept"), [(False, "reconstructed"), (True, "baseline")])
def test_a_reconstruction_within_the_noise_of_the_held_out_comparison_gives_way_to_repq(noisy, kept):
    """Better on every image wins. Better on average but by much less than the image-to-image spread
    (1 % lower mean error, 64 images) is not resolved, and RepQ-ViT's model stays."""
    quantize_module = sys.modules["core.quantize"]
    fp = small_vit().eval()
    baseline = _OffsetLogits(fp, torch.full((64,), 0.1))
    if noisy:
        torch.manual_seed(0)
        squared = torch.distributions.Exponential(1.0).sample((64,))
        squared = squared / squared.mean() * 0.99 * 0.1**2
        offsets = squared.sqrt()
    else:
        offsets = torch.full((64,), 0.05)
    result = quantize_module.QuantizedModel(_OffsetLogits(fp, offsets), QuantConfig(w_bits=4, a_bits=4))
    quantize_module._keep_the_better(result, baseline, fp, _calib(64))
    check = result.baseline_check
    assert check["logit_mse"]["reconstructed"] < check["logit_mse"]["baseline"]
    assert check["kept"] == kept == _margin_rule(check)
    assert (result.model is baseline) == (kept == "baseline")
