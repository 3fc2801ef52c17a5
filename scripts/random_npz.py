"""Write an .npz of random uint8 images and labels, for timing runs where accuracy is beside the point.

Example: ``python scripts/random_npz.py --n 1024 --size 224 --channels 3 --classes 1000 --out rand.npz``
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    x = rng.integers(0, 256, (args.n, args.size, args.size, args.channels), dtype=np.uint8)
    y = rng.integers(0, args.classes, args.n, dtype=np.int64)
    np.savez(args.out, x=x, y=y)


if __name__ == "__main__":
    main()
