"""Training and evaluation input: face crops streamed from the crop shards in bounded chunks.

Memory holds the *index* (each face's path, labels, split and where its crop is: shard
file, row group, row) and at most ``2 x buffer_chunks`` row groups of crop bytes, never
all crops: K-Face's 365,000 faces at 224 px (~6 GB of JPEG) train with an index of a few
tens of MB. Crop shards are written in row groups of ``tasks.crops.CHUNK_ROWS`` crops.

Order: each training epoch shuffles the list of chunks (row groups, spread over every
shard and so over every subject), takes them ``buffer_chunks`` at a time and shuffles the
faces inside that window; batches are consecutive slices of that order. Evaluation reads
only the rows of the split it scores, in file order. Decoding (OpenCV, which releases the
GIL) and augmentation run in ``keras.utils.PyDataset`` worker threads. No ``tf.data``:
the same pipeline feeds TensorFlow, JAX and PyTorch.

What keeps a GPU fed (measured on an H200, docs/training.md): batches are uint8 (the
model casts on the device: a quarter of the bytes to copy and to move to the GPU), the
augmentation runs in OpenCV calls that release the GIL (no float copy of each image), and
``workers`` threads really run in parallel: Keras' enqueuer holds at most
``max_queue_size`` batches in flight, so it is twice the worker count (it was 4, which
capped any number of workers at four). With a ``DecodeProcesses`` (``train.loader:
processes``: one for the training and the validation stream) each batch is decoded and
augmented in one of ``workers`` spawned processes
(``decode_batch``, the same function the threads call, so the batches are the same bit
for bit): the threads then only read the crops' bytes and wait, and the Python work of
decoding leaves the training process's GIL, which its step dispatch needs (on the H200
the loader alone gave 5,189 images/s with 4 threads and 2,766 with 14).
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from core.labels import AGE_BANDS, AGES, GENDERS
from models.classifier import age_targets
from models.runtime import load_keras

SPLITS = ("train", "val", "test")


class AugmentConfig(BaseModel):
    """Training-time augmentation, applied to each crop as the training input streams it."""

    model_config = ConfigDict(extra="forbid")

    flip: bool = True
    rotation: float = Field(0.05, ge=0, le=0.5, description="Max rotation, fraction of 2*pi.")
    zoom: float = Field(0.1, ge=0, lt=1)
    brightness: float = Field(0.1, ge=0, lt=1, description="Max brightness change (0..1).")


class CropSet(NamedTuple):
    """The crop shard files and, per split, the index of their usable crops."""

    files: list[Path]
    splits: dict[str, pd.DataFrame]


def load_index(crop_files: list[Path], faces_path: Path, split_path: Path) -> CropSet:
    """Per split, one row per usable crop: the labels and attributes from ``faces``, the
    split, ``gender_idx``/``age_idx``, and ``file`` (index into ``crop_files``), ``rg``,
    ``row`` (its place in the shard). Reads no image bytes."""
    parts = []
    for file_idx, path in enumerate(crop_files):
        shard = pq.ParquetFile(path)
        sizes = [shard.metadata.row_group(i).num_rows for i in range(shard.num_row_groups)]
        table = shard.read(columns=["path", "error"])
        parts.append(pd.DataFrame({
            "path": table.column("path").to_numpy(zero_copy_only=False),
            "ok": table.column("error").is_null().to_numpy(zero_copy_only=False),
            "file": np.int32(file_idx),
            "rg": np.repeat(np.arange(len(sizes), dtype=np.int32), sizes),
            "row": np.concatenate([np.arange(n, dtype=np.int32) for n in sizes] or [[]]),
        }))
    crops = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["path", "ok", "file", "rg", "row"])
    crops = crops[crops.ok.astype(bool)].drop(columns="ok")
    faces = pq.read_table(faces_path).to_pandas()
    split = pq.read_table(split_path).to_pandas()
    rows = faces.merge(split, on="path").merge(crops, on="path")
    if "age" not in rows:  # faces.parquet written before exact ages were kept
        rows["age"] = np.nan
    rows["gender_idx"] = rows.gender.map(GENDERS.index).astype("int32")
    rows["age_idx"] = rows.age_band.map(AGE_BANDS.index).astype("int32")
    rows = rows.sort_values(["file", "rg", "row"], kind="stable")
    pa.default_memory_pool().release_unused()  # the column reads' buffers, now in pandas
    return CropSet([Path(f) for f in crop_files],
                   {s: rows[rows.split == s].reset_index(drop=True) for s in SPLITS})


def has_exact_ages(*splits: pd.DataFrame) -> bool:
    """Whether every face of the splits (of ``load_index``) has an exact age."""
    return all(s.age.notna().all() for s in splits)


def epoch_order(chunk: np.ndarray, rng: np.random.Generator | None, buffer_chunks: int
                ) -> np.ndarray:
    """Row positions in the order one epoch reads them. ``chunk``: each row's chunk id.
    With ``rng``: chunks shuffled, then rows shuffled within windows of ``buffer_chunks``
    chunks; without: file order."""
    if rng is None:
        return np.arange(len(chunk))
    ids, inverse = np.unique(chunk, return_inverse=True)
    rows_of = np.split(np.argsort(inverse, kind="stable"),
                       np.cumsum(np.bincount(inverse, minlength=len(ids)))[:-1])
    shuffled = rng.permutation(len(ids))
    order = []
    for start in range(0, len(ids), buffer_chunks):
        window = np.concatenate([rows_of[c] for c in shuffled[start:start + buffer_chunks]])
        order.append(rng.permutation(window))
    return np.concatenate(order) if order else np.arange(0)


class ChunkCache:
    """The crop bytes of the most recently used row groups (at most ``capacity``)."""

    def __init__(self, files: list[Path], capacity: int):
        self.files = [str(f) for f in files]
        self.capacity = capacity
        self._chunks: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, file: int, rg: int) -> list[bytes]:
        key = (file, rg)
        with self._lock:
            if key in self._chunks:
                self._chunks.move_to_end(key)
                return self._chunks[key]
        images = (pq.ParquetFile(self.files[file]).read_row_group(rg, columns=["image"])
                  .column(0).to_pylist())
        with self._lock:
            self._chunks[key] = images
            while len(self._chunks) > self.capacity:
                self._chunks.popitem(last=False)
        return images


def crop_jpegs(frame: pd.DataFrame, files: list[Path]) -> list[bytes]:
    """The JPEG bytes of the crops of ``frame``'s rows (for inspection and tests)."""
    cache = ChunkCache(files, 4)
    return [cache.get(int(f), int(g))[int(r)] for f, g, r in zip(frame.file, frame.rg,
                                                                frame.row, strict=True)]


