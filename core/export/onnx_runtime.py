"""Run a vitq ONNX file in ONNX Runtime (CPU) over a dataset, as ``core.evaluate`` runs a model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data import ImageDataset
from core.errors import CancelledError
from core.evaluate import EVAL_BATCH, accuracy, dataset_labels
from core.export.onnx_export import INPUT_NAME, ExportError

MATMULNBITS_ACCURACY = "1"
"""ORT fuses ``DequantizeLinear(uint4) → MatMul`` into ``MatMulNBits``, whose default accuracy level
(4) quantizes the activations to int8 blockwise on the fly: an extra, unrequested quantization
(0.14 logit difference on a test model). Level 1 computes in float32, exactly what the graph says."""


def session(path: str | Path, threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (default: as many as PyTorch
    uses, which the worker sets to the job's share of the CPUs; ORT's own default is every core it
    sees, spinning); ``optimize`` False runs the graph as written (no QDQ fusion)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", MATMULNBITS_ACCURACY)
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load {Path(path).name}: {exc}") from None


def predict_logits_onnx(
    path_or_session: Any, dataset: ImageDataset, should_stop: Callable[[], bool] | None = None,
    batch_size: int = EVAL_BATCH,
) -> torch.Tensor:
    """Logits for every image, in dataset order (float32, on the CPU)."""
    sess = session(path_or_session) if isinstance(path_or_session, str | Path) else path_or_session
    out = []
    for x, _ in dataset.batches(batch_size):
        if should_stop is not None and should_stop():
            raise CancelledError("cancelled during evaluation")
        (logits,) = sess.run(None, {INPUT_NAME: np.ascontiguousarray(x.float().numpy())})
        out.append(torch.from_numpy(logits))
    return torch.cat(out)


def evaluate_onnx(path: str | Path, dataset: ImageDataset, threads: int | None = None) -> dict[str, Any]:
    """``{"top1", "top5", "n"}`` of the ONNX file on ``dataset``, as ``core.evaluate`` reports a model."""
    labels = dataset_labels(dataset)
    return accuracy(predict_logits_onnx(session(path, threads), dataset), labels)
