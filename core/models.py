"""Model specs: what a user names (a built-in id, a timm name + kwargs, or a spec JSON file),
resolved to one ``ModelSpec`` and built into a float timm model with its weights loaded."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from core.errors import ModelSpecError

BUILTIN_DIR = Path(__file__).parent / "builtin_models"
SUPPORTED_FAMILIES = ("vit_", "deit_", "deit3_", "swin_")
FORBIDDEN_KWARGS = {"pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "device"}
MAX_PARAMETERS = 1_000_000_000


@dataclass(frozen=True)
class Preprocess:
    """How raw images become model input: resize to ``input_size``, then ``(x/255 - mean)/std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "input_size": list(self.input_size),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}

    @classmethod
    def from_dict(cls, data: dict[str, Any], default: Preprocess) -> Preprocess:
        if not isinstance(data, dict):
            raise ModelSpecError("preprocess must be an object")
        unknown = set(data) - {"mean", "std", "input_size", "interpolation", "crop_pct", "scale"}
        if unknown:
            raise ModelSpecError(f"unknown preprocess field(s): {', '.join(sorted(unknown))}")
        try:
            input_size = tuple(int(v) for v in data.get("input_size", default.input_size))
            mean = tuple(float(v) for v in data.get("mean", default.mean))
            std = tuple(float(v) for v in data.get("std", default.std))
            crop_pct = float(data.get("crop_pct", default.crop_pct))
        except (TypeError, ValueError):
            raise ModelSpecError("preprocess mean/std/input_size/crop_pct must be numbers") from None
        interpolation = data.get("interpolation", default.interpolation)
        if len(input_size) != 3 or not all(0 < v <= 4096 for v in input_size):
            raise ModelSpecError("preprocess.input_size must be [channels, height, width]")
        channels = input_size[0]
        if len(mean) == 1 and channels > 1:
            mean = mean * channels
        if len(std) == 1 and channels > 1:
            std = std * channels
        if len(mean) != channels or len(std) != channels:
            raise ModelSpecError(f"preprocess mean/std need {channels} values for {channels} input channels")
        if any(s <= 0 or not math.isfinite(s) for s in std) or not all(math.isfinite(m) for m in mean):
            raise ModelSpecError("preprocess std must be positive and mean finite")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ModelSpecError("preprocess.interpolation must be bilinear, bicubic or nearest")
        if not 0 < crop_pct <= 1:
            raise ModelSpecError("preprocess.crop_pct must be in (0, 1]")
        return cls(mean, std, input_size, interpolation, crop_pct)


@dataclass(frozen=True)
class ModelSpec:
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    preprocess: Preprocess | None = None
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "timm_name": self.timm_name, "timm_kwargs": dict(self.timm_kwargs),
                "checkpoint": self.checkpoint, "preprocess": self.preprocess.to_dict() if self.preprocess else None}


