#!/usr/bin/env bash
# On the GPU machine (JAX, no TensorFlow, no registry): install the wheels that
# 'python bench/gpu_train_check.py prepare' put in bench/out/gpu/wheels, then run the
# train and evaluate stages (ResNet50, 224 px, mixed precision) on the JAX backend.
# Device run: carry bench/out/gpu; e.g.  bash bench/gpu_train_check.sh --faces 60000
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=bench/out/gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$GPU"/wheels/*.whl
export PYTHONPATH="$PWD:/tmp/site" KERAS_BACKEND="${KERAS_BACKEND:-jax}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 bench/gpu_train_check.py run "$@" 2>&1 | tee "${OUT:-$GPU}/stdout.log"
cp "$GPU"/run-*.log "${OUT:-$GPU}/" 2>/dev/null || true
