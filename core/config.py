"""QuantConfig: the one object that says how a model is quantized.

A dataclass that validates itself on construction (torchao style), so a bad config fails before
any model is built, and serialises to a plain dict through an allow-list, which is what crosses
from the API to a worker and into a checkpoint header.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from core.errors import InvalidConfigError

CONFIG_VERSION = 1


class Method(StrEnum):
    """Quantization methods that share one engine (same quant points, same wrapping)."""

    ISVIT = "isvit"
    """I&S-ViT: SULQ post-Softmax + three-stage smooth optimization (block reconstruction)."""
    REPQ = "repq"
    """RepQ-ViT: channel-wise post-LN calibrated then reparameterized; log-sqrt2 post-Softmax."""
    PTQ_UNIFORM = "ptq-uniform"
    """Uniform everywhere, layer-wise activations, percentile/MSE ranges, no reconstruction."""


class SoftmaxQuantizer(StrEnum):
    """Quantizer for post-Softmax activations (input A of ``attn @ v``)."""

    SULQ_OR_LOGSQRT2 = "sulq-or-logsqrt2"
    """isvit's default: per layer, SULQ or log√2, whichever has the smaller calibration MSE
    (SULQ's integer exponents are one level per octave; at 6 bits log√2's half octaves fit better)."""
    SULQ = "sulq"
    LOG2 = "log2"
    LOGSQRT2 = "logsqrt2"
    UNIFORM = "uniform"


class Preset(StrEnum):
    AUTO = "auto"
    """``paper`` where the job runs on an accelerator, ``quick`` on a CPU; decided where it runs."""
    PAPER = "paper"
    """The paper's ImageNet setting: 1024 images, batch 64, 1000 iterations (200 at 6+ bits)."""
    QUICK = "quick"
    """Sized for CPUs: fewer iterations; the report states it."""
    SMOKE = "smoke"
    """Seconds: for tests and wiring checks only."""


class CalibrationOrder(StrEnum):
    """How the activation quantizers are initialised on the 64 initialisation images."""

    FLOAT = "float"
    """All at once on full-precision activations (the paper's wording)."""
    FORWARD = "forward"
    """In forward order, each on activations that upstream quantizers (and, where the method
    quantizes weights before reconstruction, weights) already quantized: the authors' code."""


DEFAULT_SOFTMAX = {
    Method.ISVIT: SoftmaxQuantizer.SULQ_OR_LOGSQRT2,
    Method.REPQ: SoftmaxQuantizer.LOGSQRT2,
    Method.PTQ_UNIFORM: SoftmaxQuantizer.UNIFORM,
}


@dataclass(frozen=True)
class PresetValues:
    calib_size: int
    batch_size: int
    iters: int
    iters_high_bits: int
    lr: float


PRESETS: dict[Preset, PresetValues] = {
    Preset.PAPER: PresetValues(calib_size=1024, batch_size=64, iters=1000, iters_high_bits=200, lr=4e-5),
    # 40-60 steps at the paper's 4e-5 barely move a block (measured: block 3 of fmnist-vit-tiny at W3A3,
    # loss 42.9k -> 40.4k); 1e-3 reaches 22.8k in the same 60 steps.
    Preset.QUICK: PresetValues(calib_size=1024, batch_size=32, iters=40, iters_high_bits=20, lr=1e-3),
    Preset.SMOKE: PresetValues(calib_size=32, batch_size=16, iters=2, iters_high_bits=2, lr=1e-3),
}

