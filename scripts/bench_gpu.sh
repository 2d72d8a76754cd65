#!/usr/bin/env bash
# The GPU part of the robustness study, prepared for a lent NVIDIA machine (about 5 minutes on an H200 for two
# N=128 models and the 24 Kodak images):
#
#   scripts/bench_gpu.sh MODEL.safetensors... [extra lic-deploy bench options]
#
# Runs `lic-deploy bench --device cuda --backends torch,tensorrt` (PyTorch CUDA FP32/FP16/BF16; TensorRT
# FP32/FP16/INT8 where TensorRT is installed, else its rows are absent and the report says why) on DATA
# (default $LIC_DEPLOY_DATA/kodak), writes OUT/results.json and OUT/report.md (default out/bench-gpu-cuda),
# under BENCH_TIMEOUT seconds (default 600). Then, on the machine that ran the CPU study, merge both:
#
#   lic-deploy report out/bench-gpu/results.json OUT/results.json -o docs/bench-gpu-merged
#
# Runs merge only over the same images: use all 24 Kodak images here when the CPU run used them.
# INT8 graphs are calibrated with CALIB (default: scikit-image's photos, which travel with scikit-image).
# Nothing is installed here: the machine needs lic-deploy's imports (torch with CUDA, onnx, onnxruntime,
# compressai, constriction, pytorch-optimizer, bjontegaard, pytorch-msssim, matplotlib) on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/bench_gpu.sh MODEL... [bench options]" >&2; exit 2; }
PY=${PY:-python3}
DATA=${DATA:-${LIC_DEPLOY_DATA:-../shared/data}/kodak}
OUT=${OUT:-out/bench-gpu-cuda}
CALIB_ARGS=()
[ -n "${CALIB:-}" ] && CALIB_ARGS=(--calib "$CALIB")
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
else
    echo "nvidia-smi: not found (no NVIDIA driver?)"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout "${BENCH_TIMEOUT:-600}" "$PY" -m lic_deploy bench "$@" --data "$DATA" --device "${DEVICE:-cuda}" \
    --backends torch,tensorrt --precisions fp32,fp16,bf16,int8 --calib-methods minmax "${CALIB_ARGS[@]}" \
    --repeat 5 --warmup 2 --outlier-images 0 --threads "$(nproc)" -o "$OUT"
echo "wrote $OUT/results.json and $OUT/report.md"
