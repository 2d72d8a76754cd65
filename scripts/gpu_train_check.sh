#!/usr/bin/env bash
# Training on a lent NVIDIA machine, prepared to fit a few minutes on an H200:
#   1. the `gpu` tests: a few SOAP and Adam steps on CUDA, resumed bit-exactly (tests/test_train_scale.py);
#   2. `make bench-train` on CUDA at batch 16, 256 px: steps per second and the optimizer part of Adam, SOAP
#      (lic-deploy's, float32 and bfloat16 products) and SOAP (pytorch-optimizer's), the figures of issue 15's
#      goal (SOAP step <= 1.3x Adam's), and the data pipeline's images per second when BENCH_DATA names a folder.
# Writes OUT/gpu_train_check.log (default out/gpu-train-check). Needs lic-deploy's imports on PYTHONPATH (torch
# with CUDA, compressai, pytorch-optimizer, ...); nothing is installed here.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-out/gpu-train-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -m gpu tests/test_train_scale.py -p no:cacheprovider
    echo "gpu tests exit code: $?"
    timeout "${BENCH_TIMEOUT:-240}" "$PY" -m lic_deploy.bench.train_bench --device cuda --batch 16 --patch 256 \
        --steps "${BENCH_STEPS:-3}" --warmup 5 --threads "$(nproc)" \
        ${BENCH_DATA:+--data "$BENCH_DATA"}
    echo "bench-train exit code: $?"
} 2>&1 | tee "$OUT/gpu_train_check.log"
