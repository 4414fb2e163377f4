#!/usr/bin/env bash
# On a lent GPU machine (JAX, no TensorFlow, no registry), carrying bench/out/gpu (see
# bench/gpu_train_check.py and bench/gpu_face_model.py for what 'prepare' puts there):
#   bash bench/gpu_session.sh resnet   # issue 31: the loader alone by workers, then the
#                                      # train stage, ResNet50 224 px, bf16, 60,000 faces
#   bash bench/gpu_session.sh face     # issue 28: MobileFaceNet fully fine-tuned, 2 learning
#                                      # rates x 3 seeds in parallel, chosen on the run's own
#                                      # test people, the chosen scored on the held-out fifth
# Logs (and the chosen face models) go to $OUT (the device tool's folder) or bench/out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=bench/out/gpu
LOG="${OUT:-$GPU}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$GPU"/wheels/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" KERAS_BACKEND="${KERAS_BACKEND:-jax}" PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc; python3 -c "import jax, keras; print(jax.__version__, keras.__version__, jax.devices())"
} >> "$LOG/$1.log" 2>&1
case "$1" in
  resnet)
    python3 bench/gpu_train_check.py loaders --faces 60000 --batch 256 \
      --loader-workers 1 4 14 >> "$LOG/resnet.log" 2>&1
    for loader in processes threads; do  # train.loader: the decoding's place
      python3 bench/gpu_train_check.py run --faces 60000 --epochs 2 --batch 256 \
        --loader $loader >> "$LOG/resnet.log" 2>&1
    done
    ;;
  face)
    python3 bench/gpu_face_model.py build --cache /tmp/face-cache >> "$LOG/face.log" 2>&1
    export XLA_PYTHON_CLIENT_PREALLOCATE=false  # six trainings share the GPU
    runs=()
    for lr in 1e-3 2e-4; do for seed in 777 2 3; do
      run=/tmp/fm-$lr-$seed; runs+=("$run")
      timeout "${TRAIN_TIMEOUT:-330}" python3 bench/gpu_face_model.py train \
        --cache /tmp/face-cache --lr $lr --seed $seed --out "$run" --workers 2 \
        > "$run.log" 2>&1 &
    done; done
    wait
    for run in "${runs[@]}"; do echo "== $run"; tail -n 3 "$run.log"; done >> "$LOG/face.log"
    python3 bench/gpu_face_model.py choose --runs "${runs[@]}" --log "$LOG/face-model.log" \
      >> "$LOG/face.log" 2>&1
    lr=$(python3 -c "import json; print(json.load(open('$LOG/face-model.log'))['chosen_lr'])")
    for run in "${runs[@]}"; do
      [[ "$run" == /tmp/fm-*-* ]] && python3 -c "import json,sys; sys.exit(json.load(open('$run/dev.json'))['lr'] != $lr)" 2>/dev/null \
        && cp "$run/model/model.keras" "$LOG/$(basename "$run").keras"
    done
    ;;
esac
