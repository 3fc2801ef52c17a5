"""The export figures of docs/export.md: ONNX Runtime vs the PyTorch checkpoint on a test set, file sizes,
and W8A8 QDQ vs FP32 ONNX latency, for each model and configuration.

    .venv/bin/python scripts/measure_export.py --model fmnist-vit-tiny --label vit \\
        --json docs/measurements/export-vit.json --work /tmp/export-work

Each configuration is quantized with ``run_quantization`` (which writes checkpoint.safetensors and
model.onnx); the checkpoint is then reloaded with ``core.load`` and both files are run over the whole
evaluation set, so the comparison is between the two files a user downloads.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import QuantConfig, load, load_dataset, run_quantization
from core.checkpoint import library_versions
from core.evaluate import accuracy, dataset_labels, predict_logits
from core.export import predict_logits_onnx, session
from core.models import build_model, resolve_model_spec

CONFIGS = (("isvit", 4, 4), ("isvit", 8, 8), ("repq", 3, 3))


def export_fp32(model: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> Path:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).eval(), (torch.zeros(2, *shape),), str(path), dynamo=False,
                          opset_version=20, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return path


def latency(paths: dict[str, Path], shape: tuple[int, ...], threads: int, runs: dict[int, int]) -> dict[str, Any]:
    """Median wall time per batch, each file's runs interleaved with the other's so both see the same load."""
    sessions = {name: session(path, threads=threads) for name, path in paths.items()}
    out: dict[str, Any] = {"threads": threads}
    for batch, n in runs.items():
        x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for sess in sessions.values():  # warm-up
            for _ in range(3):
                sess.run(None, {"images": x})
        for _ in range(n):
            for name, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, {"images": x})
                times[name].append(1000 * (time.perf_counter() - t0))
        row = {name: {"median_ms": round(statistics.median(t), 3), "min_ms": round(min(t), 3), "runs": n}
               for name, t in times.items()}
        names = list(sessions)
        row["ratio_median"] = round(row[names[1]]["median_ms"] / row[names[0]]["median_ms"], 3)
        out[f"batch_{batch}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="built-in id or spec JSON")
    parser.add_argument("--label", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--calib", default="fashion-mnist:train:1024")
    parser.add_argument("--eval", default="fashion-mnist:test")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(f"{m}:{w}:{a}" for m, w, a in CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work) / args.label
    work.mkdir(parents=True, exist_ok=True)
    spec = resolve_model_spec(args.model)
    eval_ds = load_dataset(args.eval, spec.preprocess)
    labels = dataset_labels(eval_ds)
    float_model = build_model(spec).eval()
    t0 = time.perf_counter()
    fp = accuracy(predict_logits(float_model, eval_ds), labels)
    result: dict[str, Any] = {
        "what": "ONNX Runtime (CPU) vs the PyTorch checkpoint, sizes, W8A8 QDQ vs FP32 ONNX latency",
        "machine": "shared, busy 2-core CPU machine (three engineers' jobs and tests running alongside)",
        "model": args.model, "label": args.label, "calib": args.calib, "eval": args.eval, "preset": args.preset,
        "threads": args.threads, "fp_top1": fp["top1"], "fp_eval_seconds": round(time.perf_counter() - t0, 1),
        "versions": {**library_versions(), "onnx": __import__("onnx").__version__,
                     "onnxruntime": __import__("onnxruntime").__version__},
        "results": [],
    }
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for item in args.configs.split(","):
        method, w_bits, a_bits = item.split(":")
        w_bits, a_bits = int(w_bits), int(a_bits)
        out = work / f"{method}-w{w_bits}a{a_bits}"
        t0 = time.perf_counter()
        config = QuantConfig(w_bits=w_bits, a_bits=a_bits, method=method, preset=args.preset)
        report = run_quantization(spec, config, args.calib, None, out)
        quant_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch_logits = predict_logits(load(out / "checkpoint.safetensors"), eval_ds)
        torch_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        ort_logits = predict_logits_onnx(session(out / "model.onnx", threads=args.threads), eval_ds)
        ort_seconds = time.perf_counter() - t0
        pt, ox = accuracy(torch_logits, labels), accuracy(ort_logits, labels)
        diff = (ort_logits - torch_logits).abs()
        sizes = report["sizes"]
        row = {
            "method": method, "w_bits": w_bits, "a_bits": a_bits, "label": f"{method} W{w_bits}A{a_bits}",
            "n": pt["n"], "torch_top1": pt["top1"], "onnx_top1": ox["top1"],
            "top1_difference_points": round(100 * (ox["top1"] - pt["top1"]), 3),
            "argmax_disagreements": int((ort_logits.argmax(1) != torch_logits.argmax(1)).sum()),
            "max_abs_logit_difference": float(diff.max()), "mean_abs_logit_difference": float(diff.mean()),
            "max_abs_logit": float(torch_logits.abs().max()),
            "images_with_any_logit_difference_over_1e-5": int((diff > 1e-5).any(dim=1).sum()),
            **sizes,
            "onnx_to_fp32": round(sizes["onnx_bytes"] / sizes["fp32_parameters_bytes"], 4),
            "checkpoint_to_fp32": round(sizes["checkpoint_bytes"] / sizes["fp32_parameters_bytes"], 4),
            "seconds": {"quantize_and_export": round(quant_seconds, 1), "torch_eval": round(torch_seconds, 1),
                        "onnx_eval": round(ort_seconds, 1), "export": report["seconds"].get("export")},
            "iters": report["config"]["iters"], "calib_n": report["calibration"].get("n"),
        }
        result["results"].append(row)
        print(json.dumps(row), flush=True)
        json_path.write_text(json.dumps(result, indent=2))
        if (method, w_bits, a_bits) == ("isvit", 8, 8):
            shape = tuple(spec.preprocess.input_size)
            fp32_path = export_fp32(float_model, work / "fp32.onnx", shape)
            result["latency_w8a8_vs_fp32"] = {
                "files": {"fp32": fp32_path.stat().st_size, "w8a8": (out / "model.onnx").stat().st_size},
                **latency({"fp32": fp32_path, "w8a8": out / "model.onnx"}, shape, args.threads, {1: 200, 64: 20}),
            }
            print(json.dumps(result["latency_w8a8_vs_fp32"]), flush=True)
            json_path.write_text(json.dumps(result, indent=2))
    result["complete"] = True
    json_path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