def _default_preprocess(timm_name: str, kwargs: dict[str, Any]) -> Preprocess:
    cfg = timm.models.get_pretrained_cfg(timm_name)
    cfg = cfg.to_dict() if cfg is not None else {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    _, h, w = cfg.get("input_size", (3, 224, 224))
    img_size = kwargs.get("img_size")
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    channels = int(kwargs.get("in_chans", 3))
    if channels != len(mean):
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return Preprocess(mean, std, (channels, int(h), int(w)), cfg.get("interpolation", "bicubic"),
                      float(cfg.get("crop_pct", 1.0) or 1.0))


@functools.cache
def _timm_model_names() -> frozenset[str]:
    """timm's registry, read once: ``list_models`` sorts every name on each call (about 5 ms per job submit)."""
    return frozenset(timm.list_models())


def make_spec(data: dict[str, Any], base_dir: Path | None = None, spec_id: str | None = None) -> ModelSpec:
    """Validate a spec dict ``{"timm_name", "timm_kwargs", "checkpoint", "preprocess"}``."""
    if not isinstance(data, dict):
        raise ModelSpecError("a model spec must be an object with timm_name")
    unknown = set(data) - {"id", "timm_name", "timm_kwargs", "checkpoint", "preprocess", "checkpoint_sha256",
                           "checkpoint_dtype", "parameters", "classes", "data", "fp_top1_test", "training"}
    if unknown:
        raise ModelSpecError(f"unknown model spec field(s): {', '.join(sorted(unknown))}")
    name = data.get("timm_name")
    if not isinstance(name, str) or not name:
        raise ModelSpecError("model spec needs a timm_name string")
    if not name.startswith(SUPPORTED_FAMILIES) or name not in _timm_model_names():
        raise ModelSpecError(
            f"unknown or unsupported timm model {name!r}: vitq accepts timm ViT, DeiT and Swin names "
            "(vit_*, deit_*, deit3_*, swin_*)"
        )
    kwargs = data.get("timm_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ModelSpecError("timm_kwargs must be an object")
    forbidden = sorted(FORBIDDEN_KWARGS & set(kwargs))
    if forbidden:
        raise ModelSpecError(f"timm_kwargs may not set {', '.join(forbidden)}; give weights as 'checkpoint'")
    checkpoint = data.get("checkpoint")
    if checkpoint is not None:
        if not isinstance(checkpoint, str):
            raise ModelSpecError("checkpoint must be a file path")
        path = Path(checkpoint)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        checkpoint = str(path)
    default = _default_preprocess(name, kwargs)
    preprocess = Preprocess.from_dict(data["preprocess"], default) if data.get("preprocess") else default
    return ModelSpec(name, dict(kwargs), checkpoint, preprocess, spec_id or data.get("id"))


def _builtin_specs() -> dict[str, ModelSpec]:
    specs = {}
    for path in sorted(BUILTIN_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        specs[data["id"]] = make_spec(data, base_dir=BUILTIN_DIR, spec_id=data["id"])
    return specs


def list_builtin_models() -> list[dict[str, Any]]:
    out = []
    for path in sorted(BUILTIN_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        spec = make_spec(data, base_dir=BUILTIN_DIR, spec_id=data["id"])
        out.append({**spec.to_dict(), "checkpoint": None, "builtin": True, "fp_top1": data.get("fp_top1_test"),
                    "classes": data.get("classes")})
    return out


def resolve_model_spec(value: str | dict[str, Any] | ModelSpec) -> ModelSpec:
    """A built-in id, a path to a spec JSON file, a spec dict, or a ModelSpec."""
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, dict):
        return make_spec(value)
    if not isinstance(value, str) or not value:
        raise ModelSpecError("model must be a built-in id, a spec JSON path, or a spec object")
    builtins = _builtin_specs()
    if value in builtins:
        return builtins[value]
    path = Path(value)
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelSpecError(f"cannot read model spec {value}: {exc}") from None
        return make_spec(data, base_dir=path.parent)
    if not path.suffix:
        return make_spec({"timm_name": value})
    raise ModelSpecError(f"unknown model {value!r}: not a built-in ({', '.join(builtins)}), spec file, or timm name")


SAFETENSORS_MAX_HEADER_BYTES = 1 << 27
"""The largest safetensors JSON header accepted (128 MiB); a longer length field means not safetensors."""
PTH_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")
"""Keys a ``.pth`` file nests its state dict under (training loops, DDP); unwrapped in this order."""


def looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return (
        len(head) == 9
        and 2 <= int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER_BYTES
        and head[8:9] == b"{"
    )


def unwrap_state_dict(obj: Any) -> Any:
    """The state dict inside a loaded ``.pth`` object, through any of ``PTH_STATE_DICT_KEYS``."""
    for key in PTH_STATE_DICT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelSpecError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors" or looks_like_safetensors(path):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelSpecError(f"checkpoint {path.name} is not a readable safetensors file: {exc}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ModelSpecError(
            f"checkpoint {path.name} was refused: only tensors can be loaded from .pth files "
            f"(weights_only=True); {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    state = unwrap_state_dict(state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"checkpoint {path.name} does not hold a state dict of tensors")
    return state


def create_architecture(spec: ModelSpec) -> nn.Module:
    """The timm model with random weights; rejects absurd sizes before allocating them."""
    kwargs = dict(spec.timm_kwargs)
    pretrained = bool(kwargs.pop("pretrained", False))
    try:
        with torch.device("meta"):
            meta = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        count = sum(p.numel() for p in meta.parameters())
        if count > MAX_PARAMETERS:
            raise ModelSpecError(f"model has {count} parameters; the limit is {MAX_PARAMETERS}")
        model = timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)
    except ModelSpecError:
        raise
    except Exception as exc:
        if pretrained:
            raise ModelSpecError(
                f"pretrained weights for {spec.timm_name} could not be fetched ({type(exc).__name__}); "
                "without the model hub, upload the weights as a safetensors checkpoint and set pretrained=false"
            ) from None
        raise ModelSpecError(f"timm could not build {spec.timm_name} with {kwargs}: {exc}") from None
    return model.eval()


def build_model(spec: ModelSpec) -> nn.Module:
    """The float model with the spec's weights (random weights when the spec has none)."""
    model = create_architecture(spec)
    if spec.checkpoint is not None:
        load_weights(model, _read_state_dict(Path(spec.checkpoint)))
    return model


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {', '.join(unexpected[:3])}")
        if mismatched:
            parts.append(f"shape mismatch: {'; '.join(mismatched[:3])}")
        raise ModelSpecError("weights do not fit the model: " + "; ".join(parts))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelSpecError(f"weights hold NaN or infinite values, e.g. in {bad[0]}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
