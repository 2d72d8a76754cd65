#!/usr/bin/env bash
# The NVIDIA check in one command, on a Linux machine with an NVIDIA GPU and driver:
#
#   scripts/gpu_check.sh [PKG] [--images N] [--profile MIN:OPT:MAX] [--out DIR] ...   (options: --help)
#
# Creates .venv if missing and installs lic-deploy with the `export` and `tensorrt` extras. That needs PyPI and
# NVIDIA's index (https://pypi.nvidia.com) reachable, or the wheels preinstalled in .venv: then set
# SKIP_INSTALL=1 (or point pip at a wheel folder with PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR). The check itself
# (lic_deploy.bench.gpu_check) is given CHECK_TIMEOUT seconds (default 480) and writes DIR/gpu_check.json
# (default out/gpu-check) after every step, so a run cut short still leaves what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
fi
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    "$PY" -m pip install --quiet --extra-index-url https://pypi.nvidia.com -e ".[export,tensorrt]"
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
else
    echo "nvidia-smi: not found (no NVIDIA driver?)"
fi
exec timeout "${CHECK_TIMEOUT:-480}" "$PY" -m lic_deploy.bench.gpu_check "$@"
