"""Accuracy-target search (``core.target_search``): the spec, the decision/held-out split, the Pareto
front, and a whole search on the bundled model (smoke preset) that needs mixed precision, progress over it, and a
cancel inside a trial. A target no configuration meets: tests/worker/test_target_job.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import CancelledError, InvalidConfigError, QuantConfig, TargetSpec, evaluate, load, load_dataset
from core.models import resolve_model_spec
from core.target_search import pareto_front, run_target_search, split_evaluation

CALIB, EVAL = "fashion-mnist:train:32", "fashion-mnist:test:100"
TINY = {"timm_name": "vit_tiny_patch16_224", "weights": "random",  # for what needs no accuracy
        "timm_kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 2},
        "preprocess": {"mean": [0.286], "std": [0.353], "input_size": [1, 28, 28]}}


def _base():
    return QuantConfig(w_bits=2, a_bits=8, preset="smoke")


def test_target_spec_validates_and_pairs_widths():
    spec = TargetSpec.from_dict({"max_top1_drop": 0.01, "w_bits": [8, 3, 4, 4], "a_bits": [4, 8]})
    assert spec.w_bits == (3, 4, 8) and spec.uniform_widths() == [(3, 4), (4, 4), (8, 8)]
    assert TargetSpec(0.03).uniform_widths() == [(3, 3), (4, 4), (6, 6), (8, 8)]
    for bad in ({"max_top1_drop": 1.5}, {"max_top1_drop": -0.1}, {"max_top1_drop": "1"}, {},
                {"max_top1_drop": 0.01, "w_bits": [9]}, {"max_top1_drop": 0.01, "w_bits": []},
                {"max_top1_drop": 0.01, "max_trials": 0}, {"max_top1_drop": 0.01, "decision_fraction": 0.99},
                {"max_top1_drop": 0.01, "bogus": 1}):
        with pytest.raises(InvalidConfigError):
            TargetSpec.from_dict(bad)


def test_the_split_is_disjoint_complete_and_stratified():
    labels = np.repeat(np.arange(10), 100)
    split = split_evaluation(labels, 0.5, seed=0)
    assert len(set(split.decision) & set(split.heldout)) == 0
    assert sorted([*split.decision, *split.heldout]) == list(range(1000))
    assert np.bincount(labels[split.decision]).tolist() == [50] * 10
    assert not np.array_equal(split.decision, np.arange(500))  # not "the first half"


def test_pareto_front_keeps_only_undominated_trials():
    points = [(10, 0.5), (20, 0.8), (15, 0.4), (30, 0.8)]
    trials = [{"index": i, "size_bytes": size, "decision_top1": top1} for i, (size, top1) in enumerate(points)]
    assert pareto_front(trials) == [0, 1]


@pytest.fixture(scope="module")
def mixed_search(tmp_path_factory):
    """W2A8 fails a 6-point target, W8A8 meets it, so the search tries the mixed ladder between them
    (three trials in all, to keep the test short)."""
    out = tmp_path_factory.mktemp("target")
    events = []
    target = TargetSpec(max_top1_drop=0.06, w_bits=(2, 8), a_bits=(8,), max_trials=3)
    report = run_target_search("fmnist-vit-tiny", target, _base(), CALIB, EVAL, out, progress=events.append,
                               exports=())
    return report, out, events


def test_a_search_tries_uniform_then_mixed_and_chooses_the_smallest_that_meets(mixed_search):
    report, out, _ = mixed_search
    target = report["target"]
    trials = target["trials"]
    assert [t["label"] for t in trials[:2]] == ["W2A8", "W8A8"]
    assert not trials[0]["meets_target"] and trials[1]["meets_target"]
    assert len(trials) == 3 and trials[2]["kind"] == "mixed" and trials[2]["raised_units"]
    assert all(trials[0]["size_bytes"] < t["size_bytes"] < trials[1]["size_bytes"] for t in trials[2:])
    meeting = [t for t in trials if t["meets_target"]]
    chosen = target["chosen"]
    assert target["target_met"] and chosen["size_bytes"] == min(t["size_bytes"] for t in meeting)
    assert report["per_unit_bits"] == chosen["per_unit_bits"] and report["bits_label"] == chosen["label"]
    assert trials[2]["cached_units"] > 0  # the mixed trial reuses units reconstructed at both widths
    assert chosen["index"] in target["pareto_front"]
    d, h = target["decision"], target["heldout"]
    assert d["n"] == h["n"] == 50 and d["drop"] == pytest.approx(d["fp_top1"] - d["quant_top1"])
    assert d["drop"] <= 0.06 + 1e-9
    assert report["quant"]["n"] == 100
    assert report["quant"]["top1"] == pytest.approx((d["quant_top1"] + h["quant_top1"]) / 2)
    assert report["sizes"]["model_bytes"] == chosen["size_bytes"] < report["sizes"]["checkpoint_bytes"]
    assert json.loads((out / "report.json").read_text())["target"]["chosen"]["index"] == chosen["index"]


def test_the_chosen_checkpoint_reloads_to_the_reported_top1(mixed_search):
    report, out, _ = mixed_search
    loaded = load(out / "checkpoint.safetensors")
    metrics = evaluate(loaded, load_dataset(EVAL, resolve_model_spec("fmnist-vit-tiny").preprocess))
    assert metrics["top1"] == report["quant"]["top1"] and metrics["n"] == report["quant"]["n"]


def test_progress_spans_the_whole_search(mixed_search):
    _, _, events = mixed_search
    steps = [e for e in events if e["total_steps"]]
    assert [e["done"] for e in steps] == sorted(e["done"] for e in steps)
    assert all(0 <= e["done"] <= e["total_steps"] for e in steps)
    stages = {e["stage"] for e in steps}
    assert any(s.startswith("trial 1 W2A8: stage") for s in stages)
    assert any(s.startswith("trial 3 ") and s.endswith("evaluate") for s in stages)
    assert steps[-1]["done"] == steps[-1]["total_steps"]


def test_a_search_needs_labelled_evaluation_data(tmp_path):
    with pytest.raises(Exception, match="evaluation"):
        run_target_search("fmnist-vit-tiny", TargetSpec(0.01), _base(), CALIB, None, tmp_path)


def test_a_search_can_be_cancelled_inside_a_trial(tmp_path):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 5  # 1 FP evaluation batch, the sensitivity, trial 1, then its first steps

    with pytest.raises(CancelledError):
        run_target_search(TINY, TargetSpec(0.01, w_bits=(2, 8), a_bits=(8,)), _base(), CALIB, EVAL,
                          tmp_path, should_stop=should_stop, exports=())
    assert calls["n"] == 6  # stopped at the first True, inside trial 1
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_the_cli_refuses_a_target_without_evaluation_data_or_with_bits(tmp_path, capsys):
    from vitq.cli import main

    common = ["quantize", "--model", "fmnist-vit-tiny", "--calib", CALIB, "--out", str(tmp_path), "--preset", "smoke"]
    assert main([*common, "--target-drop", "0.01"]) == 2
    assert "needs labelled evaluation data" in capsys.readouterr().err
    assert main([*common, "--target-drop", "0.01", "--eval", EVAL, "--w-bits", "4", "--a-bits", "4"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*common, "--eval", EVAL]) == 2
    assert "--target-drop" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
