"""vitq core: I&S-ViT post-training quantization for timm Vision Transformers.

No web, database or Celery imports here: ``api`` and ``worker`` use core, never the reverse.

Top-level API
    QuantConfig, quantize, evaluate, save, load, run_quantization, TargetSpec, run_target_search
Model and data building blocks
    ModelSpec, resolve_model_spec, build_model, list_builtin_models, load_dataset, inspect_dataset
Errors
    VitqError and subclasses (core.errors)
"""

from core.checkpoint import load, read_checkpoint_metadata, save
from core.config import Method, Preset, QuantConfig, SoftmaxQuantizer
from core.data import ImageDataset, inspect_dataset, load_dataset
from core.errors import (
    CancelledError,
    CheckpointError,
    DatasetError,
    InvalidConfigError,
    ModelSpecError,
    VitqError,
)
from core.evaluate import evaluate
from core.models import ModelSpec, build_model, list_builtin_models, resolve_model_spec
from core.pipeline import run_quantization
from core.quantize import QuantizedModel, quantize
from core.target_search import TargetSpec, run_target_search

__all__ = [
    # top-level API
    "QuantConfig",
    "quantize",
    "evaluate",
    "save",
    "load",
    "run_quantization",
    "run_target_search",
    "TargetSpec",
    "read_checkpoint_metadata",
    "QuantizedModel",
    # building blocks
    "Method",
    "Preset",
    "SoftmaxQuantizer",
    "ModelSpec",
    "resolve_model_spec",
    "build_model",
    "list_builtin_models",
    "ImageDataset",
    "load_dataset",
    "inspect_dataset",
    # errors
    "VitqError",
    "InvalidConfigError",
    "ModelSpecError",
    "DatasetError",
    "CheckpointError",
    "CancelledError",
]
