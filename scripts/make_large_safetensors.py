"""A ~1 GB safetensors for vit_large_patch16_224 (depth 20, 10 classes), written in chunks; values 0.01.

Usage: python scripts/make_large_safetensors.py OUT (for scripts/measure_upload_rss.sh)."""

import json
import sys

import numpy as np
import timm
import torch

name, kwargs, out = "vit_large_patch16_224", {"depth": 20, "num_classes": 10}, sys.argv[1]
with torch.device("meta"):
    state = timm.create_model(name, **kwargs).state_dict()
header, off = {}, 0
for k, t in state.items():
    n = t.numel() * 4
    header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + n]}
    off += n
raw = json.dumps(header).encode()
raw += b" " * (-len(raw) % 8)
chunk = np.full(2 << 20, 0.01, np.float32).tobytes()
with open(out, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    left = off
    while left:
        f.write(chunk[: min(left, len(chunk))])
        left -= min(left, len(chunk))
print(out, off + 8 + len(raw), "bytes", sum(t.numel() for t in state.values()), "parameters")
