"""Does a class-sorted calibration set calibrate like the same images shuffled? (issue 9, item 1)

Writes ``PER_CLASS`` real Fashion-MNIST training images of each class as a class-sorted ImageFolder
(``class_0/0000.png`` …, the order an ImageNet train folder has) and the same images shuffled in an
``.npz``, quantizes ``--model`` from each with the same config, evaluates on ``--eval``, and prints one
table row per source (per-class counts of the calibration sample, top-1, agreement, logit SQNR). With
the first N files taken, the folder would calibrate on its first classes only; with vitq's stratified
sample both rows should agree within run-to-run noise. ``--json`` keeps both reports' summaries.

    python scripts/train_fmnist_vit.py --out models/deit-mini --epochs 2 --train fashion-mnist:train:20000
    python scripts/calibration_order_check.py --model models/deit-mini/model.json --json out/calib-order.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core import QuantConfig, run_quantization
from core.data import load_dataset
from core.models import resolve_model_spec


def write_sources(root: Path, per_class: int, seed: int) -> tuple[Path, Path]:
    """The class-sorted folder and the shuffled ``.npz`` of the same images."""
    train = load_dataset("fashion-mnist:train", resolve_model_spec("fmnist-vit-tiny").preprocess)
    folder, xs, ys = root / "class-sorted", [], []
    for c in range(10):
        members = np.flatnonzero(train.labels == c)[:per_class]
        (folder / f"class_{c}").mkdir(parents=True)
        for j, i in enumerate(members):
            Image.fromarray(train.array[i]).save(folder / f"class_{c}" / f"{j:04d}.png")
            xs.append(train.array[i])
            ys.append(c)
    order = np.random.default_rng(seed).permutation(len(xs))
    npz = root / "shuffled.npz"
    np.savez(npz, x=np.stack(xs)[order], y=np.asarray(ys, dtype=np.int64)[order])
    return folder, npz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="built-in id or model-spec JSON")
    parser.add_argument("--per-class", type=int, default=200, help="images of each class in both sources")
    parser.add_argument("--w-bits", type=int, default=3)
    parser.add_argument("--a-bits", type=int, default=3)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", default="fashion-mnist:test")
    parser.add_argument("--json", help="write both rows here")
    args = parser.parse_args()
    config = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, method="isvit", preset=args.preset,
                         calib_size=args.calib_size, seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitq-calib-order-") as tmp:
        folder, npz = write_sources(Path(tmp), args.per_class, args.seed)
        for name, source in (("class-sorted ImageFolder", folder), ("the same images shuffled in an .npz", npz)):
            started = time.perf_counter()
            report = run_quantization(args.model, config, str(source), args.eval, Path(tmp) / f"out-{len(rows)}",
                                      exports=())
            counts = report["calibration"]["per_class_counts"]
            rows.append({"source": name, "per_class_counts": counts, "fp_top1": report["fp"]["top1"],
                         "top1": report["quant"]["top1"], "agreement": report["quant"]["agreement"],
                         "logit_sqnr_db": report["quant"]["logit_sqnr_db"],
                         "kept": report["baseline_check"]["kept"], "seconds": round(time.perf_counter() - started, 1)})
    print(f"model {args.model}, W{args.w_bits}A{args.a_bits} isvit {args.preset}, {args.calib_size} of "
          f"{10 * args.per_class} images, eval {args.eval}, FP top-1 {100 * rows[0]['fp_top1']:.2f}\n")
    print("| calibration source | per-class counts | top-1 | agreement with FP | logit SQNR (dB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        counts = sorted(r["per_class_counts"].values())
        print(f"| {r['source']} | {counts[0]}–{counts[-1]} each | {100 * r['top1']:.2f} | "
              f"{100 * r['agreement']:.2f} | {r['logit_sqnr_db']:.2f} |")
    print(f"\ndifference in top-1: {100 * abs(rows[0]['top1'] - rows[1]['top1']):.2f} points")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
