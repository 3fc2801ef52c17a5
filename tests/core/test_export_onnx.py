"""ONNX export: ONNX Runtime computes what the fake-quantized PyTorch model computes, for every
quantizer kind, ViT and Swin, 2 to 8 bits; the file is valid, batch-dynamic, small and labelled."""

import hashlib
import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from core import QuantConfig, evaluate, load, load_dataset, quantize, run_quantization, save
from core.errors import InvalidConfigError
from core.export import export_onnx, read_onnx_metadata, session
from core.export.artifacts import write_exports
from core.models import build_model, resolve_model_spec
from core.quantizers import SULQ, Log2Quantizer, LogSqrt2Quantizer, SelectQuantizer
from core.wrap import quantizers, weight_layers
from tests.core.conftest import small_swin, small_vit
from vitq.cli import main as cli_main

CASES = [
    # kind, w_bits, a_bits, method, extra config
    ("vit", 4, 4, "isvit", {}),  # SULQ, uint4 weights, fake-quant subgraph
    ("vit", 8, 8, "isvit", {}),  # QDQ pairs, int8 weights (codes - 128)
    ("vit", 3, 3, "repq", {}),  # log-sqrt2
    ("vit", 2, 2, "ptq-uniform", {}),  # uniform post-Softmax, 2-bit codes
    ("vit", 6, 6, "isvit", {"softmax_quantizer": "log2"}),
    ("swin", 4, 4, "repq", {}),  # windows, shifts, relative-position bias
    ("swin-padded", 4, 4, "isvit", {}),  # windows padded with the folded image of zero after stage 2
]


def _images(kind: str, n: int, seed: int) -> torch.Tensor:
    size = 28 if kind == "vit" else 56
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-W{c[1]}A{c[2]}-{c[3]}{'-' if c[4] else ''}"
                f"{'-'.join(f'{k}={v}' for k, v in c[4].items())}")
def exported(request, tmp_path_factory):
    kind, w_bits, a_bits, method, extra = request.param
    model = {"vit": small_vit, "swin": lambda: small_swin(in_chans=1),
             "swin-padded": lambda: small_swin(window_size=4, in_chans=1)}[kind]()
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits, method=method, preset="smoke", iters=0, calib_size=16,
                         **extra)
    qmodel = quantize(model, config, _images(kind, 16, 0))
    path = export_onnx(qmodel.model, tmp_path_factory.mktemp("onnx") / "model.onnx", {"w_bits": w_bits})
    return kind, config, qmodel.model, path


def test_onnx_runtime_output_equals_the_fake_quant_model(exported):
    """Equal but for activations that land within an ulp of a rounding boundary, where
    QuantizeLinear's x/s (PyTorch: x·(1/s)) or Log(x)/ln 2 (PyTorch: log2) picks the next code;
    ``test_each_quantizer_computes_pytorchs_codes`` pins that down op by op."""
    kind, _, model, path = exported
    x = _images(kind, 8, 1)
    with torch.no_grad():
        ref = model(x)
    for optimize in (True, False):  # fused QDQ/int4 kernels, and the graph op for op
        (out,) = session(path, optimize=optimize).run(None, {"images": x.numpy()})
        diff = (torch.from_numpy(out) - ref).abs()
        assert float(diff.max()) <= 0.05 * float(ref.abs().max()), float(diff.max())
        assert float((diff <= 1e-5).float().mean()) >= 0.75


class _One(torch.nn.Module):
    def __init__(self, quantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x):
        return self.quantizer(x)


def _calibrated(quantizer, x):
    quantizer.calibrating = True
    quantizer(x)
    quantizer.calibrating, quantizer.enabled = False, True
    return quantizer


def _uniform_inputs(seed: int, scale: float) -> torch.Tensor:
    x = 2 * torch.randn(8, 50, 16, generator=torch.Generator().manual_seed(seed))
    ties = ((torch.arange(-64, 64, dtype=torch.float32) + 0.5) * scale).reshape(8, 16)  # x/s exactly k + 0.5
    x[:, 0, :] = ties
    x[0, 1, :4] = torch.tensor([0.0, -0.0, 1e6, -1e6])
    return x


