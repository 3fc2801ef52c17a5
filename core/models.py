"""Model specs: what a user names (a built-in id, a timm name + kwargs, or a spec JSON file),
resolved to one ``ModelSpec`` and built into a float timm model with its weights loaded."""

from __future__ import annotations

import functools
import json
import math
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from core.errors import CheckpointError, ModelSpecError
from core.hub_weights import FetchedWeights, HubPolicy, fetch_weights, hub_config, unavailable
from core.model_ids import SUPPORTED_FAMILIES, HubRef, parse_model_id
from core.timm_kwargs import check_kwarg_bounds, check_kwarg_types

BUILTIN_DIR = Path(__file__).parent / "builtin_models"
FORBIDDEN_KWARGS = {"pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "device",
                    "pretrained_model_args"}
WEIGHTS_CHOICES = ("pretrained", "random")
"""``weights`` of a model spec: ``pretrained`` (the default for a timm or hub id) or ``random`` (asked for,
e.g. for timing runs). A spec with a checkpoint takes its weights from it."""
PRETRAINED_KWARG_REFUSED = (
    "timm_kwargs.pretrained is not taken: a timm name or hub id means its pretrained weights "
    "(deit_small_patch16_224.fb_in1k, hf-hub:org/repo), fetched under the operator's hub policy; "
    'say "weights": "random" for random weights'
)
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
    """What timm builds: an architecture, with a pretrained tag when the id named one."""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    preprocess: Preprocess | None = None
    id: str | None = None
    weights: str | None = None
    """``random`` when random weights were asked for; otherwise ``None`` (checkpoint or pretrained)."""
    hub: HubRef | None = None
    """Where the pretrained weights are, when they come from the Hub (no checkpoint, not random)."""
    model_id: str | None = None
    """The id as the user wrote it (``hf-hub:org/repo@rev``, ``deit_small_patch16_224.fb_in1k``)."""
    fetched: FetchedWeights | None = field(default=None, compare=False)
    """The hub weights once in the local cache (``with_hub_weights``)."""

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "timm_name": self.timm_name, "timm_kwargs": dict(self.timm_kwargs),
               "checkpoint": self.checkpoint, "preprocess": self.preprocess.to_dict() if self.preprocess else None}
        if self.weights is not None:
            out["weights"] = self.weights
        if self.hub is not None:
            out["hub"] = self.hub.to_dict()
        if self.model_id is not None:
            out["model_id"] = self.model_id
        if self.fetched is not None:
            out["weights_source"] = self.fetched.provenance()
        return out

    @property
    def weights_kind(self) -> str:
        """``checkpoint``, ``hub``, ``random`` or ``none`` (a timm architecture with no weights at all)."""
        if self.checkpoint is not None:
            return "checkpoint"
        if self.weights == "random":
            return "random"
        return "hub" if self.hub is not None else "none"


def no_weights_error(spec: ModelSpec) -> ModelSpecError:
    """A timm architecture with neither pretrained weights nor a checkpoint: say how to supply them."""
    return ModelSpecError(
        f"{spec.model_id or spec.timm_name} has no weights: timm has no pretrained weights on the Hub for it "
        "and no checkpoint was given. Name a pretrained tag or hub repository (timm-name.tag, hf-hub:org/repo), "
        "upload a checkpoint (POST /v1/models, `vitq models upload`) or give a spec with \"checkpoint\", "
        'or ask for random weights with "weights": "random"'
    )


def _default_preprocess(timm_name: str, kwargs: dict[str, Any], cfg: dict[str, Any] | None = None) -> Preprocess:
    if cfg is None:
        registered = timm.models.get_pretrained_cfg(timm_name)
        cfg = registered.to_dict() if registered is not None else {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    cfg_channels, h, w = cfg.get("input_size", (3, 224, 224))
    img_size = kwargs.get("img_size")
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    channels = int(kwargs.get("in_chans", cfg_channels))
    if channels != len(mean):
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return Preprocess(mean, std, (channels, int(h), int(w)), cfg.get("interpolation", "bicubic"),
                      float(cfg.get("crop_pct", 1.0) or 1.0))


@functools.cache
def _timm_model_names() -> frozenset[str]:
    """timm's registry, read once: ``list_models`` sorts every name on each call (about 5 ms per job submit)."""
    return frozenset(timm.list_models())


def _hub_architecture(config: dict[str, Any], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], Preprocess]:
    """A timm-format repository's ``config.json`` as what vitq builds: the architecture, its saved
    ``model_args`` (with the checkpoint's ``num_classes``) under the user's kwargs, and the repository's
    pretrained preprocessing."""
    name = config["architecture"]
    base = name.split(".", 1)[0]
    if not base.startswith(SUPPORTED_FAMILIES) or base not in _timm_model_names():
        raise ModelSpecError(
            f"the repository's architecture {name[:100]!r} is not a timm ViT, DeiT or Swin "
            "(vit_*, deit_*, deit3_*, swin_*)"
        )
    pretrained_cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    model_args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    merged = dict(model_args)
    classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
    if isinstance(classes, int) and not isinstance(classes, bool):
        merged.setdefault("num_classes", classes)
    merged.update(kwargs)
    check_kwarg_bounds(merged)
    return name, merged, _default_preprocess(name, merged, dict(pretrained_cfg))


