"""``vitq bench-deploy``: the deployable files of one model side by side, in one run, on this CPU.

It times the FP32 ONNX export, ONNX Runtime's own ``quantize_static`` of it (QDQ, per-channel int8
weights, uint8 activations, calibrated on the same calibration images vitq uses) and vitq's files at
batch 1 and 64, interleaved run by run so every file sees the same load, and reports top-1, logit SQNR
against the FP32 file, size and the latency ratios to FP32 (the median of the per-pair ratios). Where
the ``openvino`` package is installed (``pip install vitq[deploy]``) and loads a file, its CPU runtime
is timed too. vitq's files are run with vitq's session options and, where they can differ (4-bit
weights), evaluated with ONNX Runtime's defaults as well.

    vitq bench-deploy fmnist-vit-tiny --configs w8a8,w4a8,w4a16 --eval fashion-mnist:test:2000 --json out.json
    vitq bench-deploy run/checkpoint.safetensors --eval fashion-mnist:test:2000
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI registers this verb at start-up: torch, numpy and core load only when it runs
    import torch

BATCHES = (1, 64)
CONFIG_PATTERN = re.compile(r"^w([2-8])a([2-8]|16)$")


@dataclass
class DeployFile:
    """One file of the comparison: what it is, where, and what was measured on it."""

    name: str
    path: Path
    kind: str  # "fp32", "ort-quantize-static", "vitq"
    measured: dict[str, Any] = field(default_factory=dict)


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"w8a8,w4a16"`` → ``[(8, 8), (4, 16)]``; anything else is refused with the form expected."""
    from core.errors import InvalidConfigError

    out = []
    for item in filter(None, (t.strip().lower() for t in text.split(","))):
        match = CONFIG_PATTERN.match(item)
        if not match:
            raise InvalidConfigError(f"--configs: {item!r} is not wNaM (weights 2-8 bits, activations 2-8 or 16)")
        out.append((int(match.group(1)), int(match.group(2))))
    if not out:
        raise InvalidConfigError("--configs names no configuration")
    return out


def export_fp32(model: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> Path:
    """The float model as ONNX, traced the way vitq traces its own files (TorchScript exporter)."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).eval(), (torch.zeros(2, *shape),), str(path), dynamo=False,
                          opset_version=20, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return path


def ort_quantize_static(fp32: Path, out: Path, calib: torch.Tensor, batch: int = 32) -> Path:
    """ONNX Runtime's own static quantizer: QDQ, per-channel int8 weights, uint8 activations (MinMax
    calibration on ``calib``), after its recommended pre-processing (shape inference, fusions)."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = np.ascontiguousarray(calib.float().numpy())

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": images[i:i + batch]} for i in range(0, len(images), batch)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    pre = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink(missing_ok=True)
    return out


def logit_sqnr_db(reference: torch.Tensor, logits: torch.Tensor) -> float:
    import torch

    noise = (logits - reference).pow(2).sum().clamp_min(1e-30)
    return round(float(10 * torch.log10(reference.pow(2).sum() / noise)), 2)


def _ort_runner(path: Path, threads: int):
    from core.export import session

    sess = session(path, threads=threads)
    return lambda x: sess.run(None, {"images": x})


def _openvino_runner(path: Path, threads: int):
    import openvino

    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def openvino_available() -> str | None:
    """None when the ``openvino`` package imports; else why not."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"openvino is not installed ({exc}); pip install 'vitq[deploy]'"
    return None


def interleaved_latency(runners: dict[str, Any], shape: tuple[int, ...], runs: dict[int, int],
                        warmup: int = 3) -> dict[str, dict[str, Any]]:
    """Per batch: each runner's median and minimum ms, and the median of its per-pair ratio to the
    first runner (the runs alternate A B C A B C …, so a load change hits every file alike)."""
    import numpy as np

    names = list(runners)
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for batch, n in runs.items():
        x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
        for run in runners.values():
            for _ in range(warmup):
                run(x)
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(n):
            for name in names:
                t0 = time.perf_counter()
                runners[name](x)
                times[name].append(1000 * (time.perf_counter() - t0))
        base = times[names[0]]
        for name in names:
            ratios = [t / b for t, b in zip(times[name], base, strict=True)]
            out[name][f"batch_{batch}"] = {"median_ms": round(statistics.median(times[name]), 3),
                                           "min_ms": round(min(times[name]), 3), "runs": n,
                                           "ratio_to_fp32": round(statistics.median(ratios), 3)}
    return out


def _execution(kind: str, w_bits: int | None, a_bits: int | None) -> str:
    """How ONNX Runtime (CPU) executes the file's matmuls: integer kernels or simulated."""
    if kind == "fp32":
        return "float"
    if kind == "ort-quantize-static":
        return "integer (QLinearMatMul, int8 x uint8)"
    if w_bits is None or a_bits is None:
        return "unknown"
    if a_bits == 16:
        return "MatMulNBits (int4 weights, float activations)" if w_bits <= 4 else "float (dequantized weights)"
    if a_bits == 8 and w_bits > 4:
        return "integer (MatMulIntegerToFloat, u8 x s8)"
    if a_bits == 8:
        return "weights dequantized to float, A8 simulated (no int4 x int8 kernel for a QDQ graph)"
    return f"simulated (A{a_bits} fake-quant in float; no runtime executes A{a_bits})"