def _softmax_inputs(seed: int) -> torch.Tensor:
    x = (3 * torch.randn(8, 50, 50, generator=torch.Generator().manual_seed(seed))).softmax(-1)
    x[0, 0, :20] = torch.exp2(-torch.arange(20, dtype=torch.float32))  # exact powers of two
    x[0, 1, :3] = torch.tensor([0.0, 1.0, 1e-30])
    return x


def _quantizer_cases():
    from core.quantizers import UniformQuantizer

    calib = 2 * torch.randn(8, 50, 16, generator=torch.Generator().manual_seed(3))
    soft = _softmax_inputs(4)
    off_grid = UniformQuantizer(4)
    off_grid.set_params(torch.tensor(0.37), torch.tensor(7.5))
    negative_zero = UniformQuantizer(8)
    negative_zero.set_params(torch.tensor(0.03), torch.tensor(-3.0))
    off_grid.enabled = negative_zero.enabled = True
    return [
        ("uniform-4", _calibrated(UniformQuantizer(4), calib), "exact"),
        ("uniform-2", _calibrated(UniformQuantizer(2), calib), "exact"),
        ("uniform-4-non-integer-zero", off_grid, "exact"),
        ("uniform-8-negative-zero", negative_zero, "exact"),
        ("uniform-4-per-channel", _calibrated(UniformQuantizer(4, channel_dim=-1), calib), "exact"),
        ("uniform-8-qdq", _calibrated(UniformQuantizer(8), calib), "one-step"),
        ("sulq-4", _calibrated(SULQ(4), soft), "log"),
        ("sulq-8", _calibrated(SULQ(8), soft), "log"),
        ("sulq-5-real-exponent", _calibrated(SULQ(5, integer_exponent=False), soft), "log"),
        ("log2-3", _calibrated(Log2Quantizer(3), soft), "log"),
        ("logsqrt2-4", _calibrated(LogSqrt2Quantizer(4), soft), "log"),
        ("logsqrt2-8", _calibrated(LogSqrt2Quantizer(8), soft), "log"),  # codes by QuantizeLinear
    ]


@pytest.mark.parametrize("case", _quantizer_cases(), ids=lambda c: c[0])
def test_each_quantizer_computes_pytorchs_codes(case, tmp_path):
    """Uniform fake-quant subgraphs are bit-exact, ties (half to even), saturation and zero included.
    QDQ divides where PyTorch multiplies by 1/s, and ONNX has no Log2: there a value within an ulp
    of a boundary may take the neighbouring code, never anything else."""
    name, quantizer, expectation = case
    x = _softmax_inputs(5) if expectation == "log" else _uniform_inputs(5, float(quantizer.scale.reshape(-1)[0]))
    with torch.no_grad():
        ref = quantizer(x)
    path = export_onnx(_One(quantizer), tmp_path / "q.onnx", input_shape=tuple(x.shape[1:]))
    (out,) = session(path).run(None, {"images": x.numpy()})
    out = torch.from_numpy(out)
    if expectation == "exact":
        assert torch.equal(out, ref), float((out - ref).abs().max())
        return
    differs = out != ref
    if expectation == "one-step":
        assert torch.allclose((out - ref)[differs].abs(), quantizer.scale.float(), rtol=1e-5)
        assert float(differs.float().mean()) <= 0.02  # the crafted ties are 1.6% of the values
    else:
        assert float(differs.float().mean()) <= 1e-3, float(differs.float().mean())


def test_full_checker_passes_and_the_batch_is_dynamic(exported):
    kind, _, model, path = exported
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = session(path)
    for n in (1, 3):
        (out,) = sess.run(None, {"images": _images(kind, n, 2).numpy()})
        assert out.shape == (n, 10)


def test_weights_are_integer_initializers_feeding_dequantize_linear(exported):
    _, config, model, path = exported
    proto = onnx.load(str(path))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {21}
    inits = {t.name: t for t in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == len(list(weight_layers(model)))
    # 5-8 bits: int8, the codes shifted by -128 (MLAS's fast u8 x s8 GEMM); 4 and below: packed uint4
    expected = TensorProto.UINT4 if config.w_bits <= 4 else TensorProto.INT8
    kinds = Counter(inits[n.input[0]].data_type for n in weight_dq)
    # a channel whose range misses 0 has a zero point outside the code range: int8/int16 hold it
    assert kinds[expected] >= len(weight_dq) - 1, kinds
    for node in weight_dq:
        codes = inits[node.input[0]]
        assert inits[node.input[2]].data_type == codes.data_type
        if codes.data_type == TensorProto.UINT4:  # packed two per byte, not a list of varints
            assert len(codes.raw_data) == (int(np.prod(codes.dims)) + 1) // 2
    float_matrices = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
                      and min(t.dims) > 16]
    assert not float_matrices, [t.name for t in float_matrices]