def make_spec(data: dict[str, Any], base_dir: Path | None = None, spec_id: str | None = None,
              hub_policy: HubPolicy | None = None) -> ModelSpec:
    """Validate a spec dict ``{"timm_name", "timm_kwargs", "checkpoint", "preprocess", "weights"}``.

    ``timm_name`` takes every model id form but a built-in id: a timm name (with a pretrained tag or not)
    or a hub id, whose ``config.json`` is read through ``hub_policy`` (default: ``HubPolicy.from_env()``).
    """
    if not isinstance(data, dict):
        raise ModelSpecError("a model spec must be an object with timm_name")
    unknown = set(data) - {"id", "timm_name", "timm_kwargs", "checkpoint", "preprocess", "checkpoint_sha256",
                           "checkpoint_dtype", "parameters", "classes", "data", "fp_top1_test", "training",
                           "weights", "hub", "model_id", "weights_source"}
    if unknown:
        raise ModelSpecError(f"unknown model spec field(s): {', '.join(sorted(unknown))}")
    name = data.get("timm_name")
    if not isinstance(name, str) or not name:
        raise ModelSpecError("model spec needs a timm_name string")
    weights = data.get("weights")
    if weights is not None and weights not in WEIGHTS_CHOICES:
        raise ModelSpecError(f"weights must be {' or '.join(WEIGHTS_CHOICES)}, not {str(weights)[:40]!r}")
    kwargs = data.get("timm_kwargs") or {}
    check_kwarg_bounds(kwargs)  # shape, finiteness and sizes, before anything is sized from them
    if "pretrained" in kwargs:
        raise ModelSpecError(PRETRAINED_KWARG_REFUSED)
    forbidden = sorted(FORBIDDEN_KWARGS & set(kwargs))
    if forbidden:
        raise ModelSpecError(f"timm_kwargs may not set {', '.join(forbidden)}; give weights as 'checkpoint'")
    parsed = parse_model_id(name)
    hub = HubRef.from_dict(data["hub"]) if data.get("hub") is not None else parsed.hub
    if parsed.kind == "hub":
        assert parsed.hub is not None
        if data.get("checkpoint") is not None:
            raise ModelSpecError("a hub id brings its own weights; give either a hub id or a checkpoint")
        policy = hub_policy or HubPolicy.from_env()
        config = hub_config(policy, parsed.hub, name)
        if config is None:
            raise unavailable(parsed.hub, name, f"its config.json is not in the model cache {policy.cache_dir}",
                              policy)
        arch, kwargs, default = _hub_architecture(config, kwargs)
        preprocess = Preprocess.from_dict(data["preprocess"], default) if data.get("preprocess") else default
        return ModelSpec(arch, kwargs, None, preprocess, spec_id or data.get("id"), weights,
                         None if weights == "random" else parsed.hub, data.get("model_id") or name)
    written, name = name, parsed.timm_name or name
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
    if checkpoint is not None or weights == "random":
        hub = None
    model_id = data.get("model_id") or (written if hub is not None else None)
    return ModelSpec(name, dict(kwargs), checkpoint, preprocess, spec_id or data.get("id"), weights, hub, model_id)


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


