"""Block (and layer) reconstruction, the optimisation step of SOS.

For one unit, minimise ``mean_batch(sum((Y_q - Y_fp)^2))`` over its Linear/conv weights and
biases (and Swin's relative-position bias table) with Adam and a cosine schedule; LayerNorm and
every quantizer parameter stay frozen. Unit inputs and targets are cached on the device once, and
the loop never reads a value back to the host, so a GPU is never stalled by a sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import CancelledError


class _StopForward(Exception):
    """Raised from a hook once the wanted activation is captured, to skip the rest of the model."""


@torch.no_grad()
def capture_unit_io(
    model: nn.Module, unit_name: str, images: torch.Tensor, batch_size: int, *, output: bool
) -> torch.Tensor:
    """The input (or output) of ``model.<unit_name>`` for every image, concatenated."""
    unit = model.get_submodule(unit_name)
    chunks: list[torch.Tensor] = []

    def pre_hook(_module, args):
        chunks.append(args[0].detach())
        raise _StopForward

    def post_hook(_module, _args, out):
        chunks.append(out.detach())
        raise _StopForward

    handle = unit.register_forward_hook(post_hook) if output else unit.register_forward_pre_hook(pre_hook)
    try:
        for batch in images.split(batch_size):
            try:
                model(batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(chunks)


@torch.no_grad()
def run_unit(unit: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Apply one unit to cached inputs, in batches."""
    return torch.cat([unit(chunk) for chunk in inputs.split(batch_size)])


@torch.no_grad()
def chain_links(model: nn.Module, units: list[str], probe: torch.Tensor) -> list[bool]:
    """``links[i]`` is True when unit i consumes unit i-1's output unchanged.

    Then unit i's cached input is unit i-1's output, and a stage costs one pass per unit instead
    of a forward pass of the model prefix per unit.
    """
    seen_in: dict[str, torch.Tensor] = {}
    seen_out: dict[str, torch.Tensor] = {}  # tensors kept alive so identity cannot be a reused address
    handles = []
    for name in units:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda _m, args, name=name: seen_in.__setitem__(name, args[0])))
        handles.append(module.register_forward_hook(
            lambda _m, _a, out, name=name: seen_out.__setitem__(name, out)))
    try:
        model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return [i > 0 and units[i] in seen_in and seen_in[units[i]] is seen_out.get(units[i - 1])
            for i in range(len(units))]


def trainable_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of the unit's layers (and relative-position tables), not LayerNorm."""
    params = []
    for module in unit.modules():
        if isinstance(module, nn.LayerNorm | nn.GroupNorm):
            continue
        params.extend(module.parameters(recurse=False))
    return params


@dataclass
class UnitResult:
    loss_start: float
    loss_end: float


def reconstruct_unit(
    unit: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    iters: int,
    batch_size: int,
    lr: float,
    seed: int,
    on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> UnitResult:
    params = trainable_parameters(unit)
    if iters <= 0 or not params:
        return UnitResult(math.nan, math.nan)
    all_params = list(unit.parameters())
    saved_flags = [p.requires_grad for p in all_params]
    for p in all_params:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0)
    device = inputs.device
    generator = torch.Generator(device=device).manual_seed(seed)
    n = inputs.shape[0]
    tail = max(1, iters // 10)
    loss_first = torch.zeros((), device=device)
    loss_tail = torch.zeros((), device=device)
    try:
        for step in range(iters):
            if should_stop is not None and should_stop():
                raise CancelledError("cancelled during reconstruction")
            idx = torch.randint(0, n, (min(batch_size, n),), device=device, generator=generator)
            with torch.enable_grad():
                out = unit(inputs[idx])
                loss = (out - targets[idx]).pow(2).flatten(1).sum(1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            schedule.step()
            detached = loss.detach()
            if step == 0:
                loss_first = detached
            if step >= iters - tail:
                loss_tail = loss_tail + detached
            if on_step is not None:
                on_step(step)
    finally:
        for p, flag in zip(all_params, saved_flags, strict=True):
            p.requires_grad_(flag)
        optimizer.zero_grad(set_to_none=True)
    return UnitResult(float(loss_first), float(loss_tail / tail))