def decode(jpeg: bytes, size: int) -> np.ndarray:
    """RGB uint8 ``size x size x 3`` from a crop's JPEG bytes."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.shape != (size, size, 3):
        raise ValueError(f"a crop is not a {size}x{size} JPEG (got "
                         f"{None if image is None else image.shape}): rebuild the crops stage")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def augment(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flip, rotation (``cfg.rotation`` turns), zoom and brightness, as
    Keras' Random* layers do (edges repeated), with OpenCV on one uint8 image (each call
    releases the GIL; the brightness shift saturates at 0 and 255)."""
    if cfg.flip and rng.random() < 0.5:
        image = cv2.flip(image, 1)
    if cfg.rotation or cfg.zoom:
        size = image.shape[0]
        angle = rng.uniform(-cfg.rotation, cfg.rotation) * 360.0
        scale = 1.0 / rng.uniform(1 - cfg.zoom, 1 + cfg.zoom)
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
        image = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
    if cfg.brightness:
        delta = rng.uniform(-cfg.brightness, cfg.brightness) * 255.0
        image = cv2.add(image, (delta, delta, delta, 0.0))
    return image


def decode_batch(jpegs: list[bytes], size: int, augment_cfg: AugmentConfig | None = None,
                 seed: tuple[int, ...] | None = None, out: np.ndarray | None = None
                 ) -> np.ndarray:
    """One batch of crops, ``(n, size, size, 3)`` RGB uint8 (into ``out`` when given),
    augmented with the random stream of ``seed`` when ``augment_cfg`` is given."""
    rng = (np.random.default_rng(list(seed))
           if augment_cfg is not None and seed is not None else None)
    images = np.empty((len(jpegs), size, size, 3), np.uint8) if out is None else out
    for k, jpeg in enumerate(jpegs):
        image = decode(jpeg, size)
        images[k] = augment(image, augment_cfg, rng) if rng is not None else image
    return images


