"""Measuring the detector against what is known about the photos (tests and benchmarks).

Two kinds of knowledge:

* single-person photos (All-Age-Faces, K-Face): a correct detector reports one face, so
  the share of photos with exactly one face is the headline (a few photos really show a
  second person at the edge, so 100% is not the goal);
* photos whose face box is known: the K-Face-layout sample generator writes ``Cnn.txt``
  beside each ``Cnn.jpg`` (``tasks.sample_data``), so the face the detect stage chose can
  be compared with the face that was placed.

``MATCH_IOU`` (0.5, the PASCAL VOC criterion) decides "the chosen box is the placed face":
measured on 9,600 composed photos, the placed face's box scores IoU 0.905 on average and
0.76 at the 1st percentile, while a phantom overlaps its face at IoU 0.07-0.15 and a
second person not at all, so 0.5 separates the two with room on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from core.boxes import read_box_file
from core.threads import READERS, ordered_map
from models.detector import DetectorConfig, box_iou, faces_from_rows, get_detector

MATCH_IOU = 0.5


def count_faces(paths: Sequence[Path], configs: dict[str, DetectorConfig],
                threads: int = READERS) -> dict[str, np.ndarray]:
    """Faces found per photo under each named config. Configs that share the network and
    its input (kind, size, aspect, mean) share one forward pass per photo; ``threads``
    threads work on photos at once, each with its own networks."""

    def one(path: Path) -> list[int]:
        image = cv2.imread(str(path))
        if image is None:
            raise ValueError(f"{path}: cannot be decoded")
        h, w = image.shape[:2]
        rows_by_input: dict[tuple, np.ndarray] = {}
        found = []
        for cfg in configs.values():
            key = (cfg.kind, cfg.input_size, cfg.input_aspect, cfg.mean)
            if key not in rows_by_input:
                rows_by_input[key] = get_detector(cfg).raw_detections(image)
            found.append(len(faces_from_rows(rows_by_input[key], w, h, cfg)))
        return found

    rows = np.asarray(list(ordered_map(one, paths, threads)), int).reshape(-1, len(configs))
    return {name: rows[:, i] for i, name in enumerate(configs)}


def turned_photo(image: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The photo turned by ``degrees`` (counter-clockwise) about its centre, on a square
    canvas that keeps all of it (edges replicated), and the 2x3 matrix that carries points
    of the canvas before the turn (``turned_photo(image, 0)``) to their place after it."""
    h, w = image.shape[:2]
    side = int(np.hypot(h, w)) + 2
    canvas = cv2.copyMakeBorder(image, (side - h) // 2, side - h - (side - h) // 2,
                                (side - w) // 2, side - w - (side - w) // 2,
                                cv2.BORDER_REPLICATE)
    matrix = cv2.getRotationMatrix2D((side / 2, side / 2), degrees, 1.0)
    return cv2.warpAffine(canvas, matrix, (side, side), borderMode=cv2.BORDER_REPLICATE), matrix


def single_face_summary(counts: np.ndarray) -> dict:
    """``{"photos", "exactly_one", "none", "several", "exactly_one_rate"}``."""
    n = len(counts)
    one = int((counts == 1).sum())
    return {"photos": n, "exactly_one": one, "none": int((counts == 0).sum()),
            "several": int((counts >= 2).sum()),
            "exactly_one_rate": round(one / n, 4) if n else 0.0}


def truth_agreement(root: Path, rows: Iterable[dict], iou_threshold: float = MATCH_IOU
                    ) -> dict:
    """Compare the chosen box of each ``ok`` detection row (``path``, ``status``, ``x1``,
    ``y1``, ``x2``, ``y2``) with the ground truth ``root/<path>.txt`` beside its photo.

    Returns ``{"rows_with_truth", "matched", "match_rate", "mean_iou", "p01_iou"}``.
    """
    ious = []
    for row in rows:
        if row["status"] != "ok":
            continue
        truth = (Path(root) / row["path"]).with_suffix(".txt")
        if not truth.is_file():
            continue
        ious.append(box_iou((row["x1"], row["y1"], row["x2"], row["y2"]),
                            read_box_file(truth)))
    values = np.asarray(ious)
    matched = int((values >= iou_threshold).sum())
    return {"rows_with_truth": len(values), "matched": matched,
            "match_rate": round(matched / len(values), 4) if len(values) else 0.0,
            "mean_iou": round(float(values.mean()), 4) if len(values) else 0.0,
            "p01_iou": round(float(np.quantile(values, 0.01)), 4) if len(values) else 0.0}
