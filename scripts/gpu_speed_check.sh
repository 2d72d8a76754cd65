#!/usr/bin/env bash
# Codec speed on a lent NVIDIA machine (issue 17's GPU goal: decode a 768x512 Kodak image at 30 fps or more with
# mbt2018-mean N=128/M=192, bit-exact against the CPU), prepared to fit about 5 minutes on an H200:
#
#   scripts/gpu_speed_check.sh MODEL.safetensors   (for example a carried copy of mbt128-soap-0.013)
#
# 1. `bench-speed` with PyTorch CUDA FP32 and FP16 (their integer networks on the GPU too) next to ONNX Runtime FP32
#    on the CPU and CompressAI: per-step milliseconds, decode frames per second;
# 2. `gpu_check` on the same model's package: every stage against ORT and streams encoded on the GPU decoded on
#    the CPU and back (identical latents), now with the integer networks on the GPU.
# Writes OUT (default out/gpu-speed-check). Needs lic-deploy's imports on PYTHONPATH; installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/gpu_speed_check.sh MODEL" >&2; exit 2; }
PY=${PY:-python3}
OUT=${OUT:-out/gpu-speed-check}
DATA=${DATA:-${LIC_DEPLOY_DATA:-../shared/data}/kodak}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    timeout "${SPEED_TIMEOUT:-240}" "$PY" -m lic_deploy.bench.speed_bench "$1" --data "$DATA" --images 4 \
        --paths torch-cuda:fp32,torch-cuda:fp16,ort:fp32 --threads "$(nproc)" --out "$OUT/speed"
    echo "speed_bench exit code: $?"
    pkg="$OUT/speed/$(basename "${1%.*}")"
    LIC_DEPLOY_DATA="$(dirname "$DATA")" timeout "${CHECK_TIMEOUT:-200}" "$PY" -m lic_deploy.bench.gpu_check "$pkg" \
        --images 4 --out "$OUT/check"
    echo "gpu_check exit code: $?"
} 2>&1 | tee "$OUT/gpu_speed_check.log"