def resolve_model_spec(value: str | dict[str, Any] | ModelSpec, hub_policy: HubPolicy | None = None) -> ModelSpec:
    """A model id (built-in, timm name with or without a pretrained tag, ``hf-hub:org/repo``, ``org/repo``,
    each optionally ``@revision``), a path to a spec JSON file, an inline spec JSON object (as ``vitq jobs
    submit`` takes it), a spec dict, or a ModelSpec."""
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, dict):
        return make_spec(value, hub_policy=hub_policy)
    if not isinstance(value, str) or not value.strip():
        raise ModelSpecError("model must be a model id, a spec JSON path, or a spec object")
    value = value.strip()
    builtins = _builtin_specs()
    if value in builtins:
        return builtins[value]
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ModelSpecError(f"the model spec is not valid JSON: {exc}") from None
        return make_spec(data, hub_policy=hub_policy)
    path = Path(value)
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelSpecError(f"cannot read model spec {value}: {exc}") from None
        return make_spec(data, base_dir=path.parent, hub_policy=hub_policy)
    if path.suffix == ".json":
        raise ModelSpecError(f"model spec file {value} not found")
    parse_model_id(value, frozenset(builtins))  # the "did you mean" refusal for unknown names
    return make_spec({"timm_name": value}, hub_policy=hub_policy)


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


_UNSAFE_GLOBAL = re.compile(r"unsupported global:? (?:GLOBAL )?([\w.]+)", re.IGNORECASE)


