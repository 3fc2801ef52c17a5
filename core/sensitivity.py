"""How much each unit costs when it alone is quantized, and what each unit weighs in the checkpoint.

``unit_sensitivity`` calibrates one copy of the model at the lowest widths a search may use (the
method's calibration, its stage 2 and weight initialisation: no reconstruction), then switches on the
quantizers of one unit at a time and measures the relative logit error against the float model,
``‖z_q − z‖² / ‖z‖²``, on a few calibration images. It costs one calibration and one forward pass
per unit; no labels are needed. ``model_bytes`` is the size of the quantized weights of a
configuration, computed from the float model (no quantization needed), so candidates can be ordered
by size before any of them is tried.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from core.calibrate import calibrate_activations, init_weight_quantizers
from core.config import ACT_INIT_IMAGES, Method, QuantConfig
from core.reparameterize import reparameterize
from core.wrap import find_units, quantizers, set_quant_state, unit_of, weight_layers, wrap_model

PROBE_IMAGES = 256
"""Calibration images the logit error is measured on."""


def _set_unit_state(unit: nn.Module, on: bool) -> None:
    for _, layer in weight_layers(unit):
        layer.weight_quantizer.enabled = on
    for _, quantizer in quantizers(unit):
        quantizer.enabled = on


@torch.no_grad()
def unit_sensitivity(
    model: nn.Module, config: QuantConfig, images: torch.Tensor, device: torch.device
) -> list[dict[str, Any]]:
    """``[{"unit", "logit_error", "params"}]`` in forward order; ``config`` gives the (lowest) widths.

    ``images`` are calibration images in sample order: the first 64 calibrate, the last
    ``PROBE_IMAGES`` (or all, when there are fewer) are the probe.
    """
    config = config.for_device(device.type).resolved()
    qmodel = wrap_model(copy.deepcopy(model).float(), config).to(device).eval()
    images = images.to(device, torch.float32)
    calibrate_activations(qmodel, images[:ACT_INIT_IMAGES])
    if config.method in (Method.ISVIT, Method.REPQ):
        set_quant_state(qmodel, weights=False, activations=True)
        reparameterize(qmodel)
    init_weight_quantizers(qmodel)
    set_quant_state(qmodel, weights=False, activations=False)
    probe = images[-PROBE_IMAGES:]
    reference = torch.cat([qmodel(x) for x in probe.split(64)]).double()
    energy = float(reference.pow(2).sum().clamp_min(1e-30))
    out = []
    for name in find_units(qmodel):
        unit = qmodel.get_submodule(name)
        _set_unit_state(unit, True)
        logits = torch.cat([qmodel(x) for x in probe.split(64)]).double()
        _set_unit_state(unit, False)
        error = float((logits - reference).pow(2).sum()) / energy
        params = sum(layer.weight.numel() for _, layer in weight_layers(unit))
        out.append({"unit": name, "logit_error": error if math.isfinite(error) else None, "params": params})
    return out


def model_bytes(model: nn.Module, config: QuantConfig) -> int:
    """Bytes of a quantized configuration's tensors, as the checkpoint stores them.

    Every Linear and the patch-embedding conv: ``ceil(n·b/8)`` bytes of bit-packed codes (one byte per
    code at 8 bits) plus a float32 scale and zero point per output channel; every other parameter and
    buffer in float32. Activation quantizers' few parameters and the JSON header are left out, so the
    checkpoint file is slightly larger (the report gives both).
    """
    units = find_units(model)
    total = 0
    layer_names = set()
    for name, module in model.named_modules():
        is_layer = type(module) is nn.Linear or (name == "patch_embed.proj" and isinstance(module, nn.Conv2d))
        if not is_layer:
            continue
        w_bits = config.unit_bits(unit_of(name, units))[0]
        n = module.weight.numel()
        total += (n if w_bits == 8 else math.ceil(n * w_bits / 8)) + 8 * module.weight.shape[0]
        layer_names.add(name + ".weight")
    for key, value in model.state_dict().items():
        if key not in layer_names:
            total += 4 * value.numel()
    return total
