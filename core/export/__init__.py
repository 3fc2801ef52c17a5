"""Deployable forms of a quantized model: an ONNX file (QDQ, 4-bit weights as uint4) and running it.

``export_onnx(model, path, metadata)`` writes the file; ``evaluate_onnx(path, dataset)`` runs it in
ONNX Runtime on the CPU; ``read_onnx_metadata(path)`` reads vitq's ``metadata_props``.
"""

from core.export.onnx_export import (
    OPSET,
    ExportError,
    export_checkpoint,
    export_onnx,
    onnx_metadata,
    read_onnx_metadata,
)
from core.export.onnx_runtime import evaluate_onnx, predict_logits_onnx, session

__all__ = [
    "OPSET",
    "ExportError",
    "export_onnx",
    "export_checkpoint",
    "onnx_metadata",
    "read_onnx_metadata",
    "evaluate_onnx",
    "predict_logits_onnx",
    "session",
]
