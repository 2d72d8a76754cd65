#!/usr/bin/env bash
# Issue 15's GPU checks in one call on a lent NVIDIA machine, prepared to fit about 10 minutes of an H200:
#   1. scripts/gpu_train_check.sh: the `gpu` tests and `make bench-train` on CUDA at batch 16, 256 px;
#   2. scripts/gpu_step_variants.py: SOAP with its CUDA graph (moments in place or foreach) and eager, against Adam,
#      and a profile of its eigenbasis update;
#   3. `make models-gpu`'s command (model_set --preset gpu) on the data packed by scripts/gpu_pack.py (.gpu-data:
#      half the training photos at 320 px, the first 6 Kodak images), each run stopped after GPU_SECONDS (default
#      180: the recipe's 420 does not fit one call with the rest).
# Here, first: PYTHONPATH=. .venv/bin/python scripts/gpu_pack.py --data ../shared/data/train --val ../shared/data/kodak
# Then the device call (carry .whl and .gpu-data, timeout 600 s): python3 -m pip install -q --no-index --no-deps
#   --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
#   bash scripts/gpu_models.sh
# Writes OUT (default out/gpu-models): three logs, the model cards and training logs (models-gpu-cards.tgz) and the
# three lambda-0.013 models (at most 8 files come back from a lent machine, 16 MiB each).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-models}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu-data/train ] || { echo ".gpu-data/train is missing: run scripts/gpu_pack.py first" >&2; exit 2; }
OUT="$OUT" TEST_TIMEOUT=${TEST_TIMEOUT:-120} BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} BENCH_DATA=.gpu-data/train bash scripts/gpu_train_check.sh
timeout "${VARIANTS_TIMEOUT:-120}" python3 scripts/gpu_step_variants.py --profile 2>&1 | tee "$OUT/gpu_step_variants.log"
echo "gpu_step_variants exit code: $?"
start=$(date +%s)
timeout "${MODELS_TIMEOUT:-300}" python3 -m lic_deploy.train.model_set --preset gpu --max-seconds "${GPU_SECONDS:-180}" \
    --data .gpu-data/train --val .gpu-data/kodak --runs /tmp/lic-runs/gpu --models models-gpu 2>&1 \
    | tee "$OUT/models_gpu.log"
echo "models-gpu exit code: $?, $(( $(date +%s) - start )) s" | tee -a "$OUT/models_gpu.log"
tar czf "$OUT/models-gpu-cards.tgz" models-gpu/*.md models-gpu/*.jsonl /tmp/lic-runs/gpu/*.jsonl 2>/dev/null
cp models-gpu/mbt128-adam-0.013.safetensors models-gpu/mbt128-soap-0.013.safetensors \
    models-gpu/mbt128-soap-eq-0.013.safetensors "$OUT/" 2>/dev/null
ls -la "$OUT"