def test_activation_quantizers_are_qdq_at_8_bits_and_exact_subgraphs_below(exported):
    _, config, model, path = exported
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    acts = [q.chosen if isinstance(q, SelectQuantizer) else q for _, q in quantizers(model) if q.enabled]
    logs = [q for q in acts if isinstance(q, SULQ | Log2Quantizer | LogSqrt2Quantizer)]
    # every quantizer is one QuantizeLinear (QDQ) or one Round (fake-quant subgraph, log code)
    assert ops["QuantizeLinear"] + ops["Round"] == len(acts)
    assert ops["Log"] == len(logs) and "Log2" not in ops and "Exp" not in ops and "Pow" not in ops
    if config.a_bits == 8:
        assert ops["QuantizeLinear"] >= len(acts) - len(logs) - 2
    else:
        assert ops["QuantizeLinear"] == 0


def test_w8a8_runs_on_integer_kernels_in_onnx_runtime(tmp_path):
    import onnxruntime as ort

    qmodel = quantize(small_vit(), QuantConfig(w_bits=8, a_bits=8, method="ptq-uniform", preset="smoke",
                                               calib_size=16), _images("vit", 16, 0))
    path = export_onnx(qmodel.model, tmp_path / "model.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    integer = ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["DynamicQuantizeMatMul"]
    assert integer >= 4 * 2 + 1, ops  # qkv, proj, fc1, fc2 per block and the head, at least


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The bundled fmnist-vit-tiny at W4A4 RepQ-ViT (no reconstruction, the cheapest method here),
    saved as a checkpoint and exported through the CLI."""
    out = tmp_path_factory.mktemp("bundled")
    spec = resolve_model_spec("fmnist-vit-tiny")
    model = build_model(spec)
    calib = load_dataset("fashion-mnist:train:16", spec.preprocess).images(16)
    qmodel = quantize(model, QuantConfig(w_bits=4, a_bits=4, method="repq", preset="smoke", calib_size=16), calib)
    spec_public = {**spec.to_dict(), "checkpoint": None}
    save(qmodel, out / "checkpoint.safetensors", metadata={
        "model": spec_public, "method": "repq", "w_bits": 4, "a_bits": 4, "quant": {"top1": 0.5, "n": 7}})
    assert cli_main(["export", str(out / "checkpoint.safetensors"), "--format", "onnx",
                     "--out", str(out / "model.onnx")]) == 0
    fp32_bytes = sum(4 * p.numel() for p in model.parameters())
    return out, fp32_bytes


def test_w4a4_files_are_at_most_0_3_of_the_fp32_parameters(bundled):
    out, fp32_bytes = bundled
    onnx_bytes = (out / "model.onnx").stat().st_size
    checkpoint_bytes = (out / "checkpoint.safetensors").stat().st_size
    assert onnx_bytes <= 0.3 * fp32_bytes and checkpoint_bytes <= 0.3 * fp32_bytes, (
        onnx_bytes, checkpoint_bytes, fp32_bytes)


def test_onnx_metadata_carries_bits_method_preprocess_and_top1(bundled):
    out, _ = bundled
    meta = read_onnx_metadata(out / "model.onnx")
    assert meta["w_bits"] == 4 and meta["a_bits"] == 4 and meta["method"] == "repq" and meta["top1"] == 0.5
    assert meta["preprocess"]["mean"] == [0.286] and meta["model"]["timm_name"] == "vit_tiny_patch16_224"
    props = {p.key for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert {"vitq.w_bits", "vitq.method", "vitq.preprocess", "vitq.top1"} <= props


def test_cli_evaluate_on_the_onnx_file_matches_the_checkpoint(bundled, capsys):
    out, _ = bundled
    data = "fashion-mnist:test:256"
    capsys.readouterr()
    assert cli_main(["evaluate", str(out / "model.onnx"), "--data", data]) == 0
    onnx_metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    spec = resolve_model_spec("fmnist-vit-tiny")
    torch_metrics = evaluate(load(out / "checkpoint.safetensors"), load_dataset(data, spec.preprocess))
    assert onnx_metrics["n"] == torch_metrics["n"] == 256
    assert abs(onnx_metrics["top1"] - torch_metrics["top1"]) <= 1 / 256
    assert np.isclose(onnx_metrics["top5"], torch_metrics["top5"], atol=1 / 256)


def test_cli_refuses_an_onnx_file_without_vitq_metadata(tmp_path, capsys):
    path = tmp_path / "plain.onnx"
    path.write_bytes(b"not onnx")
    assert cli_main(["evaluate", str(path), "--data", "fashion-mnist:test:8"]) == 2
    assert "not a readable ONNX file" in capsys.readouterr().err


TINY_SPEC = {"timm_name": "vit_tiny_patch16_224", "weights": "random",
             "timm_kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 1},
             "preprocess": {"mean": [0.286], "std": [0.353]}}
TINY_CONFIG = QuantConfig(w_bits=4, a_bits=4, method="ptq-uniform", preset="smoke", calib_size=16)


@pytest.fixture(scope="module")
def calib_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8))
    return str(path)


def test_a_run_writes_model_onnx_and_reports_its_digest_and_the_sizes(tmp_path, calib_npz):
    report = run_quantization(TINY_SPEC, TINY_CONFIG, calib_npz, None, tmp_path)
    entry = report["exports"]["onnx"]
    data = (tmp_path / "model.onnx").read_bytes()
    assert entry["file"] == "model.onnx" and entry["bytes"] == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    sizes = report["sizes"]
    assert sizes["onnx_bytes"] == len(data)
    assert sizes["checkpoint_bytes"] == (tmp_path / "checkpoint.safetensors").stat().st_size
    assert sizes["checkpoint_bytes"] < 0.3 * sizes["fp32_parameters_bytes"]
    assert json.loads((tmp_path / "report.json").read_text())["exports"] == report["exports"]
    assert read_onnx_metadata(tmp_path / "model.onnx")["method"] == "ptq-uniform"


def test_exports_can_be_turned_off(tmp_path, calib_npz):
    off = run_quantization(TINY_SPEC, TINY_CONFIG, calib_npz, None, tmp_path, exports=[])
    assert off["exports"] == {} and off["sizes"]["onnx_bytes"] is None
    assert (tmp_path / "checkpoint.safetensors").is_file() and not (tmp_path / "model.onnx").exists()


def test_a_failed_export_is_recorded_not_raised_and_leaves_no_file(tmp_path):
    results = write_exports(torch.nn.Linear(2, 2), tmp_path, ["onnx"], {"w_bits": 4})
    assert results == {"onnx": {"error": "ExportError: cannot tell the model's input size (no patch_embed.img_size)"}}
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_export_format_is_refused_before_any_work(tmp_path, calib_npz):
    with pytest.raises(InvalidConfigError, match="unknown export format 'tflite'"):
        run_quantization(TINY_SPEC, TINY_CONFIG, calib_npz, None, tmp_path, exports=["tflite"])
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_a_4_bit_channel_entirely_below_zero_keeps_its_zero_point_in_uint8(tmp_path):
    """Its zero point (> 15) does not fit in uint4: that layer stays uint8 rather than wrap."""
    qmodel = quantize(small_vit(), QuantConfig(w_bits=4, a_bits=8, method="ptq-uniform", preset="smoke",
                                               calib_size=8), _images("vit", 8, 0))
    head = qmodel.model.head
    with torch.no_grad():
        head.weight[0] = -head.weight[0].abs() - 0.05
        head.weight_quantizer.calibrate(head.weight)
    assert float(head.weight_quantizer.zero_point.max()) > 15
    path = export_onnx(qmodel.model, tmp_path / "model.onnx")
    inits = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}
    assert inits["head.weight.codes"] == inits["head.weight.zero_point"] == TensorProto.UINT8
    assert inits["blocks.0.mlp.fc1.weight.codes"] == TensorProto.UINT4
    x = _images("vit", 3, 1)
    with torch.no_grad():
        ref = qmodel.model(x)
    (out,) = session(path, optimize=False).run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-5, rtol=1e-5)