def _vitq_files(args: argparse.Namespace, work: Path) -> tuple[Any, list[DeployFile], dict[str, Any]]:
    """The model spec and vitq's files: the checkpoint's export, or one quantization run per config."""
    from core import QuantConfig, read_checkpoint_metadata, run_quantization
    from core.errors import InvalidConfigError
    from core.export import export_checkpoint
    from core.models import make_spec, resolve_model_spec

    target = args.model
    if target.endswith(".safetensors") and Path(target).is_file():
        header = read_checkpoint_metadata(target)
        spec = make_spec({**header["model"], "checkpoint": None})
        name = f"vitq W{header['w_bits']}A{header['a_bits']}"
        path = export_checkpoint(target, work / "vitq-checkpoint.onnx")
        info = {"source": "checkpoint", "w_bits": header["w_bits"], "a_bits": header["a_bits"],
                "method": header.get("method"), "quant_top1_reported": (header.get("quant") or {}).get("top1")}
        return spec, [DeployFile(name, path, "vitq", {"config": info})], {}
    spec = resolve_model_spec(target)
    files = []
    for w_bits, a_bits in parse_configs(args.configs):
        out = work / f"w{w_bits}a{a_bits}"
        config = QuantConfig(w_bits=w_bits, a_bits=a_bits, method=args.method, preset=args.preset)
        started = time.perf_counter()
        report = run_quantization(target, config, args.calib, None, out, exports=("onnx",))
        onnx = report["exports"]["onnx"]
        if not onnx.get("file"):
            raise InvalidConfigError(f"W{w_bits}A{a_bits}: the ONNX export failed: {onnx.get('error')}")
        info = {"source": "quantized here", "w_bits": w_bits, "a_bits": a_bits, "method": args.method,
                "preset": report["preset"], "iters": report["config"]["iters"],
                "quantize_seconds": round(time.perf_counter() - started, 1)}
        files.append(DeployFile(f"vitq W{w_bits}A{a_bits}", out / onnx["file"], "vitq", {"config": info}))
    return spec, files, {}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from core import load_dataset
    from core.calibration_sample import calibration_sample
    from core.evaluate import accuracy, dataset_labels
    from core.export import evaluate_onnx_as_deployed, has_4bit_weights, predict_logits_onnx, session
    from core.models import build_model

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec, vitq_files, _ = _vitq_files(args, work)
    shape = tuple(spec.preprocess.input_size)
    model = build_model(spec).eval()
    fp32 = DeployFile("FP32 ONNX", export_fp32(model, work / "fp32.onnx", shape), "fp32")
    calib_ds = load_dataset(args.calib, spec.preprocess)
    calib = calibration_sample(calib_ds, args.ort_calib_size, 0).images
    ort_file = DeployFile("ORT quantize_static", ort_quantize_static(fp32.path, work / "ort-qdq.onnx", calib),
                          "ort-quantize-static")
    files = [fp32, ort_file, *vitq_files]

    eval_ds = load_dataset(args.eval, spec.preprocess)
    labels = dataset_labels(eval_ds)
    reference = None
    for f in files:
        logits = predict_logits_onnx(session(f.path, threads=args.threads), eval_ds)
        f.measured.update(accuracy(logits, labels))
        if reference is None:
            reference = logits
        else:
            f.measured["logit_sqnr_db"] = logit_sqnr_db(reference, logits)
            same = logits.argmax(1) == reference.argmax(1)
            f.measured["agreement_with_fp32"] = round(float(same.float().mean()), 4)
        f.measured["bytes"] = f.path.stat().st_size
        cfg = f.measured.get("config", {})
        f.measured["execution_onnxruntime"] = _execution(f.kind, cfg.get("w_bits"), cfg.get("a_bits"))
        if f.kind == "vitq" and has_4bit_weights(f.path):
            deployed = evaluate_onnx_as_deployed(f.path, eval_ds, threads=args.threads)
            f.measured["default_session_top1"] = deployed["default_options"]["top1"]
            f.measured["default_session_differs"] = deployed["differ"]

    runs = {1: args.runs_batch1, 64: args.runs_batch64}
    latency = interleaved_latency({f.name: _ort_runner(f.path, args.threads) for f in files}, shape, runs)
    for f in files:
        f.measured["onnxruntime"] = latency[f.name]
    openvino_note = None if args.no_openvino else openvino_available()
    if not args.no_openvino and openvino_note is None:
        runners = {}
        for f in files:
            try:
                runners[f.name] = _openvino_runner(f.path, args.threads)
            except Exception as exc:  # noqa: BLE001 - a file OpenVINO cannot load is a result, not a crash
                f.measured["openvino"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        if fp32.name in runners:
            ov_latency = interleaved_latency(runners, shape, runs)
            for f in files:
                if f.name in ov_latency:
                    f.measured["openvino"] = ov_latency[f.name]
    import onnxruntime

    result: dict[str, Any] = {
        "what": "FP32 ONNX vs ONNX Runtime quantize_static vs vitq's files: top-1, logit SQNR vs FP32, size, "
                "latency (interleaved runs; ratio = median of per-pair ratios to FP32)",
        "command": "vitq bench-deploy " + " ".join(args.argv),
        "model": args.model, "calib": args.calib, "eval": args.eval, "threads": args.threads,
        "ort_calibration_images": int(len(calib)), "runs": runs,
        "machine": args.machine,
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "openvino": _openvino_version()},
        "openvino_note": openvino_note,
        "files": [{"name": f.name, "file": str(f.path), "kind": f.kind, **f.measured} for f in files],
    }
    return result


