"""YuNet (OpenCV Zoo's 2023mar weights, shipped in ``models/data/`` with its licence):
about five times faster than res10, and it gives five landmarks per face (right eye, left
eye, nose tip, right and left mouth corner; "right" is the person's right, on the image's
left), which ``models.face_crop`` aligns faces with.

Where ONNX Runtime is installed, the shipped weights run on it (``OrtYuNet``), else on
OpenCV's ``cv2.FaceDetectorYN``. ``OrtYuNet`` takes FaceDetectorYN's own steps (the
image padded to a multiple of 32, the three strides decoded, its NMS on integer boxes)
and gives the same rows: measured on 400 AAF photos, the same rows everywhere, the
largest difference 7e-5 (a pixel or a score), tested. It runs the network 1.8-2.4x
faster (4.1 against 7.4 ms a photo on one thread, 300x300). ``KFACE_YUNET_RUNTIME=opencv``
keeps OpenCV's (as does a YuNet file of your own, ``detector.model_path``). ONNX Runtime
checks input
sizes against the file's, which says 640x640, so it reads
``face_detection_yunet_2023mar_any_size.onnx``: the same file with the input's height
and width (and the outputs' anchor count) left open (``any_size``; tested to hold the same
nodes and weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from core.storage import file_sha256
from models.detectors.base import (
    DetectorConfig,
    DetectorError,
    DetectorKind,
    missing_file,
    register,
    strip_scale,
)

if TYPE_CHECKING:  # (cv2 is imported where a network runs: the CLI lists the kinds)
    import cv2

YUNET_MODEL = "face_detection_yunet_2023mar.onnx"
YUNET_ANY_SIZE = "face_detection_yunet_2023mar_any_size.onnx"  # (ONNX Runtime's copy)
ANY_SIZE_SHA256 = "ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0"
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"
RAW_SCORE = 0.3  # rows below this score are never returned
NMS = 0.3  # YuNet's own NMS threshold
TOP_K = 5000
START_SIZE = 300  # the input size it is created with (set per photo)
STRIDES = (8, 16, 32)


@register
class YuNet(DetectorKind):
    name = "yunet"
    description = ("OpenCV's YuNet, about 5x faster, with five landmarks per face (needed "
                   "by crops.align)")
    landmarks = True
    measures_chips = True  # (the chip landmarks of data.folders' chips are YuNet's)
    # clear faces score 0.82-0.95, lower than res10's (docs/detection.md)
    training_confidence, inference_confidence = 0.8, 0.7
    known_sha256 = {
        YUNET_MODEL: "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"}

    def weights(self, cfg: DetectorConfig) -> tuple[Path, ...]:
        model = Path(cfg.model_path) if cfg.model_path else PACKAGE_DATA / YUNET_MODEL
        if not model.is_file():
            raise missing_file(model, default=cfg.model_path is None)
        return (model,)

    def load(self, weights: tuple[Path, ...]) -> cv2.FaceDetectorYN | OrtYuNet:
        import importlib.util
        import os

        import cv2

        any_size = PACKAGE_DATA / YUNET_ANY_SIZE
        if (weights[0] == PACKAGE_DATA / YUNET_MODEL and any_size.is_file()
                and os.environ.get("KFACE_YUNET_RUNTIME", "auto") != "opencv"
                and importlib.util.find_spec("onnxruntime") is not None):
            if file_sha256(any_size) != ANY_SIZE_SHA256:
                raise DetectorError(f"{any_size}: sha256 does not match the one kface "
                                    "shipped: the file is corrupt; reinstall kface-pipeline")
            return OrtYuNet(any_size)
        # raw rows down to RAW_SCORE after YuNet's own NMS at its default 0.3, so that they
        # depend on the input alone; the threshold and our NMS come after
        return cv2.FaceDetectorYN.create(str(weights[0]), "", (START_SIZE, START_SIZE),
                                         RAW_SCORE, NMS, TOP_K)

    def rows(self, net: cv2.FaceDetectorYN | OrtYuNet, image: np.ndarray,
             cfg: DetectorConfig) -> np.ndarray:
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


class OrtYuNet:
    """YuNet on ONNX Runtime, called as ``cv2.FaceDetectorYN`` is (``setInputSize``,
    ``detect(image) -> (1, rows or None)``, rows ``x, y, w, h``, ten landmark coordinates,
    score, in input pixels), by FaceDetectorYN's own steps (OpenCV's
    ``face_detect.cpp``). One thread a network: the readers run one each."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.size = (START_SIZE, START_SIZE)

    def setInputSize(self, size: tuple[int, int]) -> None:  # noqa: N802 (OpenCV's name)
        self.size = tuple(size)

    def detect(self, image: np.ndarray) -> tuple[int, np.ndarray | None]:
        import cv2

        height, width = image.shape[:2]
        if (width, height) != self.size:
            raise ValueError(f"image {width}x{height} is not the input size {self.size}")
        pad_h, pad_w = ((height - 1) // 32 + 1) * 32, ((width - 1) // 32 + 1) * 32
        blob = np.zeros((1, 3, pad_h, pad_w), np.float32)  # BGR, 0..255, zero padding
        blob[0, :, :height, :width] = image.transpose(2, 0, 1)
        out = self.session.run(None, {"input": blob})
        found = []
        for i, stride in enumerate(STRIDES):
            cols = pad_w // stride
            score = np.sqrt(np.clip(out[i][0, :, 0], 0, 1)
                            * np.clip(out[i + 3][0, :, 0], 0, 1))
            keep = np.flatnonzero(score >= RAW_SCORE)
            if not len(keep):
                continue
            cell = np.stack([keep % cols, keep // cols], 1).astype(np.float32)
            box, points = out[i + 6][0, keep], out[i + 9][0, keep].reshape(-1, 5, 2)
            centre = (cell + box[:, :2]) * stride
            size = np.exp(box[:, 2:4]) * stride
            points = (points + cell[:, None, :]) * stride
            found.append(np.column_stack([centre - size / 2, size, points.reshape(-1, 10),
                                          score[keep]]))
        if not found:
            return 1, None
        rows = np.concatenate(found).astype(np.float32)
        if len(rows) > 1:  # (on integer boxes, as OpenCV's Rect2i)
            boxes = [[int(x), int(y), int(w), int(h)] for x, y, w, h in rows[:, :4]]
            kept = cv2.dnn.NMSBoxes(boxes, rows[:, 14].tolist(), RAW_SCORE, NMS, 1.0, TOP_K)
            rows = rows[np.asarray(kept, int).ravel()]
        return 1, rows


def any_size(model) -> None:
    """Leave an ONNX YuNet's input height and width (and its outputs' anchor count) open,
    in place: what ``face_detection_yunet_2023mar_any_size.onnx`` is made of (the nodes
    and weights untouched). ``python -m models.detectors.yunet`` writes that file."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    for output in model.graph.output:
        output.type.tensor_type.shape.dim[1].dim_param = "anchors"
    del model.graph.value_info[:]  # (shapes inferred for 640x640)


if __name__ == "__main__":
    import onnx

    model = onnx.load(str(PACKAGE_DATA / YUNET_MODEL))
    any_size(model)
    onnx.save(model, str(PACKAGE_DATA / YUNET_ANY_SIZE))