def pickle_refusal(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to retry with
    ``weights_only=False`` (that would run whatever code the pickle holds)."""
    found = _UNSAFE_GLOBAL.search(str(exc))
    if found:
        what = f"it references {found.group(1)}, which is not a tensor"
    elif isinstance(exc, pickle.UnpicklingError):
        what = "it holds objects other than tensors"
    else:
        what = f"it is not a readable torch file ({type(exc).__name__})"
    return (
        "only plain tensors are loaded from .pth files (weights_only=True), and " + what + "; "
        "save the weights as a state dict of tensors, or as safetensors"
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
        raise ModelSpecError(f"checkpoint {path.name} was refused: {pickle_refusal(exc)}") from None
    state = unwrap_state_dict(state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"checkpoint {path.name} does not hold a state dict of tensors")
    return state


MAX_BLOCKS = 128
"""Most transformer blocks a model may have, all stages together (timm's largest registered ViT has 48).
The parameter count needs only a few of them built (``count_parameters``); this bounds what the worker
builds in full."""
_EXTRAPOLATE_ABOVE = 4
"""Requested depths up to this many blocks per stage are built as asked; deeper ones are extrapolated."""


@functools.cache
def _model_class(timm_name: str) -> type[nn.Module]:
    """The class ``timm_name`` builds, from a one-block build on the meta device (timm has no map)."""
    fewest_blocks = {"depths": (1, 1, 1, 1)} if timm_name.startswith("swin") else {"depth": 1}
    with torch.device("meta"):
        return type(timm.create_model(timm_name, pretrained=False, **fewest_blocks))


def _meta_parameters(timm_name: str, kwargs: dict[str, Any]) -> int:
    try:
        with torch.device("meta"):
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
    except Exception as build_error:
        # A value of the wrong type often breaks the build somewhere deep; name the kwarg instead.
        try:
            model_class = _model_class(timm_name)
        except Exception:  # not even one block builds: timm's own error is the one to report
            raise build_error from None
        check_kwarg_types(model_class, kwargs)
        raise
    check_kwarg_types(type(model), kwargs)  # every submit passes here before any real build
    return sum(p.numel() for p in model.parameters())


def _requested_depths(kwargs: dict[str, Any]) -> tuple[str, list[int]] | None:
    """``("depth", [d])`` (ViT, DeiT) or ``("depths", [d1, …])`` (Swin) where timm_kwargs set them."""
    for key in ("depth", "depths"):
        if key not in kwargs:
            continue
        value = kwargs[key]
        values = [value] if key == "depth" else value
        if not isinstance(values, list | tuple) or not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
        ):
            what = "a non-negative integer" if key == "depth" else "a list of non-negative integers"
            raise ModelSpecError(f"timm_kwargs.{key} must be {what}")
        if sum(values) > MAX_BLOCKS:
            raise ModelSpecError(
                f"timm_kwargs.{key} asks for {sum(values)} transformer blocks; the limit is {MAX_BLOCKS}"
            )
        return key, [int(v) for v in values]
    return None


def count_parameters(spec: ModelSpec) -> int:
    """The parameter count of ``spec``'s architecture, from the meta device (no weights allocated).

    Why not one build: building on the meta device allocates nothing, but every block is still a few
    dozen Python modules, so ``depth=3000`` took 47 s of CPU. Every block of a stage has the same
    shapes, so the count is affine in each stage's depth: ``P(d) = P(1) + (d - 1)·(P(2) - P(1))`` for
    ViT/DeiT, and per stage for Swin. Deep requests are counted from builds with one and two blocks per
    stage (1 + stages small builds, each also checking the other kwargs), so the work per request is
    bounded whatever the kwargs say.
    """
    kwargs = {k: v for k, v in spec.timm_kwargs.items() if k != "pretrained"}
    requested = _requested_depths(kwargs)
    if requested is None or max(requested[1]) <= _EXTRAPOLATE_ABOVE:
        return _meta_parameters(spec.timm_name, kwargs)
    key, depths = requested

    def with_depths(values: list[int]) -> dict[str, Any]:
        return {**kwargs, key: values[0] if key == "depth" else values}

    ones = [1] * len(depths)
    base = _meta_parameters(spec.timm_name, with_depths(ones))
    total = base
    for stage, depth in enumerate(depths):
        two = ones.copy()
        two[stage] = 2
        per_block = _meta_parameters(spec.timm_name, with_depths(two)) - base
        total += (depth - 1) * per_block
    return total


def model_num_classes(spec: ModelSpec) -> int | None:
    """How many classes the model predicts: ``timm_kwargs.num_classes``, else the registered default
    (1000 for ImageNet models); ``None`` for a headless model (``num_classes=0``)."""
    value = spec.timm_kwargs.get("num_classes")
    if value is None:
        cfg = timm.models.get_pretrained_cfg(spec.timm_name)
        value = (cfg.to_dict() if cfg is not None else {}).get("num_classes", 1000)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_parameter_count(spec: ModelSpec, max_parameters: int = MAX_PARAMETERS) -> int:
    """``count_parameters``, refused with a ``ModelSpecError`` above ``max_parameters``."""
    try:
        count = count_parameters(spec)
    except ModelSpecError:
        raise
    except Exception as exc:  # timm raises TypeError/ValueError/AssertionError/RuntimeError for bad kwargs
        raise ModelSpecError(f"timm could not build {spec.timm_name} with {spec.timm_kwargs}: {exc}") from None
    if count > max_parameters:
        raise ModelSpecError(
            f"{spec.timm_name} with these timm_kwargs has {count:,} parameters; the limit is {max_parameters:,}"
        )
    return count


def create_architecture(spec: ModelSpec, max_parameters: int = MAX_PARAMETERS) -> nn.Module:
    """The timm model with random weights (the skeleton a checkpoint is loaded into); rejects absurd sizes
    (counted on the meta device) before allocating them."""
    kwargs = {k: v for k, v in spec.timm_kwargs.items() if k != "pretrained"}
    check_parameter_count(spec, max_parameters)
    try:
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    except Exception as exc:
        raise ModelSpecError(f"timm could not build {spec.timm_name} with {kwargs}: {exc}") from None
    return model.eval()


def with_hub_weights(spec: ModelSpec, hub_policy: HubPolicy | None = None,
                     progress: Any = None) -> ModelSpec:
    """``spec`` with its hub weights in the local cache (``spec.fetched``), fetched under ``hub_policy``
    (default ``HubPolicy.from_env()``); other specs come back unchanged."""
    if spec.weights_kind != "hub" or spec.fetched is not None:
        return spec
    assert spec.hub is not None
    fetched = fetch_weights(hub_policy or HubPolicy.from_env(), spec.hub, model_id=spec.model_id,
                            progress=progress)
    return replace(spec, fetched=fetched)


_OVERLAY_KEYS = ("input_size", "num_classes", "first_conv", "classifier", "label_offset", "mean", "std",
                 "interpolation", "crop_pct", "fixed_input_size")
"""The repository's ``pretrained_cfg`` entries timm's loader compares with the model it builds (a classifier
of another width is reset, an input convolution of other channels adapted)."""


def _load_hub_model(spec: ModelSpec, max_parameters: int) -> nn.Module:
    """timm's own pretrained loader on the cached file: its checkpoint filter (position embeddings resized
    to ``img_size``, input convolution adapted to ``in_chans``) and strict loading, with the classifier
    checked against the checkpoint's class count."""
    assert spec.fetched is not None
    check_parameter_count(spec, max_parameters)
    kwargs = {k: v for k, v in spec.timm_kwargs.items() if k != "pretrained"}
    config = spec.fetched.config or {}
    pretrained_cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    overlay: dict[str, Any] = {k: v for k, v in pretrained_cfg.items() if k in _OVERLAY_KEYS}
    overlay.update(file=str(spec.fetched.weights_file), source="", hf_hub_id=None, url=None)
    classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
    if isinstance(classes, int) and not isinstance(classes, bool):
        overlay["num_classes"] = classes
    try:
        model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as exc:  # timm raises RuntimeError for weights that do not fit
        raise ModelSpecError(
            f"the weights of {spec.fetched.repo_id} do not fit {spec.timm_name} with {kwargs}: "
            f"{str(exc).splitlines()[0][:400]}"
        ) from None
    return model.eval()


def build_model(spec: ModelSpec, hub_policy: HubPolicy | None = None, progress: Any = None,
                max_parameters: int = MAX_PARAMETERS) -> nn.Module:
    """The float model with the spec's weights: its checkpoint, its hub weights (fetched under
    ``hub_policy`` when not yet local), or random weights when the spec says ``"weights": "random"``.
    A spec with none of these is refused: random weights never happen by accident."""
    kind = spec.weights_kind
    if kind == "none":
        raise no_weights_error(spec)
    check_parameter_count(spec, max_parameters)  # before any download: a spec timm cannot build fails first
    if kind == "hub":
        return _load_hub_model(with_hub_weights(spec, hub_policy, progress), max_parameters)
    model = create_architecture(spec, max_parameters)
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
    _raise_if_misfit(missing, unexpected, mismatched)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelSpecError(f"weights hold NaN or infinite values, e.g. in {bad[0]}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


# -- checking a safetensors checkpoint against an architecture, in bounded memory ----------------------

SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
"""The safetensors dtypes read here and their bytes per element (sub-byte dtypes are refused)."""
FLOAT_WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")
"""What a float parameter may be stored as; ``load_weights`` casts it to the model's dtype."""
_EXPONENT_MASKS = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000),
                   "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}
"""A float is NaN or infinite exactly when all its exponent bits are set."""
_TORCH_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                 torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                 torch.uint8: "U8", torch.bool: "BOOL"}
HEADER_BYTES_PER_TENSOR = 1024
"""Header budget per expected tensor (a name, a dtype, a shape, two offsets are ~150 bytes)."""
_SCAN_CHUNK = 8 << 20


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"tensor name {key[:100]!r} appears twice")
        out[key] = value
    return out


