"""Train the small Swin the tests build (img 56, window 7, depths 2+2, embed 32) on Fashion-MNIST, briefly,
so the export measurements (docs/export.md) compare ONNX Runtime and PyTorch on a model whose logits mean
something. Writes OUT/swin-fmnist.safetensors and OUT/swin-fmnist.json (a vitq model spec).

    .venv/bin/python scripts/train_fmnist_swin.py OUT [--steps 400] [--window-size 4]

``--window-size 4`` makes a Swin whose 14×14 and 7×7 feature maps are padded to whole windows (what
docs/fidelity.md measures stage 2 on).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from core import load_dataset
from core.models import make_spec

SPEC = {"timm_name": "swin_tiny_patch4_window7_224",
        "timm_kwargs": {"img_size": 56, "window_size": 7, "depths": [2, 2], "num_heads": [2, 4], "embed_dim": 32,
                        "num_classes": 10, "in_chans": 1},
        "preprocess": {"mean": [0.286], "std": [0.353], "input_size": [1, 56, 56], "crop_pct": 1.0}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--window-size", type=int, default=SPEC["timm_kwargs"]["window_size"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec_dict = {**SPEC, "timm_kwargs": {**SPEC["timm_kwargs"], "window_size": args.window_size}}
    spec = make_spec(spec_dict)
    torch.manual_seed(0)
    data = load_dataset("fashion-mnist:train", spec.preprocess)
    n = min(args.steps * args.batch, len(data.labels))
    order = torch.randperm(n)
    x = data.images(n)[order]  # the first n training images (the file is not sorted by class), shuffled
    labels = torch.as_tensor(data.labels[:n].astype("int64"))[order]
    model = timm.create_model(spec_dict["timm_name"], **spec_dict["timm_kwargs"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    started = time.perf_counter()
    for step in range(args.steps):
        lr = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.arange(step * args.batch, (step + 1) * args.batch) % n
        loss = torch.nn.functional.cross_entropy(model(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - started:.0f}s", flush=True)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "swin-fmnist.safetensors"))
    (out / "swin-fmnist.json").write_text(json.dumps({**spec_dict, "checkpoint": "swin-fmnist.safetensors"}, indent=2))
    print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f}s; wrote {out}")


if __name__ == "__main__":
    main()
