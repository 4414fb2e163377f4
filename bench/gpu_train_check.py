"""The train and evaluate stages on a GPU: ResNet50 at 224 px, mixed precision, the real
``train_model`` and ``evaluation_metrics`` over a crop cache, end to end.

GPU machines often have JAX or PyTorch but no TensorFlow, and no package registry; so:

1. Here, with ../shared and the registry: ``python bench/gpu_train_check.py prepare``
   writes ``bench/out/gpu/wheels/`` (keras, pydantic and the few other packages the lent
   machines' image lacks, ~5 MB); ``python bench/gpu_face_model.py prepare`` writes the
   real faces (``faces.parquet``, WebP), 600 of which, enlarged to 224 px, seed the crop
   cache below. Together under the 64 MiB a device run can carry.
2. On the GPU machine: ``bash bench/gpu_train_check.sh`` (installs the wheels into
   ``bench/out/gpu/site`` and runs step 3 with ``KERAS_BACKEND=jax``).
3. ``python bench/gpu_train_check.py run [--faces 60000] [--epochs 2] [--batch 64]``
   builds a K-Face-sized crop cache from the seeds (486 faces a subject, split 90/5/5 by
   subject), trains ResNet50 from scratch with mixed precision, evaluates on the test
   split, and prints JSON: the train stage's images/s of its last epoch (input pipeline
   included, validation excluded), the whole epoch's seconds, GPU memory peak, the
   metrics (``--loader processes``, the default here, or ``threads``: where the crops are
   decoded). The log goes to ``bench/out/gpu/run-<loader>.log``; commit it as
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


def prepare() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
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


def seed_faces(size: int, n: int = 600) -> tuple[list[bytes], list[str], list[str]]:
    """``n`` of the carried real faces (``faces.parquet``), as ``size`` px JPEG crops."""
    import cv2
    import numpy as np
    import pandas as pd

    faces = pd.read_parquet(OUT / "faces.parquet").sample(n, random_state=0)
    jpegs = [cv2.imencode(".jpg", cv2.resize(cv2.imdecode(np.frombuffer(b, np.uint8), 1),
                                             (size, size), interpolation=cv2.INTER_CUBIC),
                          [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for b in faces.image]
    return jpegs, list(faces.age_band), list(faces.gender)


def loaders(args) -> list[dict]:
    """The input path alone (``bench/bench_loader.py``) on this machine's cores: today's
    loader (threads, and decoding processes) and the previous one, by worker count, on
    the crop cache of ``run``."""
    from bench_loader import loader_alone, previous_loader, process_loader, todays_loader
    from bench_train_scale import _crops, build

    from tasks.crop_stream import AugmentConfig

    folder = OUT / f"cache-{args.faces}-{args.size}"
    build(folder, args.faces, args.size, seed_faces(args.size))
    crops = _crops(folder)
    augment = AugmentConfig(rotation=0.08, zoom=0.15, brightness=0.2)
    rows = []
    for workers in args.loader_workers:
        for name, make in (("today", todays_loader), ("processes", process_loader),
                           ("previous", previous_loader)):
            data = make(crops.splits["train"], crops.files, args.size, args.batch, augment,
                        777, workers)
            rows.append({"loader": name, "workers": workers, "batch": args.batch,
                         "alone_images_per_s": round(loader_alone(data, 30), 1)})
            getattr(data, "close", lambda: None)()
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run(args) -> dict:
    from bench_train_scale import _crops, build

    from models.classifier import ModelConfig, load_classifier
    from models.runtime import accelerators, keras_backend
    from tasks.evaluate import evaluation_metrics
    from tasks.train import TrainConfig, train_model

    folder = OUT / f"cache-{args.faces}-{args.size}"
    start = time.perf_counter()
    build(folder, args.faces, args.size, seed_faces(args.size))
    built = time.perf_counter() - start
    crops = _crops(folder)
    import shutil

    shutil.rmtree(folder / "model", ignore_errors=True)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch, workers=args.workers,
                      mixed_precision="auto", early_stopping_patience=0, loader=args.loader)
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
        "loader": args.loader, "workers": args.workers,
        "backbone": args.backbone, "size": args.size, "batch": args.batch,
        "train_faces": result["train_examples"], "build_s": round(built, 1),
        "train_s": round(trained, 1), "evaluate_s": round(time.perf_counter() - start, 1),
        "epoch_train_seconds": [round(x, 1) for x in history.get("train_seconds", [])],
        "epoch_train_images_per_s": [round(x, 1)
                                     for x in history.get("train_images_per_s", [])],
        "train_images_per_s_last_epoch": result["last_epoch_train_images_per_s"],
        "gpu_memory_peak_gb": gpu_memory_peak_gb(),
        "test_gender_accuracy": round(metrics["gender"]["accuracy"], 3),
        "test_age_band_accuracy": round(metrics["age_band"]["accuracy"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prepare", "run", "loaders"])
    ap.add_argument("--faces", type=int, default=60000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=max(2, (os.cpu_count() or 2) - 2))
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[1, 4, 14])
    ap.add_argument("--loader", choices=["threads", "processes"], default="processes")
    args = ap.parse_args()
    if args.step == "prepare":
        prepare()
        return
    if args.step == "loaders":
        (OUT / "loaders.log").write_text(json.dumps(loaders(args), indent=2) + "\n")
        return
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    (OUT / f"run-{args.loader}.log").write_text(text + "\n")


if __name__ == "__main__":
    main()
