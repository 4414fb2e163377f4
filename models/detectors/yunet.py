"""YuNet (``cv2.FaceDetectorYN``, OpenCV Zoo's 2023mar weights, shipped in
``models/data/`` with its licence): about five times faster than res10, and it gives five
landmarks per face (right eye, left eye, nose tip, right and left mouth corner; "right" is
the person's right, on the image's left), which ``models.face_crop`` aligns faces with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from models.detectors.base import (
    DetectorConfig,
    DetectorKind,
    missing_file,
    register,
    strip_scale,
)

if TYPE_CHECKING:  # (cv2 is imported where a network runs: the CLI lists the kinds)
    import cv2

YUNET_MODEL = "face_detection_yunet_2023mar.onnx"
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"
RAW_SCORE = 0.3  # rows below this score are never returned
START_SIZE = 300  # the input size it is created with (set per photo)


@register
class YuNet(DetectorKind):
    name = "yunet"
    description = ("OpenCV's YuNet, about 5x faster, with five landmarks per face (needed "
                   "by crops.align)")
    landmarks = True
    # clear faces score 0.82-0.95, lower than res10's (docs/detection.md)
    training_confidence, inference_confidence = 0.8, 0.7
    known_sha256 = {
        YUNET_MODEL: "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"}

    def weights(self, cfg: DetectorConfig) -> tuple[Path, ...]:
        model = Path(cfg.model_path) if cfg.model_path else PACKAGE_DATA / YUNET_MODEL
        if not model.is_file():
            raise missing_file(model, default=cfg.model_path is None)
        return (model,)

    def load(self, weights: tuple[Path, ...]) -> cv2.FaceDetectorYN:
        import cv2

        # raw rows down to RAW_SCORE after YuNet's own NMS at its default 0.3, so that they
        # depend on the input alone; the threshold and our NMS come after
        return cv2.FaceDetectorYN.create(str(weights[0]), "", (START_SIZE, START_SIZE),
                                         RAW_SCORE, 0.3, 5000)

    def rows(self, net: cv2.FaceDetectorYN, image: np.ndarray, cfg: DetectorConfig
             ) -> np.ndarray:
        import cv2

        height, width = image.shape[:2]
        size = input_size(width, height, cfg.input_size, cfg.input_aspect)
        net.setInputSize(size)
        _, out = net.detect(cv2.resize(image, size, interpolation=cv2.INTER_AREA))
        if out is None:
            return np.zeros((0, 15), np.float32)
        out = out.astype(np.float32)
        xy = out[:, :14] / np.tile(np.float32(size), 7)  # x, y, w, h, then five (x, y)
        return np.column_stack([out[:, 14], xy[:, 0], xy[:, 1], xy[:, 0] + xy[:, 2],
                                xy[:, 1] + xy[:, 3], xy[:, 4:14]])


def input_size(width: int, height: int, long_side: int,
               aspect: Literal["keep", "square"]) -> tuple[int, int]:
    """YuNet's input ``(width, height)``: the long side ``long_side``, the aspect kept
    (the network takes any size: it pads to a multiple of 32 itself), or squashed square
    (a strip wider than 2:1 keeps its aspect instead: ``strip_scale``)."""
    scale = long_side / max(width, height)
    if aspect == "square":
        strip = strip_scale(width, height, long_side)
        if strip is None:
            return long_side, long_side
        scale = strip
    return max(1, round(width * scale)), max(1, round(height * scale))