def read_safetensors_header(path: Path, *, max_header_bytes: int = SAFETENSORS_MAX_HEADER_BYTES,
                            name: str | None = None) -> dict[str, TensorEntry]:
    """The tensor table of a safetensors file, read from its header only (never the tensors).

    Checked as the safetensors loader does, so a file that passes here loads in the worker: a JSON
    object of ``{name: {dtype, shape, data_offsets}}`` (plus an optional ``__metadata__`` of strings),
    no duplicate names, each tensor's byte length equal to its shape times its dtype's size, and the
    offsets tiling the data after the header exactly, without gaps or overlaps.
    """
    label = name or path.name
    size = path.stat().st_size

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{label} is not a valid safetensors file: {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > min(max_header_bytes, size - 8):
            raise bad(f"header length {length} exceeds the {min(max_header_bytes, size - 8)} bytes allowed")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"the header is not a JSON object ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise bad("__metadata__ must map names to strings")
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        shown = key[:100]
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {shown!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise bad(f"tensor {shown!r} has an unsupported dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {shown!r} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets
        ) and offsets[0] <= offsets[1]):
            raise bad(f"tensor {shown!r} has invalid data_offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]:
            raise bad(f"tensor {shown!r}: data_offsets span {offsets[1] - offsets[0]} bytes, "
                      f"its shape and dtype need {math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]}")
        entries[key] = TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])
    position = 0
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            raise bad(f"tensor {key[:100]!r} starts at byte {entry.start}, expected {position} (gap or overlap)")
        position = entry.end
    if position != size - 8 - length:
        raise bad(f"the tensors cover {position} bytes but {size - 8 - length} follow the header")
    return entries