def _openvino_version() -> str | None:
    try:
        import openvino

        return openvino.__version__
    except ImportError:
        return None


def markdown_table(result: dict[str, Any]) -> str:
    has_ov = any("openvino" in f and "batch_1" in f["openvino"] for f in result["files"])
    head = "| file | top-1 | logit SQNR vs FP32 | size | ORT batch 1 | ORT batch 64 |"
    rule = "|---|---|---|---|---|---|"
    if has_ov:
        head += " OpenVINO batch 1 | OpenVINO batch 64 |"
        rule += "---|---|"
    lines = [head + " ORT executes |", rule + "---|"]
    for f in result["files"]:
        top1 = f"{100 * f['top1']:.2f}"
        if f.get("default_session_differs"):
            top1 += f" (default options {100 * f['default_session_top1']:.2f})"
        sqnr = f"{f['logit_sqnr_db']:.1f} dB" if "logit_sqnr_db" in f else "–"
        row = [f["name"], top1, sqnr, f"{f['bytes'] / 1e6:.2f} MB"]
        for runtime in ("onnxruntime", "openvino") if has_ov else ("onnxruntime",):
            for batch in BATCHES:
                m = f.get(runtime, {}).get(f"batch_{batch}")
                row.append(f"{m['ratio_to_fp32']:.2f}× ({m['median_ms']:.1f} ms)" if m else "–")
        row.append(f["execution_onnxruntime"])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register ``bench-deploy`` on the CLI's sub-parsers."""
    p = sub.add_parser("bench-deploy", help="time FP32 ONNX, ORT quantize_static and vitq's files on this CPU")
    p.add_argument("model", help="a model id / spec JSON (quantized here per --configs) or a vitq checkpoint")
    p.add_argument("--configs", default="w8a8", help="wNaM list when MODEL is a model, e.g. w8a8,w4a8,w4a16")
    p.add_argument("--method", default="isvit", choices=["isvit", "repq", "ptq-uniform"])
    p.add_argument("--preset", default="quick", choices=["paper", "quick", "smoke"])
    p.add_argument("--calib", default="fashion-mnist:train:1024")
    p.add_argument("--ort-calib-size", type=int, default=256,
                   help="calibration images for ORT's quantize_static (drawn as vitq draws its own)")
    p.add_argument("--eval", default="fashion-mnist:test:2000")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs-batch1", type=int, default=100)
    p.add_argument("--runs-batch64", type=int, default=10)
    p.add_argument("--no-openvino", action="store_true")
    p.add_argument("--machine", default="", help="a note on the machine for the JSON (e.g. 'under load')")
    p.add_argument("--work", default="bench-deploy-work", help="directory for the files")
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=cmd_bench_deploy)


def cmd_bench_deploy(args: argparse.Namespace) -> int:
    import sys

    from core.errors import InvalidConfigError

    args.argv = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "bench-deploy" else [args.model]
    for name in ("runs_batch1", "runs_batch64", "threads", "ort_calib_size"):
        if getattr(args, name) < 1:
            raise InvalidConfigError(f"--{name.replace('_', '-')} must be at least 1")
    result = run_bench(args)
    print(markdown_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0

