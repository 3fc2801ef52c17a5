"""The deployable files a quantization run writes beside its checkpoint, and the sizes it reports.

An export that fails is recorded (``{"error": …}``) and fails nothing else: the checkpoint and the
report are the run's result, a deployable file is an extra.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from core.errors import InvalidConfigError
from core.file_hash import sha256_file

EXPORT_FILES = {"onnx": "model.onnx"}
"""Export format → the file name it gets in the run's directory."""
DEFAULT_EXPORTS = ("onnx",)


def check_exports(exports: Iterable[str]) -> tuple[str, ...]:
    """The requested formats, de-duplicated in order; an unknown one is a config error, raised early."""
    formats = tuple(dict.fromkeys(exports))
    unknown = [f for f in formats if f not in EXPORT_FILES]
    if unknown:
        raise InvalidConfigError(f"unknown export format {unknown[0]!r}; known: {', '.join(EXPORT_FILES)}")
    return formats


def fp32_parameter_bytes(model: nn.Module) -> int:
    """What the model's parameters take as float32: the size a 4-bit file is compared with."""
    return sum(4 * p.numel() for p in model.parameters())


def write_exports(model: nn.Module, out_dir: str | Path, exports: Iterable[str], report: dict[str, Any],
                  calibration_sha256: str | None = None) -> dict[str, dict[str, Any]]:
    """Write each requested export of the fake-quantized ``model`` into ``out_dir``.

    Returns ``{format: {"file", "bytes", "sha256", "seconds"}}``, or ``{format: {"error": why}}``
    for one that failed (its partial file removed). ``report`` supplies the ONNX metadata.
    """
    results: dict[str, dict[str, Any]] = {}
    for fmt in check_exports(exports):
        path = Path(out_dir) / EXPORT_FILES[fmt]
        started = time.perf_counter()
        try:
            from core.export.onnx_export import export_onnx, onnx_metadata

            export_onnx(model, path, onnx_metadata({**report, "calibration_sha256": calibration_sha256}))
        except Exception as exc:  # noqa: BLE001 - any failure of an optional artifact is recorded, not raised
            path.unlink(missing_ok=True)
            results[fmt] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            continue
        results[fmt] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                        "seconds": round(time.perf_counter() - started, 3)}
    return results
