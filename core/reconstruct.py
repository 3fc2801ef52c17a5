"""Block (and layer) reconstruction, the optimisation step of SOS.

For one unit, minimise ``mean_batch(sum((Y_q - Y_fp)^2))`` over its Linear/conv weights and
biases (and Swin's relative-position bias table) with Adam and a cosine schedule; LayerNorm and
every quantizer parameter stay frozen. Unit inputs and targets are cached on the device once, and
the loop never reads a value back to the host, so a GPU is never stalled by a sync; the held-out
loss is read twice per unit, before and after, to decide which parameters the unit keeps.

``reconstruct_units`` trains several independent units (stage 1's: inputs and targets both from the
float model) in one loop with one optimiser. Each unit's loss depends on its own parameters only and
Adam is per parameter, so one step over all of them is each unit's own step: the same mini-batches
(each unit keeps its own generator), the same schedule, the same held-out rule, the same parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import CancelledError
from core.execution import autocast_forward, matmul_precision
from core.execution import current as current_execution
from core.quantizers import ActQuantizer, SelectQuantizer


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


HOLDOUT_FRACTION, HOLDOUT_MAX = 8, 128
"""One calibration image in eight (at most 128) is held out of a unit's optimisation to decide
whether it helped."""


@dataclass
class UnitResult:
    """Losses on the held-out images: before optimisation, and for the parameters the unit keeps.

    ``reverted`` says the optimised parameters were worse on the held-out images than the starting
    ones and were thrown away; ``loss_trained`` is what they reached.
    """

    loss_start: float
    loss_end: float
    loss_trained: float | None = None
    reverted: bool = False
    skipped: bool = False
    softmax_choice: dict[str, str] | None = None


def holdout_split(n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices of ``n`` cached unit inputs; nothing is held out below 16 inputs."""
    held = min(HOLDOUT_MAX, n // HOLDOUT_FRACTION) if n >= 16 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    if held == 0:
        return order, order
    return order[held:], order[:held]


@torch.no_grad()
def unit_loss(unit: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``mean_batch(sum((Y_q - Y_fp)^2))`` over all of ``inputs``, on the device (no host read)."""
    total = torch.zeros((), device=inputs.device, dtype=torch.float64)
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size), strict=True):
        total += (unit(x) - y).double().pow(2).flatten(1).sum(1).sum()
    return total / inputs.shape[0]


@torch.no_grad()
def choose_softmax_quantizers(
    unit: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> dict[str, str]:
    """For every ``SelectQuantizer`` in the unit, in order, keep the candidate with the smaller unit
    loss: the objective SOS optimises, measured on the held-out images, rather than the MSE of the
    attention map (which favours log√2's finer top octaves even where SULQ's tail serves ``A @ V``
    better)."""
    chosen = {}
    for name, quantizer in unit.named_modules():
        if not isinstance(quantizer, SelectQuantizer):
            continue
        losses = []
        for index in range(len(quantizer.candidates)):
            quantizer.choice.fill_(index)
            losses.append(float(unit_loss(unit, inputs, targets, batch_size)))
        quantizer.choice.fill_(min(range(len(losses)), key=losses.__getitem__))
        chosen[name] = type(quantizer.chosen).__name__
    return chosen



def has_nothing_to_learn(unit: nn.Module) -> bool:
    """True when no quantizer inside ``unit`` is on (stage 1's patch embedding: the image is not
    quantized and weights are not yet): with float inputs the unit then computes exactly what the float
    model does, its loss is zero, and a stage can skip it without capturing or running anything."""
    for module in unit.modules():
        if isinstance(module, SelectQuantizer):
            return False  # its candidate is chosen on the unit's loss, as before
        if isinstance(module, ActQuantizer) and module.enabled:
            return False
    return True


@dataclass
class _Prepared:
    """A unit ready to train: its held-out images, trainable parameters and starting point."""

    unit: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    train_idx: torch.Tensor
    held_in: torch.Tensor
    held_out: torch.Tensor
    params: list[nn.Parameter]
    saved: list[torch.Tensor]
    start: float
    choice: dict[str, str] | None
    eval_batch: int


def _prepare(
    unit: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, iters: int, batch_size: int, seed: int,
    choose_softmax: bool, split: tuple[torch.Tensor, torch.Tensor] | None,
) -> _Prepared | UnitResult:
    """Choose the post-Softmax quantizers and measure the starting held-out loss; a ``UnitResult``
    when the unit has nothing to train."""
    device = inputs.device
    train_idx, held_idx = split if split is not None else holdout_split(inputs.shape[0], seed, device)
    held_in, held_out = inputs[held_idx], targets[held_idx]
    eval_batch = max(batch_size, 64)
    choice = choose_softmax_quantizers(unit, held_in, held_out, eval_batch) if choose_softmax else None
    params = trainable_parameters(unit)
    if iters <= 0 or not params:
        return UnitResult(math.nan, math.nan, skipped=True, softmax_choice=choice)
    start = float(unit_loss(unit, held_in, held_out, eval_batch))
    if start == 0.0:
        return UnitResult(0.0, 0.0, skipped=True, softmax_choice=choice)
    return _Prepared(unit, inputs, targets, train_idx, held_in, held_out, params,
                     [p.detach().clone() for p in params], start, choice, eval_batch)


def _finish(prep: _Prepared) -> UnitResult:
    """Keep the trained parameters only if they beat the starting ones on the held-out images."""
    trained = float(unit_loss(prep.unit, prep.held_in, prep.held_out, prep.eval_batch))
    if trained < prep.start:
        return UnitResult(prep.start, trained, loss_trained=trained, softmax_choice=prep.choice)
    with torch.no_grad():
        for p, value in zip(prep.params, prep.saved, strict=True):
            p.copy_(value)
    return UnitResult(prep.start, prep.start, loss_trained=trained, reverted=True, softmax_choice=prep.choice)


def _draw_indices(prep: _Prepared, iters: int, batch_size: int, seed: int) -> torch.Tensor:
    """Every step's mini-batch indices (iters × batch) up front, drawn exactly as one draw per step
    from the unit's own generator would draw them, so the loop itself launches no sampling."""
    device = prep.inputs.device
    generator = torch.Generator(device=device).manual_seed(seed)
    n = prep.train_idx.shape[0]
    size = (min(batch_size, n),)
    draws = [torch.randint(0, n, size, device=device, generator=generator) for _ in range(iters)]
    return prep.train_idx[torch.stack(draws)]


def _step_loss(prep: _Prepared, idx: torch.Tensor, mode: str) -> torch.Tensor:
    with autocast_forward(prep.inputs.device, mode):
        out = prep.unit(prep.inputs[idx])
    return (out.float() - prep.targets[idx]).pow(2).flatten(1).sum(1).mean()


def _train(
    preps: list[_Prepared], *, iters: int, batch_size: int, lr: float, seeds: list[int],
    on_step: Callable[[int], None] | None, should_stop: Callable[[], bool] | None,
) -> None:
    """``iters`` Adam steps with a cosine schedule, one optimiser over every unit in ``preps``."""
    mode = current_execution().matmul
    all_params = [p for prep in preps for p in prep.unit.parameters()]
    saved_flags = [p.requires_grad for p in all_params]
    for p in all_params:
        p.requires_grad_(False)
    params = [p for prep in preps for p in prep.params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0)
    indices = [_draw_indices(prep, iters, batch_size, seed) for prep, seed in zip(preps, seeds, strict=True)]
    try:
        with matmul_precision(mode):
            for step in range(iters):
                if should_stop is not None and should_stop():
                    raise CancelledError("cancelled during reconstruction")
                optimizer.zero_grad(set_to_none=True)
                for prep, idx in zip(preps, indices, strict=True):
                    with torch.enable_grad():  # one unit's graph at a time: memory of one unit, not all
                        _step_loss(prep, idx[step], mode).backward()
                optimizer.step()
                schedule.step()
                if on_step is not None:
                    on_step(step)
    finally:
        for p, flag in zip(all_params, saved_flags, strict=True):
            p.requires_grad_(flag)
        optimizer.zero_grad(set_to_none=True)


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
    choose_softmax: bool = False,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> UnitResult:
    """Optimise one unit, then keep its new parameters only if they beat the starting ones on
    held-out calibration images (a unit never leaves a stage worse than it entered it).

    A unit whose held-out loss is already zero has nothing to learn and is skipped. With
    ``choose_softmax`` the unit's post-Softmax quantizers first pick their candidate on the same
    held-out images. ``split`` (train, held-out indices) defaults to a split of its own; a stage
    passes one split to all its units, so the held-out images are never trained on by any unit.
    """
    return reconstruct_units([(unit, inputs, targets, seed)], iters=iters, batch_size=batch_size, lr=lr,
                             on_step=on_step, should_stop=should_stop, choose_softmax=choose_softmax,
                             split=split)[0]


def reconstruct_units(
    jobs: list[tuple[nn.Module, torch.Tensor, torch.Tensor, int]],
    *,
    iters: int,
    batch_size: int,
    lr: float,
    on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    choose_softmax: bool = False,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[UnitResult]:
    """``reconstruct_unit`` for independent units at once: ``jobs`` are (unit, inputs, targets, seed),
    the units share no parameter and each loss is its own unit's. The result for each unit is what
    ``reconstruct_unit`` gives it alone (tested); ``on_step(step)`` is called once per shared step,
    and once with ``iters - 1`` when no unit needs training."""
    prepared = [_prepare(unit, x, y, iters=iters, batch_size=batch_size, seed=seed,
                         choose_softmax=choose_softmax, split=split) for unit, x, y, seed in jobs]
    training = [(prep, job[3]) for prep, job in zip(prepared, jobs, strict=True) if isinstance(prep, _Prepared)]
    if training:
        _train([p for p, _ in training], iters=iters, batch_size=batch_size, lr=lr,
               seeds=[seed for _, seed in training], on_step=on_step, should_stop=should_stop)
    elif on_step is not None and iters > 0 and any(r.skipped and r.loss_start == 0.0 for r in prepared):
        on_step(iters - 1)
    return [_finish(prep) if isinstance(prep, _Prepared) else prep for prep in prepared]