_ATTACHED: dict[str, SharedMemory] = {}  # a decoding process's view of the batch slots


def _decode_into(slot: str, jpegs: list[bytes], size: int,
                 augment_cfg: AugmentConfig | None, seed: tuple[int, ...] | None) -> int:
    """In a decoding process: ``decode_batch`` straight into the shared-memory slot
    ``slot`` (no copy of the batch through a pipe). Returns the batch's length."""
    shm = _ATTACHED.get(slot)
    if shm is None:
        # (a spawned process shares the training process's resource tracker: the slot
        # stays registered once, and the training process unlinks it)
        shm = SharedMemory(name=slot)
        _ATTACHED[slot] = shm
    out = np.ndarray((len(jpegs), size, size, 3), np.uint8, buffer=shm.buf)
    decode_batch(jpegs, size, augment_cfg, seed, out)
    return len(jpegs)


def _one_opencv_thread() -> None:
    cv2.setNumThreads(1)


class DecodeProcesses:
    """``workers`` spawned processes that decode batches into shared-memory slots (spawn:
    the training process runs JAX or TensorFlow threads, which a fork would copy
    mid-state). A slot per batch being decoded; the caller copies its batch out."""

    def __init__(self, workers: int, batch_size: int, size: int):
        """Processes start on the first batch; ``close()`` (or the object's end) stops
        them and frees the slots."""
        self.size = size
        self.pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_one_opencv_thread)
        self.slots = [SharedMemory(create=True, size=batch_size * size * size * 3)
                      for _ in range(workers + 1)]  # + a direct call from the main thread
        self.free: queue.Queue[SharedMemory] = queue.Queue()
        for slot in self.slots:
            self.free.put(slot)
        self._finalizer = weakref.finalize(self, DecodeProcesses._release, self.pool,
                                           self.slots)

    def decode(self, jpegs: list[bytes], augment_cfg: AugmentConfig | None,
               seed: tuple[int, ...] | None) -> np.ndarray:
        slot = self.free.get()
        try:
            n = self.pool.submit(_decode_into, slot.name, jpegs, self.size, augment_cfg,
                                 seed).result()
            return np.ndarray((n, self.size, self.size, 3), np.uint8, buffer=slot.buf).copy()
        finally:
            self.free.put(slot)

    @property
    def processes(self) -> list:
        return list(self.pool._processes.values()) if self.pool._processes else []

    def close(self) -> None:
        self._finalizer()

    @staticmethod
    def _release(pool: ProcessPoolExecutor, slots: list[SharedMemory]) -> None:
        pool.shutdown(cancel_futures=True)
        for slot in slots:
            slot.close()
            slot.unlink()


