"""Train a second small ViT on Fashion-MNIST, so fidelity claims are not about the bundled model only.

Writes ``OUT/model.safetensors`` and ``OUT/model.json`` (a vitq model spec: ``vitq quantize --model
OUT/model.json``). The architecture differs from the bundled ``fmnist-vit-tiny`` (timm
``deit_small_patch16_224`` shrunk: embed 96, depth 4, 3 heads, patch 4, 28×28). On two CPU cores a
run of the defaults takes a few minutes.

Example: ``python scripts/train_fmnist_vit.py --out models/fmnist-deit-mini --epochs 2``
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from core.data import load_dataset
from core.evaluate import evaluate
from core.models import Preprocess

TIMM_NAME = "deit_small_patch16_224"
TIMM_KWARGS = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 96, "depth": 4,
               "num_heads": 3}
PREPROCESS = Preprocess(mean=(0.286,), std=(0.353,), input_size=(1, 28, 28))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", default="fashion-mnist:train", help="training data (labelled)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = timm.create_model(TIMM_NAME, pretrained=False, **TIMM_KWARGS)
    train = load_dataset(args.train, PREPROCESS)
    labels = torch.as_tensor(np.array(train.labels), dtype=torch.int64)
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    started, step = time.perf_counter(), 0
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train))
        for start in range(0, len(train), args.batch_size):
            idx = order[start : start + args.batch_size]
            x = train.take(idx.numpy())
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.3f} "
                      f"{time.perf_counter() - started:.0f}s", flush=True)
    model.eval()
    top1 = evaluate(model, load_dataset("fashion-mnist:test", PREPROCESS))["top1"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    spec = {"timm_name": TIMM_NAME, "timm_kwargs": TIMM_KWARGS, "checkpoint": "model.safetensors",
            "preprocess": PREPROCESS.to_dict(), "fp_top1_test": top1,
            "training": f"scripts/train_fmnist_vit.py --epochs {args.epochs} --train {args.train} --batch-size "
                        f"{args.batch_size} --lr {args.lr} --seed {args.seed}: AdamW wd 0.05, one-cycle lr, label "
                        f"smoothing 0.1, horizontal flips; {time.perf_counter() - started:.0f} s"}
    (out / "model.json").write_text(json.dumps(spec, indent=1))
    print(f"test top-1 {100 * top1:.2f}; wrote {out}/model.json")


if __name__ == "__main__":
    main()
