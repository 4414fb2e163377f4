"""Training on cached features: the frozen part of the classifier runs once per face.

With ``model.frozen_until`` the backbone up to a stage end keeps its pretrained weights
(``models.classifier.build_parts``). Its output for a face is then the same in every
epoch, so ``train.feature_cache`` computes it once per face and once per mirrored face
(``cache_features``) and fits only the trained part on those (``feature_batches``). For
MobileFaceNet frozen up to its 14 px stage, the frozen part is about 88% of the network's
work: on 2 CPU cores a step of the trained part is ~8x cheaper than a whole step, and
the cache is computed at ~160 faces/s (docs/training.md has the measured recipe).

The cache lives in the training's own folder (``<model dir>/features/<split>.npy``:
float16, views x faces x the cut's shape, view 0 the face and view 1 its mirror), is
written to a temporary name and renamed once complete, and is read as a memory map, so
a resumed training reuses it. Size: 2 x 25 KB a face at 14 px (14 x 14 x 128), 2 x 6 KB
at 7 px: about 1 GB for the 19,000 training and validation faces of the quality recipe;
at K-Face's 365,000 faces, 18 GB at 14 px (7 px: 4.6 GB), which is why the GPU recipe
fine-tunes everything instead. Augmentation is the mirror only (each epoch takes one
view of each face at random): ``train.augment``'s rotation, zoom and brightness would
change the frozen part's output, so they do not apply (the log says so).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from core.labels import AGES
from core.storage import FILE_MODE
from tasks.crop_stream import Targets, crop_batches, epoch_batches

log = logging.getLogger(__name__)
VIEWS = 2  # the face and its mirror image


def cache_features(lower, index: pd.DataFrame, files: list[Path], size: int, path: Path,
                   batch_size: int = 64, workers: int = 2) -> np.ndarray:
    """The frozen part's output for every face of ``index`` (a split of the crop index)
    and its mirror, as a read-only memory map of ``path`` (computed unless ``path`` holds
    them already)."""
    path = Path(path)
    shape = (VIEWS, len(index), *lower.output.shape[1:])
    if path.exists():
        stored = np.load(path, mmap_mode="r")
        if stored.shape == shape:
            return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    features = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    images = crop_batches(index, files, size, batch_size, labels=False, workers=workers)
    row = 0
    for i in range(len(images)):
        batch = images[i]
        end = row + len(batch)
        features[0, row:end] = np.asarray(lower.predict_on_batch(batch))
        features[1, row:end] = np.asarray(lower.predict_on_batch(batch[:, :, ::-1]))
        row = end
    features.flush()
    del features
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def feature_batches(features: np.ndarray, index: pd.DataFrame, batch_size: int, *,
                    seed: int | None = None, weights: np.ndarray | None = None,
                    age_sigma: float | None = None, age_classes: tuple[int, ...] = AGES,
                    workers: int = 2):
    """A ``keras.utils.PyDataset`` of ``(features float32, targets, weights)`` batches
    over ``index``'s faces. With ``seed`` the faces are shuffled every epoch and each
    batch takes the face or its mirror at random; without, file order and the faces as
    they are (validation)."""
    targets = Targets(index, weights, age_sigma, age_classes)

    def order(epoch: int) -> np.ndarray:
        if seed is None:
            return np.arange(len(index))
        return np.random.default_rng([seed, epoch]).permutation(len(index))

    def batch(order: np.ndarray, i: int, epoch: int):
        rows = np.sort(order[i * batch_size:(i + 1) * batch_size])  # (reads)
        views = (np.random.default_rng([seed, epoch, i]).integers(0, VIEWS, len(rows))
                 if seed is not None else np.zeros(len(rows), np.int64))
        return (np.asarray(features[views, rows], np.float32), *targets(rows))

    return epoch_batches(len(index), batch_size, order, batch, workers)
