"""How the reconstruction loops run: choices of execution, not of method.

None of these changes what a job means, so none is a ``QuantConfig`` field (the config, the unit cache
key and ``report.json`` stay exactly as they were). ``concurrent_stage1`` gives the same parameters as
the sequential loop (tested); the faster arithmetic does not, so it is off by default and a run that
turns it on must say so. Set for a block of code with ``execution(...)``; read with ``current()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from core.errors import InvalidConfigError

MATMUL_MODES = ("fp32", "tf32", "bf16")
"""fp32: full float32 everywhere. tf32: float32 matmuls may use TensorFloat-32 on an accelerator that
has it (``torch.set_float32_matmul_precision("high")``). bf16: the unit's matmuls run under bfloat16
autocast; fake quantizers and the loss stay in float32."""


@dataclass(frozen=True)
class Execution:
    """``concurrent_stage1``: train all of stage 1's units in one loop, one optimiser step per
    iteration (their losses are independent). ``wave_bytes``: the most cached unit inputs and targets
    held at once by that loop; units beyond it go into the next wave. ``matmul``: see ``MATMUL_MODES``;
    it applies to the training steps only (captures, held-out losses and evaluation stay float32)."""

    concurrent_stage1: bool = True
    wave_bytes: int = 8 * 2**30
    matmul: str = "fp32"

    def __post_init__(self) -> None:
        if self.matmul not in MATMUL_MODES:
            raise InvalidConfigError(f"matmul must be one of {', '.join(MATMUL_MODES)}, got {self.matmul!r}")
        if self.wave_bytes < 1:
            raise InvalidConfigError(f"wave_bytes must be positive, got {self.wave_bytes}")

    @property
    def default(self) -> bool:
        return self == Execution()


_CURRENT: ContextVar[Execution | None] = ContextVar("vitq_execution", default=None)


def current() -> Execution:
    return _CURRENT.get() or Execution()


@contextlib.contextmanager
def execution(**changes) -> Iterator[Execution]:
    """Run the enclosed code with some ``Execution`` fields changed (``execution(matmul="bf16")``)."""
    chosen = dataclasses.replace(current(), **changes)
    token = _CURRENT.set(chosen)
    try:
        yield chosen
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def autocast_forward(device: torch.device, mode: str) -> Iterator[None]:
    """bfloat16 autocast around a training step's forward pass in ``bf16`` mode (its backward pass
    follows the forward's dtypes); nothing otherwise."""
    if mode != "bf16":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


@contextlib.contextmanager
def matmul_precision(mode: str) -> Iterator[None]:
    """TensorFloat-32 float32 matmuls, forward and backward, in ``tf32`` mode; restored afterwards."""
    before = torch.get_float32_matmul_precision()
    if mode == "tf32":
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
