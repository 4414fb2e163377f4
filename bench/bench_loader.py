"""The train stage's input path alone: images/s per worker thread, and through ``fit``.

What a GPU run needs from the input is that it scales with the loader's workers and that
``fit`` takes what it delivers. This measures both without a GPU, on a crop cache of real
AAF faces (224 px, augmented as the train stage augments), each path in the same run:

* **today's loader** (``tasks.crop_stream.crop_batches``): uint8 batches, OpenCV
  augmentation, ``max_queue_size`` twice the workers, no per-batch callback hook;
* **today's loader with decoding processes** (``decoder=DecodeProcesses(...)``,
  ``train.loader: processes``): the same batches, decoded in spawned processes;
* **the previous loader**, kept here as the baseline: float32 batches, the brightness
  shift in NumPy float, at most 4 batches in flight whatever the workers, and a
  per-batch callback hook (which makes Keras wait for every step).

For each, (a) the loader alone (Keras' own enqueuer, the way ``fit`` reads it) and (b)
``fit`` of a no-op model (one Dense layer on a 4x4 average of the image, so the step
costs next to nothing) on the Keras backend given (JAX, as on the GPU machines), with 1,
2, ... workers. ``python bench/bench_loader.py [--faces 6000] [--workers 1 2]
[--batch 64]`` prints a JSON line per measurement and the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402


def previous_loader(index, files, size: int, batch_size: int, augment_cfg, seed: int,
                    workers: int):
    """The loader as it was before the GPU work (issue 31), for the comparison."""
    import cv2

    from models.runtime import load_keras
    from tasks.crop_stream import ChunkCache, decode, epoch_order

    keras = load_keras()
    chunk = index.file.to_numpy(np.int64) * 1_000_000 + index.rg.to_numpy(np.int64)
    targets = {"gender": index.gender_idx.to_numpy(np.int32),
               "age_band": index.age_idx.to_numpy(np.int32)}
    where = index[["file", "rg", "row"]].to_numpy(np.int64)
    cache = ChunkCache(files, 128)

    def augment(image, rng):
        if augment_cfg.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        angle = rng.uniform(-augment_cfg.rotation, augment_cfg.rotation) * 360.0
        scale = 1.0 / rng.uniform(1 - augment_cfg.zoom, 1 + augment_cfg.zoom)
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
        image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        delta = rng.uniform(-augment_cfg.brightness, augment_cfg.brightness) * 255.0
        return np.clip(image.astype(np.float32) + delta, 0, 255)

    class Previous(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=4)
            self.order = epoch_order(chunk, np.random.default_rng(seed), 64)

        def __len__(self):
            return math.ceil(len(index) / batch_size)

        def __getitem__(self, i):
            rows = self.order[i * batch_size:(i + 1) * batch_size]
            rng = np.random.default_rng([seed, 0, i])
            images = np.empty((len(rows), size, size, 3), np.float32)
            for k, r in enumerate(rows):
                file, rg, row = where[r]
                images[k] = augment(decode(cache.get(int(file), int(rg))[row], size), rng)
            return images, {h: t[rows] for h, t in targets.items()}

    return Previous()


def todays_loader(index, files, size, batch_size, augment_cfg, seed, workers):
    from tasks.crop_stream import crop_batches

    return crop_batches(index, files, size, batch_size, seed=seed, augment_cfg=augment_cfg,
                        workers=workers)


def process_loader(index, files, size, batch_size, augment_cfg, seed, workers):
    """Today's loader with ``train.loader: processes``: the decoding in spawned processes."""
    from tasks.crop_stream import DecodeProcesses, crop_batches

    decoder = DecodeProcesses(workers, batch_size, size)
    data = crop_batches(index, files, size, batch_size, seed=seed, augment_cfg=augment_cfg,
                        workers=workers, decoder=decoder)
    data.close = decoder.close  # the caller stops the processes it had made
    return data