def _nonfinite_tensor(path: Path, data_start: int, entries: dict[str, TensorEntry]) -> str | None:
    """The first float tensor holding NaN or ±inf, scanning the file in chunks (bounded memory)."""
    import numpy as np

    with open(path, "rb") as f:
        for key, entry in entries.items():
            if entry.dtype not in _EXPONENT_MASKS:
                continue
            view, mask = _EXPONENT_MASKS[entry.dtype]
            item = SAFETENSORS_ITEMSIZE[entry.dtype]
            f.seek(data_start + entry.start)
            left = entry.end - entry.start
            while left:
                chunk = f.read(min(left, _SCAN_CHUNK - _SCAN_CHUNK % item))
                if not chunk:
                    return key
                left -= len(chunk)
                bits = np.frombuffer(chunk, dtype=view)
                if np.any((bits & np.array(mask, dtype=view)) == mask):
                    return key
    return None


def check_checkpoint_fits(spec: ModelSpec, path: Path, *, max_parameters: int = MAX_PARAMETERS,
                          name: str | None = None) -> int:
    """Check that the safetensors file at ``path`` fits ``spec``'s architecture without loading it.

    The architecture is counted (``check_parameter_count``) and built on the meta device, so neither the
    model nor the weights are allocated; the file's header is read and its names, shapes and dtypes
    compared with the model's state dict; float tensors are then scanned for NaN and ±inf in 8 MiB
    chunks. Memory: the header (bounded by the number of tensors the model has) and one chunk, whatever
    the file's size. Returns the parameter count.
    """
    count = check_parameter_count(spec, max_parameters)
    kwargs = {k: v for k, v in spec.timm_kwargs.items() if k != "pretrained"}
    try:
        with torch.device("meta"):
            expected = timm.create_model(spec.timm_name, pretrained=False, **kwargs).state_dict()
    except Exception as exc:
        raise ModelSpecError(f"timm could not build {spec.timm_name} with {kwargs}: {exc}") from None
    entries = read_safetensors_header(
        path, max_header_bytes=min(SAFETENSORS_MAX_HEADER_BYTES, 4096 + HEADER_BYTES_PER_TENSOR * len(expected)),
        name=name,
    )
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    mismatched, wrong_dtype = [], []
    for key, tensor in expected.items():
        entry = entries.get(key)
        if entry is None:
            continue
        if entry.shape != tuple(tensor.shape):
            mismatched.append(f"{key}: checkpoint {entry.shape} vs model {tuple(tensor.shape)}")
        allowed = FLOAT_WEIGHT_DTYPES if tensor.is_floating_point() else (_TORCH_DTYPES.get(tensor.dtype),)
        if entry.dtype not in allowed:
            wrong_dtype.append(f"{key}: checkpoint {entry.dtype} vs model {_TORCH_DTYPES.get(tensor.dtype)}")
    _raise_if_misfit(missing, [k[:100] for k in unexpected], mismatched, wrong_dtype)
    with open(path, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    bad = _nonfinite_tensor(path, data_start, entries)
    if bad is not None:
        raise CheckpointError(f"weights hold NaN or infinite values, e.g. in {bad}")
    return count


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as safetensors one tensor at a time (``safetensors.torch.save_file`` builds
    every tensor's bytes in memory first). Tensors may be memory-mapped (``torch.load(mmap=True)``), so
    converting a large ``.pth`` costs about its largest tensor, not its size."""
    header: dict[str, Any] = {}
    offset = 0
    for key, tensor in state.items():
        dtype = _TORCH_DTYPES.get(tensor.dtype)
        if dtype is None:
            raise ModelSpecError(f"tensor {key[:100]} has dtype {tensor.dtype}, which safetensors does not store here")
        nbytes = tensor.numel() * SAFETENSORS_ITEMSIZE[dtype]
        header[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for tensor in state.values():
            flat = tensor.detach().contiguous().reshape(-1)
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))


def _raise_if_misfit(
    missing: list[str], unexpected: list[str], mismatched: list[str], wrong_dtype: list[str] | None = None
) -> None:
    """One message for weights that do not fit their architecture, whether they were loaded (a state
    dict) or only read from a safetensors header: at most three examples of each kind of misfit."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s) e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s) e.g. {', '.join(unexpected[:3])}")
    if mismatched:
        parts.append(f"shape mismatch: {'; '.join(mismatched[:3])}")
    if wrong_dtype:
        parts.append(f"dtype mismatch: {'; '.join(wrong_dtype[:3])}")
    if parts:
        raise ModelSpecError("weights do not fit the model: " + "; ".join(parts))
