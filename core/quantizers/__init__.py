"""Fake-quantizers: modules that map a float tensor to its quantized-then-dequantized value.

Every quantizer keeps its parameters (scale, zero point, shift, ranges) in buffers: they are
calibrated once, frozen during reconstruction, and saved in the checkpoint as they are.
"""

from core.quantizers.base import ActQuantizer, round_ste
from core.quantizers.log2 import Log2Quantizer, LogSqrt2Quantizer
from core.quantizers.select import SelectQuantizer
from core.quantizers.sulq import SULQ
from core.quantizers.uniform import UniformQuantizer, mse_range_search

__all__ = [
    "ActQuantizer",
    "round_ste",
    "UniformQuantizer",
    "mse_range_search",
    "Log2Quantizer",
    "LogSqrt2Quantizer",
    "SULQ",
    "SelectQuantizer",
]
