"""Reconstructed units kept across ``quantize`` calls, so a bit-width search pays for each unit once.

What a unit becomes in a stage is a function of a few things only, and the key names exactly those:

- stage 1 (inputs and targets from the float model): the unit's own bits;
- stage 3 and the one-stage ablation (inputs from the quantized model): the bits of the unit and of every
  unit before it in forward order, since those produced its inputs;
- both: the float model, the calibration images and every hyperparameter (method, iterations, learning
  rate, batch, seed, post-Softmax quantizer, …), which the fingerprint covers.

Activation calibration is per quantizer on float activations, stage 2 is per LayerNorm/Linear pair and
weight quantizers are per layer, so nothing outside that key reaches a unit. ``calibration_order
="forward"`` breaks this (each quantizer is fitted to quantized upstream outputs); then no cache is used.
A hit loads the unit's parameters and buffers as they left the stage and skips its optimisation; the
unit inputs of the units after it are still computed as without the cache, so a cached run gives the
same model as an uncached one (tested with ``torch.equal``). Entries live on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.config import CalibrationOrder, QuantConfig

PREFIX_STAGES = ("stage3", "reconstruct")
"""Stages whose unit inputs come from the quantized model before the unit."""


@torch.no_grad()
def fingerprint(model: nn.Module, images: torch.Tensor) -> tuple[float, ...]:
    """A cheap identity of the float model's parameters and the calibration images."""
    params = [p.detach().double() for p in model.parameters()]
    x = images.detach().double()
    return (float(sum(p.sum() for p in params)), float(sum(p.pow(2).sum() for p in params)),
            float(x.sum()), float(x.pow(2).sum()), *x.shape)


@dataclass
class UnitCache:
    """``{key: (state on the CPU, the unit's reconstruction log)}``; counts its hits and misses."""

    entries: dict[tuple, tuple[dict[str, torch.Tensor], dict[str, Any]]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    @staticmethod
    def usable(config: QuantConfig) -> bool:
        return config.calibration_order != CalibrationOrder.FORWARD

    @staticmethod
    def key(stage: str, config: QuantConfig, units: list[str], index: int, data: tuple) -> tuple:
        hyper = {k: v for k, v in config.to_dict().items() if k not in ("w_bits", "a_bits", "per_unit_bits")}
        scope = units[: index + 1] if stage in PREFIX_STAGES else [units[index]]
        bits = tuple((unit, *config.unit_bits(unit)) for unit in scope)
        return stage, index, tuple(sorted(hyper.items(), key=lambda kv: kv[0])), data, bits

    def get(self, key: tuple) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: tuple, unit: nn.Module, log: dict[str, Any]) -> None:
        self.entries[key] = ({k: v.detach().cpu().clone() for k, v in unit.state_dict().items()}, dict(log))

    @staticmethod
    @torch.no_grad()
    def restore(unit: nn.Module, state: dict[str, torch.Tensor]) -> None:
        device = next(iter(unit.state_dict().values())).device
        unit.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
