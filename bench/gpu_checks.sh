#!/usr/bin/env bash
# Every GPU check and benchmark, in one call on a lent device machine (see
# docs/PERFORMANCE.md). Needs the wheels the image lacks in .whl/ (diffusers, pydantic, peft):
# carried by the device tool. Results land in $OUT (or ./bench-out).
#   bash bench/gpu_checks.sh [e2e] [cache] [train] [switches] [flow]   (default: the first three)
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
SECTIONS=" ${*:-e2e cache train} "
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
} | tee "$OUT/env.txt"

if [[ $SECTIONS == *" e2e "* ]]; then
  # The real commands on the GPU: cache with the VAE in bf16, then train in bf16 with
  # EMA (kept on the GPU: offload_ema false, the path whose resume must move the EMA
  # back to the device), min-SNR and v-prediction; then resume from step 10 and compare.
  t2i() { python3 -m components.cli "$@" --set train.report_to=none; }
  E=/tmp/e2e; rm -rf $E
  T="--set train.mixed_precision=bf16 --set train.use_ema=true --set train.offload_ema=false"
  T="$T --set train.snr_gamma=5 --set train.prediction_type=v_prediction"
  T="$T --set train.max_train_steps=20 --set train.checkpointing_steps=10"
  T="$T --set train.checkpoints_total_limit=3"
  {
    t2i base-model --out $E/base && t2i pack --source data/sample --out $E/shards &&
    t2i cache --shards $E/shards --model $E/base --out $E/latents &&
    t2i train $T --latents $E/latents --model $E/base --out $E/model --reports $E/train \
      --checkpoints $E/ckpt &&
    cp -r $E/ckpt $E/ckpt2 && rm -rf $E/ckpt2/*/checkpoint-20 &&
    t2i train $T --latents $E/latents --model $E/base --out $E/model2 --reports $E/train2 \
      --checkpoints $E/ckpt2 &&
    python3 - <<'PY'
import json
from safetensors.torch import load_file
f = "unet/diffusion_pytorch_model.safetensors"
a, b = load_file(f"/tmp/e2e/model/{f}"), load_file(f"/tmp/e2e/model2/{f}")
same = all((a[k] == b[k]).all().item() for k in a)
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
m = json.load(open("/tmp/e2e/latents/manifest.json"))["model"]
print(json.dumps({"check": "e2e_resume_cuda", "bit_exact": same, "max_abs_diff": diff,
                  "vae_dtype": m["vae_dtype"],
                  "train": json.load(open("/tmp/e2e/train/train_metrics.json"))}))
PY
  } 2>&1 | grep -v "it/s\]" | tee "$OUT/e2e.txt"
fi

if [[ $SECTIONS == *" cache "* ]]; then
  # VAE moments at 512 px, SD 1.5 VAE architecture: bf16 batch sweep, fp32, and error.
  timeout 120 python3 bench/cache.py --model sd15 --resolution 512 --device cuda --dtype bf16 \
    --batch 8 16 32 64 --steps 5 --warmup 2 --json "$OUT/cache_sd15_bf16.jsonl"
  timeout 60 python3 bench/cache.py --model sd15 --resolution 512 --device cuda --dtype fp32 \
    --batch 16 --steps 5 --warmup 2 --json "$OUT/cache_sd15_fp32.jsonl"
  timeout 60 python3 bench/cache.py --model sd15 --resolution 512 --device cuda \
    --compare-dtypes --json "$OUT/cache_sd15_dtypes.jsonl"
fi

if [[ $SECTIONS == *" train "* ]]; then
  bench() { timeout "$1" python3 bench/train_step.py --device cuda --dtype bf16 "${@:2}"; }
  # SD 1.5 architecture at 512 px (64x64x4 latents): ours vs upstream, and the switches.
  bench 60 --model mini --resolution 128 --batch 32 --steps 8 --warmup 3 \
    --variants upstream base plain_adam --json "$OUT/mini.jsonl"
  bench 200 --model sd15 --resolution 512 --batch 8 16 32 --steps 6 --warmup 3 \
    --variants upstream base --json "$OUT/sd15.jsonl"
  # LoRA vs full fine-tuning (img/s and peak memory), rank 4 and 64.
  bench 200 --model sd15 --resolution 512 --batch 8 32 --steps 6 --warmup 3 \
    --variants base lora --lora-rank 4 --json "$OUT/sd15_lora4.jsonl"
  bench 120 --model sd15 --resolution 512 --batch 32 --steps 6 --warmup 3 \
    --variants lora --lora-rank 64 --json "$OUT/sd15_lora64.jsonl"
  if [[ $SECTIONS == *" switches "* ]]; then
    bench 120 --model sd15 --resolution 512 --batch 32 --steps 6 --warmup 3 \
      --variants plain_adam channels_last grad_ckpt --json "$OUT/sd15_switches.jsonl"
    bench 150 --model sd15 --resolution 512 --batch 16 --steps 8 --warmup 3 \
      --variants compile --json "$OUT/sd15_compile.jsonl"
  fi
fi
if [[ $SECTIONS == *" flow "* ]]; then
  # Flow matching at 1024 px in bf16 (issue 26): an SD3.5-medium-sized MMDiT trained in
  # full and a FLUX.1-sized rank-16 LoRA, ours (cached latents and text states) vs the
  # diffusers scripts' step (VAE + T5-XXL + CLIPs every step), img/s and peak memory.
  fbench() { timeout "$1" python3 bench/flow_step.py --device cuda --dtype bf16 \
    --resolution 1024 --steps 4 --warmup 2 --grad-ckpt "${@:2}"; }
  fbench 240 --model sd35m --batch 1 4 --json "$OUT/flow_sd35m_full.jsonl"
  fbench 300 --model flux --batch 1 2 --lora-rank 16 --json "$OUT/flow_flux_lora16.jsonl"
fi
echo done