class Targets:
    """A split's training targets by row: the class indices, the soft exact-age targets
    (with ``age_sigma``, over the head's ``age_classes``) and the sample weights."""

    def __init__(self, index: pd.DataFrame, weights: np.ndarray | None = None,
                 age_sigma: float | None = None, age_classes: tuple[int, ...] = AGES):
        self.classes = {"gender": index.gender_idx.to_numpy(np.int32),
                        "age_band": index.age_idx.to_numpy(np.int32)}
        self.ages = index.age.to_numpy(np.float32) if age_sigma is not None else None
        self.sigma, self.age_classes = age_sigma, age_classes
        self.weights = (np.ones(len(index), np.float32) if weights is None
                        else np.asarray(weights, np.float32))

    def __call__(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        batch = {h: t[rows] for h, t in self.classes.items()}
        if self.ages is not None:
            batch["age"] = age_targets(self.ages[rows], self.sigma, self.age_classes)
        return batch, self.weights[rows]


def crop_batches(index: pd.DataFrame, files: list[Path], size: int, batch_size: int, *,
                 labels: bool = True, weights: np.ndarray | None = None,
                 augment_cfg: AugmentConfig | None = None, seed: int | None = None,
                 buffer_chunks: int = 64, workers: int = 2, age_sigma: float | None = None,
                 age_classes: tuple[int, ...] = AGES,
                 decoder: DecodeProcesses | None = None):
    """A ``keras.utils.PyDataset`` over ``index`` (one split of ``load_index``).

    Yields ``(images uint8 0..255, {"gender", "age_band"}, weights)`` batches, or only
    the images with ``labels=False``; with ``age_sigma`` the targets also hold ``age``
    (``models.classifier.age_targets`` of the exact ages over the head's
    ``age_classes``). With ``seed`` the order is shuffled every epoch (see
    ``epoch_order``) and ``augment_cfg`` applies, and every batch is full: the last one
    is completed with the epoch's first rows (one batch shape, so JAX and TensorFlow
    compile the train step once, not again for a smaller last batch); without, rows come
    in ``index`` order, each once (what evaluation needs to line predictions up with
    rows). With ``decoder`` (made for ``batch_size`` crops of ``size``), its processes
    decode the batches; its owner closes it."""
    chunk = index.file.to_numpy(np.int64) * 1_000_000 + index.rg.to_numpy(np.int64)
    targets = Targets(index, weights, age_sigma, age_classes)
    where = index[["file", "rg", "row"]].to_numpy(np.int64)
    cache = ChunkCache(files, 2 * buffer_chunks)

    def order(epoch: int) -> np.ndarray:
        rng = None if seed is None else np.random.default_rng([seed, epoch])
        return epoch_order(chunk, rng, buffer_chunks)

    def batch(order: np.ndarray, i: int, epoch: int):
        rows = order[i * batch_size:(i + 1) * batch_size]
        if seed is not None and len(rows) < batch_size:  # one shape: a full batch
            rows = np.concatenate([rows, np.resize(order, batch_size - len(rows))])
        jpegs = [cache.get(int(f), int(g))[r] for f, g, r in where[rows]]
        stream = None if seed is None else (seed, epoch, i)
        images = (decoder.decode(jpegs, augment_cfg, stream) if decoder is not None
                  else decode_batch(jpegs, size, augment_cfg, stream))
        if not labels:
            return images
        return (images, *targets(rows))

    return epoch_batches(len(index), batch_size, order, batch, workers)


def epoch_batches(rows: int, batch_size: int, order: Callable[[int], np.ndarray],
                  batch: Callable[[np.ndarray, int, int], Any], workers: int = 2):
    """The one ``keras.utils.PyDataset`` skeleton of the training inputs (crops and
    cached features): ``ceil(rows / batch_size)`` batches an epoch, ``order(epoch)`` the
    rows' order for that epoch, ``batch(order, i, epoch)`` batch ``i``; ``workers``
    threads, each with a batch in flight."""
    keras = load_keras()

    class EpochBatches(keras.utils.PyDataset):
        def __init__(self):
            # every worker needs a batch in flight (Keras bounds the futures by the queue)
            super().__init__(workers=workers, use_multiprocessing=False,
                             max_queue_size=max(4, 2 * workers))
            self.epoch = 0
            self.order = order(0)

        def __len__(self) -> int:
            return math.ceil(rows / batch_size)

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = order(self.epoch)

        def __getitem__(self, i: int):
            return batch(self.order, i, self.epoch)

    return EpochBatches()
