"""Input-pipeline benchmark: images/s delivered to the model per epoch.

(a) the original: ``read_file -> decode_jpeg -> crop_to_bounding_box -> resize(224) ->
resnet50.preprocess_input`` of every full 864x576 photo, every epoch; (b) ours: the train
stage's input, 224x224 face crops streamed from a crop shard and decoded in worker
threads (``tasks.crop_stream``; preprocessing is inside the model). Same faces, same
machine, same run. ``python bench/bench_input.py [--subjects 6] [--epochs 2]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from bench_detect import make_tree  # noqa: E402

from core.storage import write_parquet_atomic  # noqa: E402
from models.detector import DetectorConfig  # noqa: E402
from tasks.crop_stream import crop_batches  # noqa: E402
from tasks.crops import CHUNK_ROWS, CropConfig, crop_images  # noqa: E402
from tasks.detect import detect_images  # noqa: E402


def original_dataset(root: Path, faces: pd.DataFrame, batch: int):
    import tensorflow as tf

    def load(path, left, right, top, bottom):
        img = tf.io.read_file(path)
        img = tf.image.decode_jpeg(img, channels=3)
        img = tf.image.crop_to_bounding_box(img, top, left, bottom - top, right - left)
        img = tf.image.resize(img, (224, 224))
        return tf.keras.applications.resnet50.preprocess_input(img)

    paths = [str(root / p) for p in faces.path]
    data = tf.data.Dataset.from_tensor_slices((paths, faces.left, faces.right, faces.top,
                                               faces.bottom))
    return (data.shuffle(len(paths)).map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch).prefetch(tf.data.AUTOTUNE))


def rate(dataset, n: int, epochs: int) -> float:
    for _ in dataset.take(2):  # warm-up: thread pools, first file reads
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in dataset:
            pass
    return n * epochs / (time.perf_counter() - start)


def rate_streamed(dataset, n: int, epochs: int) -> float:
    """img/s of the train stage's streamed batches as ``fit`` takes them (its worker
    threads included)."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(dataset, shuffle=False)
    for _ in adapter.get_numpy_iterator():  # warm-up epoch: first file reads
        break
    adapter.on_epoch_end()
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in adapter.get_numpy_iterator():
            pass
        adapter.on_epoch_end()
    return n * epochs / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=6, help="x81 photos at 864x576")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args()
    root = args.work / f"tree-{args.subjects}"
    paths = make_tree(root, args.subjects)
    det = detect_images(root, paths, DetectorConfig()).to_pandas()
    faces = det[det.status == "ok"].reset_index(drop=True)
    table = crop_images(root, faces.path.tolist(),
                        faces[["left", "top", "right", "bottom"]].to_numpy().tolist(),
                        CropConfig(size=224))
    crops = table.to_pandas()
    shard = args.work / "input-crops" / "shard-bench.parquet"
    write_parquet_atomic(shard, table, row_group_size=CHUNK_ROWS, digest=False)  # as crops
    index = faces.assign(file=0, rg=np.arange(len(faces)) // CHUNK_ROWS,
                         row=np.arange(len(faces)) % CHUNK_ROWS, gender_idx=0, age_idx=0)
    ours = crop_batches(index, [shard], 224, 32, seed=1)  # streamed, as the train stage
    original = original_dataset(root, faces, 32)
    r_orig = rate(original, len(faces), args.epochs)
    r_ours = rate_streamed(ours, len(faces), args.epochs)
    print(json.dumps({"faces": len(faces), "epochs": args.epochs,
                      "original_img_s": round(r_orig, 1), "ours_img_s": round(r_ours, 1),
                      "ratio": round(r_ours / r_orig, 2),
                      "crop_cache_mb": round(crops.image.map(len).sum() / 2**20, 1)},
                     indent=2))


if __name__ == "__main__":
    main()
