"""A post-Softmax quantizer that keeps, per layer, whichever of SULQ and log√2 fits its data better.

Why: SULQ's integer exponent (the shift-friendly dequantization) gives at most one level per
octave, whatever the bit width. At 3 bits that is the point: SULQ spreads its 8 codes over the
whole tail that a plain log2 quantizer clamps. At 6 bits the same octave grid is coarser than
RepQ-ViT's half-octave log√2 grid, and isvit fell below repq (measured on the bundled model at
W6A6: logit SQNR 21.1 dB with SULQ against 26.0 dB with log√2). Both quantizers dequantize with
shifts (log√2 with one extra constant multiply), so choosing between them per layer keeps the
deployment story. Calibration picks by the MSE of the attention map; stage 1 then re-picks per unit
by the unit's own reconstruction loss on held-out images (``core.reconstruct``), which is what
decides: the attention-map MSE favours log√2's finer top octaves even where SULQ's tail serves
``A @ V`` better.
"""

from __future__ import annotations

import torch
from torch import nn

from core.quantizers.base import ActQuantizer


class SelectQuantizer(ActQuantizer):
    """Calibrate every candidate on the same tensor, keep the one with the smallest MSE.

    The candidates' parameters and the ``choice`` buffer all live in the state dict, so a checkpoint
    restores the choice without any extra header field.
    """

    def __init__(self, candidates: list[ActQuantizer]) -> None:
        super().__init__(candidates[0].bits)
        self.candidates = nn.ModuleList(candidates)
        self.enabled = self._enabled
        self.register_buffer("choice", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("candidate_mse", torch.zeros(len(candidates)))

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """The candidates follow the switch, so the chosen one can be used (or exported) on its own."""
        self._enabled = value
        for candidate in getattr(self, "candidates", ()):
            candidate.enabled = value

    @property
    def chosen(self) -> ActQuantizer:
        """Read from the device only when ``choice`` changed, so a forward pass never syncs a GPU."""
        cached = getattr(self, "_chosen_cache", None)
        key = (self.choice, self.choice._version)
        if cached is None or cached[0] is not key[0] or cached[1] != key[1]:
            cached = (*key, int(self.choice))
            self._chosen_cache = cached
        return self.candidates[cached[2]]

    def calibrate(self, x: torch.Tensor) -> None:
        errors = []
        for candidate in self.candidates:
            candidate.calibrate(x)
            candidate.initialized.fill_(True)
            errors.append((candidate.quantize(x) - x).float().pow(2).mean())
        mse = torch.stack(errors)
        self.candidate_mse = mse.detach().to(self.candidate_mse.dtype)
        self.choice = torch.argmin(mse).reshape(())

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.chosen.codes(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.chosen.quantize(x)

    def extra_repr(self) -> str:
        names = [type(c).__name__ for c in self.candidates]
        return f"candidates={names}, choice={type(self.chosen).__name__}, enabled={self.enabled}"
