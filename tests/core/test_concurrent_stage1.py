"""Stage 1's units trained together (one optimiser step for all) give what one unit after another gives;
skipping a unit with nothing to learn changes no figure; the fast arithmetic modes stay close to fp32."""

import copy
import sys

import pytest
import torch

from core import QuantConfig, quantize
from core.errors import InvalidConfigError
from core.execution import Execution, current, execution
from core.reconstruct import reconstruct_unit, reconstruct_units
from core.wrap import set_quant_state, wrap_model
from tests.core.conftest import small_swin, small_vit


@pytest.fixture(autouse=True)
def one_thread():
    """These runs are tiny: one thread is faster than two contending on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _calib(n=32, shape=(1, 28, 28)):
    torch.manual_seed(0)
    return torch.randn(n, *shape)


def _config(iters=6):
    return QuantConfig(w_bits=4, a_bits=4, preset="smoke", iters=iters, lr=3e-5)


def _assert_same_run(a, b, atol=1e-6):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].double(), sb[k].double(), atol=atol, rtol=1e-5), k
    assert len(a.reconstruction) == len(b.reconstruction)
    for ra, rb in zip(a.reconstruction, b.reconstruction, strict=True):
        assert ra.keys() == rb.keys() and ra["unit"] == rb["unit"]
        assert (ra["reverted"], ra["skipped"], ra.get("softmax_quantizers")) == \
            (rb["reverted"], rb["skipped"], rb.get("softmax_quantizers"))
        for key in ("loss_start", "loss_end", "loss_trained"):  # loss_trained: the trained parameters, kept or not
            same = ra[key] is rb[key] is None or ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7, nan_ok=True)
            assert same, (ra["unit"], key, ra[key], rb[key])
    assert a.baseline_check["kept"] == b.baseline_check["kept"]


@pytest.mark.parametrize("factory, shape", [(small_vit, (1, 28, 28)), (small_swin, (3, 56, 56))])
def test_concurrent_stage1_gives_the_parameters_of_sequential_stage1(factory, shape):
    calib = _calib(32, shape)
    with execution(concurrent_stage1=False):
        sequential = quantize(factory(), _config(), calib)
    concurrent = quantize(factory(), _config(), calib)
    trained = [r for r in sequential.reconstruction if r["stage"] == "stage1" and not r["skipped"]]
    assert len(trained) >= 3 and all(r["loss_trained"] != r["loss_start"] for r in trained)
    _assert_same_run(sequential, concurrent)
    if factory is small_vit:
        with execution(wave_bytes=1):  # every unit its own wave: the concurrent loop, one unit at a time
            _assert_same_run(sequential, quantize(factory(), _config(), calib))


def test_units_trained_together_each_get_their_own_steps():
    """Two blocks with their activation quantizers on, inputs and targets from the float model: the
    same parameters after N steps for the same seeds, whether trained alone or in one loop."""
    model = wrap_model(small_vit(), QuantConfig(w_bits=4, a_bits=4))
    from core.calibrate import calibrate_activations

    x = _calib(64)
    calibrate_activations(model, x)
    set_quant_state(model, weights=False, activations=True)
    fp = copy.deepcopy(model)
    set_quant_state(fp, weights=False, activations=False)
    with torch.no_grad():
        h0 = fp.patch_embed(x)
        h0 = fp._pos_embed(h0)
        h1 = fp.blocks[0](h0)
        h2 = fp.blocks[1](h1)
    alone = copy.deepcopy(model)
    results_alone = [reconstruct_unit(alone.blocks[i], xi, yi, iters=10, batch_size=32, lr=1e-5, seed=i)
                     for i, (xi, yi) in enumerate(((h0, h1), (h1, h2)))]
    together = copy.deepcopy(model)
    steps = []
    results_together = reconstruct_units(
        [(together.blocks[0], h0, h1, 0), (together.blocks[1], h1, h2, 1)], iters=10, batch_size=32, lr=1e-5,
        on_step=steps.append)
    assert steps == list(range(10))
    for a, b in zip(results_alone, results_together, strict=True):
        # loss_trained is the held-out loss of the trained parameters (kept or reverted): they moved, equally
        assert not a.skipped and a.loss_trained != a.loss_start
        assert a.loss_trained == pytest.approx(b.loss_trained, rel=1e-6)
        assert a.reverted == b.reverted
    for (name, pa), (_, pb) in zip(alone.named_parameters(), together.named_parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-7, rtol=1e-6), name
    assert not any(r.reverted for r in results_alone)  # so the parameters compared are the trained ones


def test_skipping_the_idle_patch_embedding_changes_no_figure_and_captures_nothing(monkeypatch):
    calib = _calib()
    with execution(concurrent_stage1=False):
        skipped = quantize(small_vit(), _config(4), calib)
        captured = []
        quantize_module = sys.modules["core.quantize"]  # the module (``core.quantize`` is also the function)
        real_capture = quantize_module.capture_unit_io
        monkeypatch.setattr(quantize_module, "has_nothing_to_learn", lambda unit: False)  # the old path
        monkeypatch.setattr(quantize_module, "capture_unit_io",
                            lambda model, name, *a, **k: captured.append(name) or real_capture(model, name, *a, **k))
        run_through = quantize(small_vit(), _config(4), calib)
    assert "patch_embed" in captured  # the old path captured and ran it, to find its loss is zero
    assert skipped.reconstruction == run_through.reconstruction
    assert skipped.reconstruction[0] == {"stage": "stage1", "unit": "patch_embed", "loss_start": 0.0,
                                         "loss_end": 0.0, "loss_trained": None, "reverted": False, "skipped": True}
    assert skipped.baseline_check == run_through.baseline_check
    assert skipped.reparam_logit_change == run_through.reparam_logit_change
    for k, v in skipped.model.state_dict().items():
        assert torch.equal(v, run_through.model.state_dict()[k]), k


def test_bf16_training_steps_stay_close_to_fp32_and_quantizers_see_float32():
    model = wrap_model(small_vit(), QuantConfig(w_bits=4, a_bits=4))
    from core.calibrate import calibrate_activations
    from core.quantizers import ActQuantizer

    x = _calib(64)
    calibrate_activations(model, x)
    set_quant_state(model, weights=False, activations=True)
    fp = copy.deepcopy(model)
    set_quant_state(fp, weights=False, activations=False)
    with torch.no_grad():
        h0 = fp._pos_embed(fp.patch_embed(x))
        h1 = fp.blocks[0](h0)
    results, seen = {}, {}
    for mode in ("fp32", "tf32", "bf16"):
        unit = copy.deepcopy(model.blocks[0])
        for m in unit.modules():
            if isinstance(m, ActQuantizer) and m.enabled:
                m.register_forward_hook(lambda _m, a, out, mode=mode: seen.setdefault(mode, set()).add(
                    (a[0].dtype, out.dtype)) if torch.is_grad_enabled() else None)
        with execution(matmul=mode):
            results[mode] = (reconstruct_unit(unit, h0, h1, iters=20, batch_size=32, lr=1e-4, seed=0), unit)
    assert seen["fp32"] == {(torch.float32, torch.float32)}
    assert (torch.bfloat16, torch.float32) in seen["bf16"]  # autocast ran the matmuls in bf16 ...
    assert {out for _, out in seen["bf16"]} == {torch.float32}  # ... and every quantizer in float32
    fp32, _ = results["fp32"]
    assert fp32.loss_trained < fp32.loss_start
    for mode in ("tf32", "bf16"):
        result, unit = results[mode]
        assert result.loss_trained == pytest.approx(fp32.loss_trained, rel=0.05), mode
        moved = [((pu - p0).norm() / (pf - p0).norm().clamp_min(1e-12)).detach() for pu, pf, p0 in
                 zip(unit.parameters(), results["fp32"][1].parameters(), model.blocks[0].parameters(), strict=True)
                 if (pf - p0).norm() > 0]
        assert all(0.5 < float(r) < 2.0 for r in moved), mode  # the same steps, not just any descent
    assert current() == Execution() and torch.get_float32_matmul_precision() == "highest"


def test_execution_options_are_checked():
    with pytest.raises(InvalidConfigError, match="matmul"):
        Execution(matmul="fp8")
    with pytest.raises(InvalidConfigError, match="wave_bytes"):
        Execution(wave_bytes=0)
