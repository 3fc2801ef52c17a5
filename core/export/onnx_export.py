"""The fake-quantized model as an ONNX file that ONNX Runtime (or TensorRT) can run.

``torch.onnx.export`` (the TorchScript exporter: no network, no onnxscript) traces a copy of the
model in which every fake-quant module is replaced by its export module (``graph_modules``). The
graph is then rewritten where PyTorch has no matching type: weight codes of 4 bits and fewer become
``uint4`` initializers (two codes per byte in the file), so a W4 model's file is about an eighth
of its FP32 size plus the float LayerNorm/bias/embedding tensors. The opset is 21, the first with
4-bit types in ``DequantizeLinear``. The graph input (``images``, N×C×H×W, preprocessed as the
metadata says) has a dynamic batch dimension; the output is ``logits``.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from core.atomic_file import atomic_file
from core.errors import VitqError
from core.export.graph_modules import to_export_modules

OPSET = 21
"""ONNX opset: 21 adds int4/uint4 to QuantizeLinear/DequantizeLinear."""
TRACE_OPSET = 20
"""The opset the graph is traced at. Every op it uses is unchanged from 20 to 21 (21 adds 4-bit and
other types to QuantizeLinear, DequantizeLinear, Cast, Reshape, …), so after the 4-bit rewrite the
file is declared opset 21 and the full checker verifies it as such."""
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_PREFIX = "vitq."


class ExportError(VitqError):
    code = "export_failed"


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    channels = getattr(proj, "in_channels", None) or getattr(getattr(proj, "weight", None), "shape", [0, 0])[1]
    if size is None or not channels:
        raise ExportError("cannot tell the model's input size (no patch_embed.img_size)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(channels), int(h), int(w)


def _as_uint4(tensor: TensorProto) -> TensorProto:
    """The same values as uint4, in ``raw_data``: two per byte, low nibble first (a value list would be
    stored as varints, about 1.5 bytes per pair)."""
    array = numpy_helper.to_array(tensor)
    return numpy_helper.from_array(array.astype(ml_dtypes.uint4), tensor.name)


def _pack_weights_4bit(graph: onnx.GraphProto, names: set[str]) -> int:
    """Rewrite the uint8 codes and zero points of ≤4-bit weights (``names``: code initializers) as uint4."""
    inits = {t.name: i for i, t in enumerate(graph.initializer)}
    converted = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in names:
            continue
        for name in (node.input[0], node.input[2]):
            index = inits.get(name)
            if index is None:
                raise ExportError(f"DequantizeLinear input {name} is not an initializer")
            tensor = graph.initializer[index]
            if tensor.data_type == TensorProto.UINT8:
                graph.initializer[index].CopyFrom(_as_uint4(tensor))
        converted += 1
    return converted


def export_onnx(
    model: nn.Module,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    opset: int = OPSET,
    input_shape: tuple[int, ...] | None = None,
) -> Path:
    """Write ``model`` (a fake-quantized ViT/DeiT/Swin from ``quantize`` or ``load``) to ``path``.

    ``metadata`` values go to ``metadata_props`` as ``vitq.<key>`` (strings as they are, everything
    else as JSON). The file is checked with ``onnx.checker`` (full check) before it is written, and
    written atomically. ``input_shape`` (without the batch) defaults to the model's patch embedding's.
    """
    if opset < OPSET:
        raise ExportError(f"opset {opset} has no 4-bit types; use {OPSET} or later")
    path = Path(path)
    export_model = to_export_modules(copy.deepcopy(model).cpu().float().eval())
    four_bit = {
        f"{name}.codes" for name, module in export_model.named_modules()
        if hasattr(module, "codes") and getattr(module, "bits", 8) <= 4 and module.codes.dtype == torch.uint8
        and int(module.zero_point.max()) <= 15  # a channel entirely below 0 has z > 2^b - 1: it stays uint8
    }
    dummy = torch.zeros(2, *(input_shape or _input_shape(model)))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            export_model, (dummy,), buffer, dynamo=False, opset_version=TRACE_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    converted = _pack_weights_4bit(proto.graph, four_bit)
    if converted != len(four_bit):
        raise ExportError(f"found {converted} of {len(four_bit)} 4-bit weights in the exported graph")
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    proto.producer_name = "vitq"
    props = {METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_file(path, ".onnx") as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return path


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """vitq's ``metadata_props`` of an ONNX file, JSON values decoded (the weights are not read)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...
        raise ExportError(f"{Path(path).name} is not a readable ONNX file: {exc}") from None
    out: dict[str, Any] = {}
    for prop in proto.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            key = prop.key[len(METADATA_PREFIX):]
            try:
                out[key] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[key] = prop.value
    return out


def onnx_metadata(header: dict[str, Any]) -> dict[str, Any]:
    """The ``metadata_props`` for a model described by a checkpoint header (or the same fields from a
    run): bits, method, model spec, preprocessing and the reported accuracy."""
    model = header.get("model") or {}
    quant, fp = header.get("quant") or {}, header.get("fp") or {}
    return {
        "format": "vitq-onnx", "format_version": 1,
        "w_bits": header.get("w_bits"), "a_bits": header.get("a_bits"), "method": header.get("method"),
        "per_unit_bits": (header.get("config") or {}).get("per_unit_bits"),
        "model": model, "preprocess": model.get("preprocess"),
        "top1": quant.get("top1"), "top5": quant.get("top5"), "fp_top1": fp.get("top1"), "n": quant.get("n"),
        "config": header.get("config"), "calibration_sha256": header.get("calibration_sha256"),
    }


def export_checkpoint(checkpoint: str | Path, path: str | Path) -> Path:
    """``export_onnx`` of a vitq checkpoint, with the checkpoint's header as metadata."""
    from core.checkpoint import load, read_checkpoint_metadata

    header = read_checkpoint_metadata(checkpoint)
    return export_onnx(load(checkpoint), path, onnx_metadata(header))