def loader_alone(data, batches: int) -> float:
    """images/s read through Keras' enqueuer (threads, bounded queue), as fit reads."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(data, shuffle=False)
    iterator = adapter.get_numpy_iterator()
    images = next(iterator)[0]  # warm-up: threads, first row groups
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        images = next(iterator)[0]
        n += len(images)
    seconds = time.perf_counter() - start
    adapter.on_epoch_end()
    return n / seconds


def through_fit(data, batches: int, batch_hook: bool) -> float:
    """images/s of ``fit`` on a no-op model (the step costs next to nothing)."""
    from models.preprocess import BackbonePreprocess
    from models.runtime import load_keras

    keras = load_keras()
    size = data[0][0].shape[1]
    inputs = keras.Input((size, size, 3))
    x = BackbonePreprocess("unit")(inputs)
    x = keras.layers.AveragePooling2D(size // 4)(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, {"gender": keras.layers.Dense(2, name="gender")(x),
                                 "age_band": keras.layers.Dense(4, name="age_band")(x)})
    model.compile("sgd", loss="sparse_categorical_crossentropy")

    class Hook(keras.callbacks.Callback):  # the previous EpochTimer's per-batch count
        def on_train_batch_end(self, batch, logs=None):
            pass

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:  # after the compile and the first reads
                self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    timer = Timer()
    timer.async_safe = True  # (its hook is a clock read: it adds no wait)
    model.fit(data, epochs=1, steps_per_epoch=batches + 2, verbose=0,
              callbacks=[timer, *([Hook()] if batch_hook else [])])
    return batches * data.batch_size_hint / timer.seconds


def main() -> None:
    from bench_train_scale import _crops, build

    from tasks.crop_stream import AugmentConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=int, default=6000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=40, help="timed batches per run")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--folder", type=Path, default=REPO / "bench" / "out" / "loader")
    args = ap.parse_args()
    folder = args.folder / f"cache-{args.faces}-{args.size}"
    build(folder, args.faces, args.size)
    crops = _crops(folder)
    train = crops.splits["train"]
    augment_cfg = AugmentConfig(rotation=0.08, zoom=0.15, brightness=0.2)
    results = []
    for workers in args.workers:
        for name, make, hook in (("today", todays_loader, False),
                                 ("processes", process_loader, False),
                                 ("previous", previous_loader, True)):
            row = {"loader": name, "workers": workers, "batch": args.batch}
            data = make(train, crops.files, args.size, args.batch, augment_cfg, 777, workers)
            row["alone_images_per_s"] = round(loader_alone(data, args.batches), 1)
            getattr(data, "close", lambda: None)()
            data = make(train, crops.files, args.size, args.batch, augment_cfg, 777, workers)
            data.batch_size_hint = args.batch
            row["fit_images_per_s"] = round(through_fit(data, args.batches, hook), 1)
            getattr(data, "close", lambda: None)()
            print(json.dumps(row), flush=True)
            results.append(row)
    by = {(r["loader"], r["workers"]): r for r in results}
    for workers in args.workers:
        today, previous = by[("today", workers)], by[("previous", workers)]
        processes = by[("processes", workers)]
        print(json.dumps({"workers": workers, "ratio_fit_today_vs_previous": round(
            today["fit_images_per_s"] / previous["fit_images_per_s"], 2),
            "ratio_alone_today_vs_previous": round(
                today["alone_images_per_s"] / previous["alone_images_per_s"], 2),
            "ratio_fit_processes_vs_threads": round(
                processes["fit_images_per_s"] / today["fit_images_per_s"], 2)}))
    first, last = args.workers[0], args.workers[-1]
    if last != first:
        print(json.dumps({"scaling_today_alone": round(
            by[("today", last)]["alone_images_per_s"]
            / by[("today", first)]["alone_images_per_s"], 2),
            "scaling_processes_alone": round(
            by[("processes", last)]["alone_images_per_s"]
            / by[("processes", first)]["alone_images_per_s"], 2),
            "workers": [first, last], "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
