#!/usr/bin/env bash
# Time the `paper` preset (1024 images, batch 64, 1000 iterations per block per stage) on
# deit_small_patch16_224 with random weights and 1024 random images, W4A4 isvit, on the GPU.
# Usage: scripts/gpu_paper_timing.sh OUTDIR   (python3 must have torch, timm, safetensors, tqdm)
set -uo pipefail
out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available())'
data=$(mktemp -d)
python3 scripts/random_npz.py --n 1024 --size 224 --channels 3 --classes 1000 --out "$data/rand.npz"
start=$(date +%s)
python3 -m vitq.cli bench --model '{"timm_name": "deit_small_patch16_224", "weights": "random"}' --preset paper --bits 4 --methods isvit \
  --calib "$data/rand.npz" --eval "$data/rand.npz" --json "$out/paper-deit-s-w4a4.json" >"$out/bench.log" 2>&1
status=$?
echo "bench exit $status after $(( $(date +%s) - start )) s"
tail -c 3000 "$out/bench.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -15
[ $status -eq 0 ] || exit $status
python3 - "$out/paper-deit-s-w4a4.json" <<'PY'
import json, sys
row = json.load(open(sys.argv[1]))["results"][0]
units = row["reconstruction_units"]
for stage in ("stage1", "stage3"):
    s = row["stage_seconds"][stage]
    print(f"{stage}: {s:.1f} s over {units} units x {row['iters']} iterations = "
          f"{1000 * s / (units * row['iters']):.2f} ms per reconstruction iteration (capture included)")
print("stages:", row["stage_seconds"], "quantize seconds:", row["seconds"])
PY
