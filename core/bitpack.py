"""Dense bit packing of b-bit weight codes: b bits per code, no padding between codes.

Code ``i`` occupies bits ``i·b … i·b + b − 1`` of the byte stream, least significant bit first
(numpy's ``bitorder="little"``). At 4 bits that is the usual nibble layout: byte ``j`` holds code
``2j`` in its low nibble and code ``2j + 1`` in its high nibble; at 3 bits eight codes fill three
bytes. The last byte is zero-padded.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take."""
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (any shape, integer values in [0, 2^bits)) as a 1-D uint8 tensor of packed bits."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    flat = codes.detach().cpu().reshape(-1).to(torch.uint8).numpy()
    if flat.size and int(flat.max()) >= 2**bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    planes = np.empty((flat.size, bits), dtype=np.uint8)
    for k in range(bits):
        planes[:, k] = (flat >> k) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The uint8 codes of ``shape`` that ``pack_codes`` packed; the byte count must match exactly."""
    count = int(np.prod(tuple(shape), dtype=np.int64))
    data = packed.detach().cpu().reshape(-1).to(torch.uint8).numpy()
    if data.size != packed_size(count, bits):
        raise ValueError(f"{data.size} bytes cannot hold exactly {count} codes of {bits} bits")
    planes = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    codes = np.zeros(count, dtype=np.uint8)
    for k in range(bits):
        codes |= planes[:, k] << k
    return torch.from_numpy(codes).reshape(tuple(shape))
