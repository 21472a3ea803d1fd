#!/usr/bin/env bash
# Every GPU check and benchmark, in one call on a lent device machine (see
# docs/PERFORMANCE.md). Needs the wheels the image lacks in .whl/ (diffusers, pydantic,
# xformers): carried by the device tool. Results land in $OUT (or ./bench-out).
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  python3 -c "import xformers, xformers.ops; print('xformers', xformers.__version__)" 2>&1 | tail -1
} | tee "$OUT/env.txt"
bench() { timeout "$1" python3 bench/train_step.py --device cuda --dtype bf16 "${@:2}"; }
SECTIONS=${*:-train cache}
if [[ " $SECTIONS " == *" cache "* ]]; then
  # VAE moments at 512 px, SD 1.5 VAE architecture: bf16 batch sweep, fp32, and error.
  timeout 120 python3 bench/cache.py --model sd15 --resolution 512 --device cuda --dtype bf16 \
    --batch 8 16 32 64 --steps 5 --warmup 2 --json "$OUT/cache_sd15_bf16.jsonl"
  timeout 60 python3 bench/cache.py --model sd15 --resolution 512 --device cuda --dtype fp32 \
    --batch 16 --steps 5 --warmup 2 --json "$OUT/cache_sd15_fp32.jsonl"
  timeout 60 python3 bench/cache.py --model sd15 --resolution 512 --device cuda \
    --compare-dtypes --json "$OUT/cache_sd15_dtypes.jsonl"
fi
[[ " $SECTIONS " == *" train "* ]] || { echo done; exit 0; }
# SD 1.5 architecture at 512 px (64x64x4 latents): ours vs upstream, and the switches.
bench 300 --model sd15 --resolution 512 --batch 8 16 32 --steps 8 --warmup 3 \
  --variants upstream base xformers channels_last fused_adam grad_ckpt --json "$OUT/sd15.jsonl"
bench 150 --model sd15 --resolution 512 --batch 16 --steps 8 --warmup 3 \
  --variants compile --json "$OUT/sd15_compile.jsonl"
bench 60 --model mini --resolution 128 --batch 32 --steps 8 --warmup 3 \
  --variants upstream base --json "$OUT/mini.jsonl"
echo done
