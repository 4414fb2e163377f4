"""ResNet50 training speed of our classifier on a GPU (the original: 160 ms per batch of
32 on its GPU, i.e. 200 img/s). Runs on any Keras 3 backend; on the lent H100/H200 there
is no TensorFlow, so: ``KERAS_BACKEND=jax python bench/bench_gpu_train.py``.

Times ``model.fit`` on in-memory random images (the input pipeline is benchmarked
separately in bench_input.py), after one warm-up epoch that compiles the step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from models.classifier import ModelConfig, build_classifier  # noqa: E402


def measure(policy: str, batch: int, steps: int, size: int = 224) -> dict:
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = build_classifier(ModelConfig(backbone="resnet50"), size)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss={"gender": "sparse_categorical_crossentropy",
                        "age_band": "sparse_categorical_crossentropy"},
                  metrics={"gender": ["accuracy"], "age_band": ["accuracy"]})
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * steps, size, size, 3)).astype("float32")
    y = {"gender": rng.integers(0, 2, len(x)), "age_band": rng.integers(0, 4, len(x))}
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)  # compiles
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - start
    return {"policy": policy, "batch": batch, "img_s": round(len(x) / seconds, 1),
            "ms_per_step": round(1000 * seconds / steps, 1),
            "first_epoch_s_incl_compile": round(compile_s, 1)}


def main() -> None:
    results = {"backend": keras.backend.backend(), "devices": [], "runs": []}
    if keras.backend.backend() == "jax":
        import jax

        results["devices"] = [str(d) for d in jax.devices()]
    for policy, batch in (("float32", 32), ("mixed_bfloat16", 32), ("mixed_bfloat16", 128)):
        run = measure(policy, batch, steps=int(os.environ.get("STEPS", "40")))
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
