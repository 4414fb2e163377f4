"""The train and evaluate stages on a GPU: ResNet50 at 224 px, mixed precision, the real
``train_model`` and ``evaluation_metrics`` over a crop cache, end to end.

GPU machines often have JAX or PyTorch but no TensorFlow, and no package registry; so:

1. Here, with ../shared and the registry: ``python bench/gpu_train_check.py prepare``
   writes ``bench/out/gpu/``: ``seeds.parquet`` (600 real AAF faces as 224 px JPEG crops
   with their labels, ~9 MB) and ``wheels/`` (keras, pydantic and the few other packages
   the lent machines' image lacks, ~5 MB). Together well under the 64 MiB a device run
   can carry.
2. On the GPU machine: ``bash bench/gpu_train_check.sh`` (installs the wheels into
   ``bench/out/gpu/site`` and runs step 3 with ``KERAS_BACKEND=jax``).
3. ``python bench/gpu_train_check.py run [--faces 60000] [--epochs 2] [--batch 64]``
   builds a K-Face-sized crop cache from the seeds (486 faces a subject, split 90/5/5 by
   subject), trains ResNet50 from scratch with mixed precision, evaluates on the test
   split, and prints JSON: the train stage's images/s of its last epoch (input pipeline
   included, validation excluded), the whole epoch's seconds, GPU memory peak, the
   metrics. The log goes to ``bench/out/gpu/run.log``; commit it as
   ``bench/results-gpu-stage-<gpu>.log``.

Tested on the CPU here: ``KERAS_BACKEND=jax python bench/gpu_train_check.py run --faces
2000 --size 64 --backbone small_cnn --epochs 2`` (no GPU: figures meaningless, path real).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
OUT = REPO / "bench" / "out" / "gpu"
# what tasks.train / tasks.evaluate need that the lent GPU machines' image lacks (it has
# numpy, pandas, pyarrow, opencv, jax, h5py, absl-py, rich, ml-dtypes, pyyaml: KINDS.md)
WHEELS = ["keras==3.15.1", "namex", "optree", "pydantic==2.12.5", "pydantic-core==2.41.5",
          "annotated-types", "typing-inspection"]


def prepare(size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_train_scale import seed_crops

    OUT.mkdir(parents=True, exist_ok=True)
    jpegs, bands, genders = seed_crops(size)
    pq.write_table(pa.table({"image": jpegs, "age_band": bands, "gender": genders}),
                   OUT / "seeds.parquet")
    platforms = [arg for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                               "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                    "cp", *platforms, "-d", str(OUT / "wheels"), *WHEELS], check=True)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(json.dumps({"folder": str(OUT), "mb": round(total / 2 ** 20, 1)}))


def gpu_memory_peak_gb() -> float | None:
    from models.runtime import keras_backend

    try:
        if keras_backend() == "jax":
            import jax

            stats = jax.local_devices()[0].memory_stats() or {}
            return round(stats.get("peak_bytes_in_use", 0) / 1024 ** 3, 2)
        if keras_backend() == "torch":
            import torch

            return round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2)
        import tensorflow as tf

        return round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 1024 ** 3, 2)
    except Exception:  # no GPU (the CPU trial), or a backend without the statistic
        return None


def run(args) -> dict:
    import pyarrow.parquet as pq
    from bench_train_scale import _crops, build

    from models.classifier import ModelConfig, load_classifier
    from models.runtime import accelerators, keras_backend
    from tasks.evaluate import evaluation_metrics
    from tasks.train import TrainConfig, train_model

    seeds = pq.read_table(OUT / "seeds.parquet").to_pydict()
    folder = OUT / f"cache-{args.faces}-{args.size}"
    start = time.perf_counter()
    build(folder, args.faces, args.size, (seeds["image"], seeds["age_band"], seeds["gender"]))
    built = time.perf_counter() - start
    crops = _crops(folder)
    import shutil

    shutil.rmtree(folder / "model", ignore_errors=True)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch, workers=args.workers,
                      mixed_precision="auto", early_stopping_patience=0)
    start = time.perf_counter()
    result = train_model(crops, args.size, ModelConfig(backbone=args.backbone), cfg,
                         folder / "model", folder / "logs")
    trained = time.perf_counter() - start
    history = json.loads((folder / "model" / "history.json").read_text())
    start = time.perf_counter()
    metrics = evaluation_metrics(load_classifier(folder / "model" / "model.keras"), crops,
                                 args.size)
    return {
        "backend": keras_backend(), "gpus": accelerators(), "faces": args.faces,
        "backbone": args.backbone, "size": args.size, "batch": args.batch,
        "train_faces": result["train_examples"], "build_s": round(built, 1),
        "train_s": round(trained, 1), "evaluate_s": round(time.perf_counter() - start, 1),
        "epoch_train_seconds": [round(x, 1) for x in history.get("train_seconds", [])],
        "train_images_per_s_last_epoch": result["last_epoch_train_images_per_s"],
        "gpu_memory_peak_gb": gpu_memory_peak_gb(),
        "test_gender_accuracy": round(metrics["gender"]["accuracy"], 3),
        "test_age_band_accuracy": round(metrics["age_band"]["accuracy"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("--faces", type=int, default=60000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=max(2, (os.cpu_count() or 2) - 2))
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.size)
        return
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    (OUT / "run.log").write_text(text + "\n")


if __name__ == "__main__":
    main()