MIN_BITS, MAX_BITS = 2, 8
ACT_INIT_IMAGES = 64
"""Activation and weight quantizers are initialised on this many calibration images (paper)."""


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize. ``None`` fields are filled from the preset by ``resolved()``."""

    w_bits: int
    a_bits: int
    method: Method = Method.ISVIT
    preset: Preset = Preset.AUTO
    iters: int | None = None
    calib_size: int | None = None
    batch_size: int | None = None
    seed: int = 0
    lr: float | None = None
    softmax_quantizer: SoftmaxQuantizer | None = None
    sos: bool = True
    integer_exponent: bool = True
    calibration_order: CalibrationOrder = CalibrationOrder.FLOAT
    per_unit_bits: dict[str, tuple[int, int]] | None = field(default=None, hash=False)
    """Mixed precision: ``{unit: (w_bits, a_bits)}`` for the units that differ from ``w_bits``/``a_bits``.
    A unit is what SOS reconstructs as one (``core.wrap.find_units``: ``patch_embed``, ``blocks.3``,
    ``head``); its bits apply to every weight and activation quantizer inside it. Serialised as
    ``{unit: {"w_bits": w, "a_bits": a}}``; a unit the model does not have is refused when it is wrapped."""
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        for name, enum in (("method", Method), ("preset", Preset), ("calibration_order", CalibrationOrder)):
            _coerce_enum(self, name, enum)
        if self.softmax_quantizer is not None:
            _coerce_enum(self, "softmax_quantizer", SoftmaxQuantizer)
        for name in ("w_bits", "a_bits"):
            _check_bits(name, getattr(self, name))
        if self.per_unit_bits is not None:
            object.__setattr__(self, "per_unit_bits", _normalise_per_unit_bits(self.per_unit_bits))
        for name, low in (("iters", 0), ("calib_size", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.calib_size is not None and self.calib_size > 100_000:
            raise InvalidConfigError(f"calib_size must be at most 100000, got {self.calib_size}")
        if self.batch_size is not None and self.batch_size > 4096:
            raise InvalidConfigError(f"batch_size must be at most 4096, got {self.batch_size}")
        if self.iters is not None and self.iters > 100_000:
            raise InvalidConfigError(f"iters must be at most 100000, got {self.iters}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, int | float)
                                    or not 0 < self.lr < 1):
            raise InvalidConfigError(f"lr must be in (0, 1), got {self.lr!r}")
        if self.version != CONFIG_VERSION:
            raise InvalidConfigError(f"unsupported config version {self.version}")
        fixed_softmax = DEFAULT_SOFTMAX[self.method]
        if self.method != Method.ISVIT and (self.softmax_quantizer not in (None, fixed_softmax) or not self.sos):
            raise InvalidConfigError("softmax_quantizer and sos are ablation switches of method 'isvit' only")

    def for_device(self, device_type: str) -> QuantConfig:
        """Replace ``auto`` with the preset that fits the device the job runs on."""
        if self.preset != Preset.AUTO:
            return self
        return dataclasses.replace(self, preset=Preset.QUICK if device_type == "cpu" else Preset.PAPER)

    def resolved(self) -> QuantConfig:
        """Fill preset defaults so the stored config says exactly what ran.

        An ``auto`` config keeps the preset's fields open (only the worker knows its device); call
        ``for_device`` first where the job runs.
        """
        if self.preset == Preset.AUTO:
            return dataclasses.replace(self, softmax_quantizer=self.softmax_quantizer or DEFAULT_SOFTMAX[self.method])
        values = PRESETS[self.preset]
        high_bits = self.min_bits() >= 6
        default_iters = values.iters_high_bits if high_bits else values.iters
        if self.method != Method.ISVIT:
            default_iters = 0
        return dataclasses.replace(
            self,
            iters=default_iters if self.iters is None else self.iters,
            calib_size=values.calib_size if self.calib_size is None else self.calib_size,
            batch_size=values.batch_size if self.batch_size is None else self.batch_size,
            lr=values.lr if self.lr is None else float(self.lr),
            softmax_quantizer=self.softmax_quantizer or DEFAULT_SOFTMAX[self.method],
        )

    def min_bits(self) -> int:
        """The smallest width anywhere in the model (the preset's high-bit iteration count needs 6+)."""
        widths = [self.w_bits, self.a_bits]
        for w, a in (self.per_unit_bits or {}).values():
            widths += [w, a]
        return min(widths)

    def unit_bits(self, unit: str | None) -> tuple[int, int]:
        """(w_bits, a_bits) of one unit: its own entry in ``per_unit_bits``, else the model's."""
        if unit is not None and self.per_unit_bits and unit in self.per_unit_bits:
            return self.per_unit_bits[unit]
        return self.w_bits, self.a_bits

    @property
    def mixed(self) -> bool:
        return any(bits != (self.w_bits, self.a_bits) for bits in (self.per_unit_bits or {}).values())

    def bits_label(self) -> str:
        """``W4A4``, or ``W3A3 + 4 units W4A4`` for mixed precision."""
        label = f"W{self.w_bits}A{self.a_bits}"
        groups: dict[tuple[int, int], int] = {}
        for bits in (self.per_unit_bits or {}).values():
            if bits != (self.w_bits, self.a_bits):
                groups[bits] = groups.get(bits, 0) + 1
        for (w, a), count in sorted(groups.items()):
            label += f" + {count} unit{'s' if count > 1 else ''} W{w}A{a}"
        return label

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else value
        if self.per_unit_bits is not None:
            out["per_unit_bits"] = {u: {"w_bits": w, "a_bits": a} for u, (w, a) in self.per_unit_bits.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        if not isinstance(data, dict):
            raise InvalidConfigError("config must be an object")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise InvalidConfigError(f"unknown config field(s): {', '.join(unknown)}")
        missing = [name for name in ("w_bits", "a_bits") if name not in data]
        if missing:
            raise InvalidConfigError(f"missing config field(s): {', '.join(missing)}")
        return cls(**data)


def _check_bits(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfigError(f"{name} must be an integer, got {value!r}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise InvalidConfigError(f"{name} must be between {MIN_BITS} and {MAX_BITS}, got {value}")
    return value


def _normalise_per_unit_bits(value: Any) -> dict[str, tuple[int, int]]:
    """``{unit: {"w_bits", "a_bits"}}`` or ``{unit: [w, a]}`` → ``{unit: (w, a)}``, sorted by unit."""
    if not isinstance(value, dict):
        raise InvalidConfigError("per_unit_bits must be an object {unit: {w_bits, a_bits}}")
    if len(value) > 10_000:
        raise InvalidConfigError("per_unit_bits names more than 10000 units")
    out: dict[str, tuple[int, int]] = {}
    for unit in sorted(value):
        bits = value[unit]
        if not isinstance(unit, str) or not unit or len(unit) > 200:
            raise InvalidConfigError(f"per_unit_bits: {unit!r} is not a unit name")
        if isinstance(bits, dict):
            if set(bits) != {"w_bits", "a_bits"}:
                raise InvalidConfigError(f"per_unit_bits[{unit!r}] must have exactly w_bits and a_bits")
            bits = (bits["w_bits"], bits["a_bits"])
        if not isinstance(bits, list | tuple) or len(bits) != 2:
            raise InvalidConfigError(f"per_unit_bits[{unit!r}] must be {{w_bits, a_bits}}, got {bits!r}")
        out[unit] = (_check_bits(f"per_unit_bits[{unit!r}].w_bits", bits[0]),
                     _check_bits(f"per_unit_bits[{unit!r}].a_bits", bits[1]))
    return out


def _coerce_enum(config: QuantConfig, name: str, enum: type[Enum]) -> None:
    value = getattr(config, name)
    if isinstance(value, enum):
        return
    try:
        object.__setattr__(config, name, enum(value))
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum)
        raise InvalidConfigError(f"{name} must be one of {choices}, got {value!r}") from None
