"""Smoke-preset runs end to end: quantize, save, load, evaluate, and the CLI around them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core import QuantConfig, evaluate, load, load_dataset, read_checkpoint_metadata, run_quantization
from core.bitpack import unpack_codes
from core.data import _read_idx
from core.errors import CheckpointError
from core.models import Preprocess
from tests.core.conftest import small_swin
from vitq.cli import main as cli_main

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def eval_npz(tmp_path_factory) -> Path:
    x = _read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:96]
    y = _read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:96].astype(np.int64)
    path = tmp_path_factory.mktemp("data") / "eval.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def isvit_run(tmp_path_factory, eval_npz):
    out = tmp_path_factory.mktemp("isvit")
    events = []
    config = QuantConfig(w_bits=4, a_bits=4, method="isvit", preset="smoke")
    report = run_quantization("fmnist-vit-tiny", config, "fashion-mnist:train:32", str(eval_npz), out,
                              progress=events.append)
    return out, report, events


def test_smoke_run_writes_checkpoint_and_a_complete_report(isvit_run):
    out, report, events = isvit_run
    assert (out / "checkpoint.safetensors").is_file() and (out / "report.json").is_file()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["quant"]["top1"] == report["quant"]["top1"]
    for key in ("model", "w_bits", "a_bits", "method", "config", "fp", "quant", "seconds", "layers", "reconstruction"):
        assert key in report
    assert report["preset"] == "smoke" and report["config"]["iters"] == 2
    assert {"stage1", "stage2", "stage3", "calibrate"} <= set(report["seconds"])
    assert 0 <= report["quant"]["top1"] <= 1 and report["fp"]["n"] == 96
    assert len(report["layers"]) == 12 * 4 + 2 and all(np.isfinite(layer["sqnr_db"]) for layer in report["layers"])
    stages = {e["stage"] for e in events}
    assert {"stage1", "stage3", "evaluate_quant"} <= stages
    steps = [e for e in events if e["stage"] in ("stage1", "stage3") and e["loss"] is None]
    assert steps[-1]["done"] == steps[-1]["total_steps"] == 2 * 14 * 2


def test_checkpoint_stores_uint8_codes_and_metadata(isvit_run):
    out, report, _ = isvit_run
    path = out / "checkpoint.safetensors"
    header = read_checkpoint_metadata(path)
    assert header["format"] == "vitq-checkpoint" and header["w_bits"] == 4 and header["method"] == "isvit"
    assert header["quant"]["top1"] == report["quant"]["top1"] and header["calibration_sha256"]
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("blocks.0.attn.qkv.weight_codes")  # 4-bit codes, two per byte
        assert packed.dtype == torch.uint8 and packed.numel() == 576 * 192 // 2
        assert int(unpack_codes(packed, 4, (576, 192)).max()) <= 15
    assert "blocks.0.attn.qkv.weight" not in keys
    softmax = "blocks.0.attn.matmul.attn_quantizer"  # SULQ and log√2 candidates, and the per-layer choice
    assert {f"{softmax}.candidates.0.eta", f"{softmax}.candidates.0.t_min", f"{softmax}.candidates.1.scale",
            f"{softmax}.choice",
            "blocks.0.attn.qkv.weight_quantizer.scale", "blocks.0.norm1.weight"} <= keys


def test_loaded_checkpoint_predicts_exactly_what_the_report_measured(isvit_run, eval_npz):
    out, report, _ = isvit_run
    model = load(out / "checkpoint.safetensors")
    dataset = load_dataset(str(eval_npz), Preprocess(
        mean=(0.286,), std=(0.353,), input_size=(1, 28, 28)))
    metrics = evaluate(model, dataset)
    assert metrics["top1"] == report["quant"]["top1"] and metrics["top5"] == report["quant"]["top5"]


def test_cli_evaluate_on_the_checkpoint_matches_the_report(isvit_run, eval_npz):
    out, report, _ = isvit_run
    result = subprocess.run(
        [sys.executable, "-m", "vitq.cli", "evaluate", str(out / "checkpoint.safetensors"), "--data", str(eval_npz)],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "top1": report["quant"]["top1"], "top5": report["quant"]["top5"], "n": 96}


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a vitq checkpoint"):
        load(plain)


@pytest.mark.parametrize("method", ["repq", "ptq-uniform"])
def test_baselines_run_through_the_same_engine_and_round_trip(tmp_path, eval_npz, method):
    config = QuantConfig(w_bits=3, a_bits=3, method=method, preset="smoke")
    report = run_quantization("fmnist-vit-tiny", config, "fashion-mnist:train:32", str(eval_npz), tmp_path)
    assert report["reconstruction"] == []
    assert report["config"]["softmax_quantizer"] == ("logsqrt2" if method == "repq" else "uniform")
    model = load(tmp_path / "checkpoint.safetensors")
    x = torch.from_numpy(np.load(eval_npz)["x"][:8]).float()[:, None] / 255
    assert torch.isfinite(model((x - 0.286) / 0.353)).all()


def test_cli_quantize_on_an_unseen_swin_given_as_spec_json_and_safetensors(tmp_path, capsys):
    model = small_swin(in_chans=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    spec = {"timm_name": "swin_tiny_patch4_window7_224",
            "timm_kwargs": {"img_size": 56, "window_size": 7, "depths": [2, 2], "num_heads": [2, 4],
                            "embed_dim": 32, "num_classes": 10, "in_chans": 1},
            "checkpoint": "w.safetensors", "preprocess": {"mean": [0.286], "std": [0.353]}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    code = cli_main(["quantize", "--model", str(tmp_path / "spec.json"), "--w-bits", "4", "--a-bits", "4",
                     "--preset", "smoke", "--calib", "fashion-mnist:train:16", "--eval", "fashion-mnist:test:32",
                     "--out", str(out), "--quiet", "--allow-chance-fp"])  # random weights: chance is expected
    assert code == 0
    printed = capsys.readouterr().out
    assert "top-1      FP " in printed and "-> quantized " in printed
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["timm_name"] == "swin_tiny_patch4_window7_224"
    assert any(r["unit"] == "layers.1.downsample" for r in report["reconstruction"])
    reloaded = load(out / "checkpoint.safetensors")
    # evaluated as the job was: with the preprocessing the checkpoint records (timm's Swin default
    # crop_pct 0.9), which a user reproducing the report's figure must use too
    recorded = read_checkpoint_metadata(out / "checkpoint.safetensors")["model"]["preprocess"]
    assert recorded["input_size"] == [1, 56, 56] and recorded["crop_pct"] == 0.9
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})
    data = load_dataset("fashion-mnist:test:32", pre)
    assert evaluate(reloaded, data)["top1"] == report["quant"]["top1"]


def test_cli_reports_user_errors_in_one_line_with_exit_status_2(capsys):
    code = cli_main(["quantize", "--model", "no-such-model", "--w-bits", "4", "--a-bits", "4",
                     "--calib", "fashion-mnist:train:8", "--out", "/tmp/never"])
    assert code == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert cli_main(["quantize", "--model", "fmnist-vit-tiny", "--w-bits", "9", "--a-bits", "4",
                     "--calib", "fashion-mnist:train:8", "--out", "/tmp/never"]) == 2


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "--model", "fmnist-vit-tiny", "--preset", "smoke", "--bits", "4",
                     "--methods", "isvit,ptq-uniform", "--calib", "fashion-mnist:train:16",
                     "--eval", "fashion-mnist:test:32", "--json", str(out), "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "| isvit W4A4 |" in table and "| ptq-uniform W4A4 |" in table
    data = json.loads(out.read_text())
    assert {"model", "fp_top1", "results"} <= set(data)
    rows = [(r["method"], r["w_bits"], r["a_bits"]) for r in data["results"]]
    assert rows == [("isvit", 4, 4), ("ptq-uniform", 4, 4)]
    assert all({"top1", "seconds", "agreement", "logit_sqnr_db"} <= set(r) for r in data["results"])
