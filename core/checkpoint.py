"""The quantized checkpoint: one safetensors file plus a JSON metadata header.

Weights are stored as integer codes with their per-channel scale and zero point: below 8 bits the
b-bit codes are bit-packed (``core.bitpack``: b bits per weight, two 4-bit codes per byte), at 8 bits
one uint8 per weight with the weight's shape. Every activation quantizer's parameters, the
reparameterized LayerNorm/Linear parameters and everything else the model holds are stored as float
tensors. Format version 1 (every width unpacked, uint8 with the weight's shape) still loads.
``load`` rebuilds the architecture from the header, wraps it exactly as ``quantize`` did, and
restores every tensor, so it predicts exactly what the model behind the report predicted.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

import safetensors
import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from core.atomic_file import atomic_file
from core.bitpack import pack_codes, unpack_codes
from core.config import QuantConfig
from core.errors import CheckpointError, VitqError
from core.finite_json import finite_json
from core.models import create_architecture, make_spec
from core.quantize import QuantizedModel
from core.quantizers import ActQuantizer, UniformQuantizer
from core.wrap import weight_layers, wrap_model

FORMAT = "vitq-checkpoint"
FORMAT_VERSION = 2
"""2: codes below 8 bits bit-packed (1-D uint8). 1: every code one uint8, with the weight's shape."""
READABLE_VERSIONS = (1, 2)
CODE_PACKING = "bitpack-lsb"
_CODES = ".weight_codes"


def stored_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The tensor a version-2 checkpoint stores for a weight's integer codes."""
    if bits < 8:
        return pack_codes(codes, bits)
    return codes.to(torch.uint8).cpu().contiguous()


def weight_codes(stored: torch.Tensor, bits: int, shape: torch.Size, format_version: int) -> torch.Tensor:
    """The uint8 codes (with the weight's ``shape``) from what a checkpoint of ``format_version`` stores."""
    if format_version >= 2 and bits < 8:
        return unpack_codes(stored, bits, shape)
    if tuple(stored.shape) != tuple(shape):
        raise ValueError(f"codes have shape {tuple(stored.shape)}, the weight {tuple(shape)}")
    return stored


def library_versions() -> dict[str, str]:
    try:
        vitq_version = importlib.metadata.version("vitq")
    except importlib.metadata.PackageNotFoundError:
        vitq_version = "unknown"
    return {"vitq": vitq_version, "torch": torch.__version__, "timm": timm.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def save(qmodel: QuantizedModel, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``qmodel`` to ``path`` atomically (temporary name, fsync, rename)."""
    path = Path(path)
    model = qmodel.model
    tensors: dict[str, torch.Tensor] = {}
    weight_names = set()
    for name, layer in weight_layers(model):
        wq = layer.weight_quantizer
        if not bool(wq.initialized):
            raise CheckpointError(f"{name}: weight quantizer was never initialised")
        tensors[name + _CODES] = stored_codes(wq.codes(layer.weight.detach()).to(torch.uint8), wq.bits)
        weight_names.add(name + ".weight")
    for key, value in model.state_dict().items():
        if key not in weight_names:
            tensors[key] = value.detach().cpu().clone().contiguous()
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "code_packing": CODE_PACKING,
              "config": qmodel.config.to_dict(),
              "versions": library_versions(), **(metadata or {})}
    with atomic_file(path, ".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"vitq": json.dumps(finite_json(header), allow_nan=False)})
    return path


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("vitq")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{Path(path).name} is not a readable safetensors file: {exc}") from None
    if raw is None:
        raise CheckpointError(f"{Path(path).name} is not a vitq checkpoint (no 'vitq' metadata)")
    header = json.loads(raw)
    if header.get("format") != FORMAT or header.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"unsupported checkpoint format {header.get('format')} v{header.get('format_version')}")
    return header


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    elif attr == "bias" and hasattr(module, "bias"):
        module.bias = nn.Parameter(value, requires_grad=False)  # stage 2 gave a bias-free Linear one
    else:
        raise CheckpointError(f"checkpoint tensor {key} has no place in the model")


def load(path: str | Path) -> nn.Module:
    """Rebuild the fake-quantized model from a vitq checkpoint (on the CPU, in eval mode)."""
    header = read_checkpoint_metadata(path)
    try:
        config = QuantConfig.from_dict(header["config"])
        spec = make_spec({**header["model"], "checkpoint": None})
        tensors = load_file(str(path))
    except VitqError as exc:
        raise CheckpointError(f"checkpoint header is invalid: {exc.message}") from None
    except (KeyError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint is incomplete or corrupt: {exc}") from None
    model = wrap_model(create_architecture(spec), config)
    expected = set(model.state_dict())
    layers = dict(weight_layers(model))
    for name in layers:
        expected.discard(name + ".weight")
        expected.add(name + _CODES)
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    # A Linear built without bias gains one in stage 2; that key is legitimately extra.
    unexpected = {k for k in unexpected if not (k.endswith(".bias") and k.rpartition(".")[0] in layers)}
    # Swin checkpoints written before the window pad value existed padded with zeros: the default.
    missing = {k for k in missing if not k.endswith(".attn.pad_value")}
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match {spec.timm_name}: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            if key.endswith(_CODES):
                name = key[: -len(_CODES)]
                layer = layers[name]
                try:
                    codes = weight_codes(value, layer.weight_quantizer.bits, layer.weight.shape,
                                         header["format_version"])
                except ValueError as exc:
                    raise CheckpointError(f"{key}: {exc}") from None
                scale = tensors[name + ".weight_quantizer.scale"]
                zero = tensors[name + ".weight_quantizer.zero_point"]
                _set_tensor(model, name + ".weight", scale * (codes.float() - zero))
            else:
                _set_tensor(model, key, value)
    for _, module in model.named_modules():
        if isinstance(module, ActQuantizer):
            module.enabled = True
            if isinstance(module, UniformQuantizer) and module.channel_dim == -1 and module.scale.numel() == 1:
                module.channel_dim = None
    return model.eval()
