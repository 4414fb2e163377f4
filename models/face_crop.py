"""Cutting a detected face into the classifier's input: the one function that the crop
stage and every inference path call, so that training and serving cut faces alike.

Two ways, chosen by ``CropSpec.align``:

* box crop (the original's): the box with margin, resized to ``size`` x ``size``
  (INTER_AREA; a box that is not square is stretched, as the original did);
* aligned crop: a similarity transform (rotation, uniform scale, translation) that maps
  the five landmarks onto a fixed template, then ``warpAffine`` into ``size`` x ``size``.
  The rotation is the one that makes the eyes level (as the template's are); the scale
  and shift are the least-squares fit of all five points under that rotation. (A free
  five-point least-squares fit, InsightFace's, trades the eye line against the mouth and
  nose: on AAF photos its crops have the found eyes up to 4.5 degrees off level, where
  this fit leaves 0.2; ``bench/measure_alignment.py`` compares the two.) The
  template is InsightFace's 112 px ArcFace template (eyes level, at 46% of the height,
  31% of the width apart) scaled to ``size``: at the default margin 0.2 it shows as much
  around the face as a res10 box crop with that margin (measured on AAF photos: the eyes
  are 0.31 of a box crop's width apart too); another margin scales it about the centre
  by ``1.4 / (1 + 2 * margin)``. Pixels outside the photo are black.

A face without landmarks (res10 finds none) is box-cropped even when ``align`` is on;
``face_crop`` says which it did, and the callers count and report the fallbacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# InsightFace's ArcFace template for a 112 x 112 crop, in LANDMARK_NAMES order (right
# eye, left eye, nose tip, right and left mouth corner; the person's right on the left)
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


class CropError(ValueError):
    """The face cannot be cut (an empty box, or landmarks that fit no transform)."""


@dataclass(frozen=True)
class CropSpec:
    """How faces are cut: the side in pixels, aligned or not, and the margin (the
    detector's) that an aligned crop keeps around the face."""

    size: int
    align: bool = False
    margin: float = 0.2


def crop_face(image_bgr: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """Crop ``box`` = (left, top, right, bottom) from a BGR image; return RGB size x size."""
    left, top, right, bottom = (int(v) for v in box)
    face = image_bgr[top:bottom, left:right]
    if face.size == 0:
        raise CropError(f"empty crop box {tuple(box)} for a {image_bgr.shape[1]}x"
                        f"{image_bgr.shape[0]} image")
    face = cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(face, cv2.COLOR_BGR2RGB)


def alignment_template(size: int, margin: float = 0.2) -> np.ndarray:
    """The five target points in a ``size`` x ``size`` crop (see the module docstring)."""
    return ((ARCFACE_112 / 112.0 - 0.5) * 1.4 / (1.0 + 2.0 * margin) + 0.5) * size


def similarity_transform(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """The 2x3 similarity matrix that maps ``landmarks`` (5 x 2) onto ``template``: the
    rotation that turns the eye line onto the template's, then the scale and shift that
    fit all five points best (least squares)."""
    src = np.asarray(landmarks, np.float64).reshape(5, 2)
    dst = np.asarray(template, np.float64).reshape(5, 2)
    eyes, target = src[1] - src[0], dst[1] - dst[0]
    if not np.isfinite(src).all() or np.hypot(*eyes) < 1e-6:
        raise CropError(f"landmarks {np.round(src, 1).tolist()} fit no transform")
    angle = np.arctan2(target[1], target[0]) - np.arctan2(eyes[1], eyes[0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    turned = src @ rotation.T
    centred, dst_mean = turned - turned.mean(0), dst.mean(0)
    scale = float((centred * (dst - dst_mean)).sum() / (centred ** 2).sum())
    if scale <= 0:
        raise CropError(f"landmarks {np.round(src, 1).tolist()} fit no transform")
    shift = dst_mean - scale * turned.mean(0)
    return np.column_stack([scale * rotation, shift]).astype(np.float32)


def align_face(image_bgr: np.ndarray, landmarks: Sequence[Sequence[float]], size: int,
               margin: float = 0.2) -> np.ndarray:
    """The aligned ``size`` x ``size`` RGB crop of the face with these five landmarks.

    A face shrunk by more than half is first reduced with INTER_AREA (a region around it
    only), as a box crop is, so that small crops of large photos are not aliased."""
    points = np.asarray(landmarks, np.float32).reshape(5, 2)
    matrix = similarity_transform(points, alignment_template(size, margin))
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < 0.5:
        inverse = cv2.invertAffineTransform(matrix)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]],
                           np.float32) @ inverse.T
        h, w = image_bgr.shape[:2]
        x0, y0 = np.clip(np.floor(corners.min(0)).astype(int), 0, [w, h])
        x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int), 0, [w, h])
        if x1 > x0 and y1 > y0:
            factor = 2.0 * scale
            region = cv2.resize(image_bgr[y0:y1, x0:x1], None, fx=factor, fy=factor,
                                interpolation=cv2.INTER_AREA)
            # out = A p + t with p = q / factor + (x0, y0) for q in the reduced region
            a, t = matrix[:, :2], matrix[:, 2]
            matrix = np.column_stack([a / factor, a @ np.float32([x0, y0]) + t])
            image_bgr = region
    face = cv2.warpAffine(image_bgr, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.cvtColor(face, cv2.COLOR_BGR2RGB)


def face_crop(image_bgr: np.ndarray, box_margin: Sequence[int],
              landmarks: Sequence[Sequence[float]] | None, spec: CropSpec
              ) -> tuple[np.ndarray, bool]:
    """The classifier input for one face, and whether it was aligned: aligned when
    ``spec.align`` and the face has landmarks, else the box crop."""
    if spec.align and landmarks is not None:
        return align_face(image_bgr, landmarks, spec.size, spec.margin), True
    return crop_face(image_bgr, box_margin, spec.size), False


def eye_angle(landmarks: Sequence[Sequence[float]]) -> float:
    """Degrees the line from the right eye to the left eye is turned from level
    (positive: the left eye, on the image's right, is lower)."""
    (rx, ry), (lx, ly) = np.asarray(landmarks, np.float64).reshape(5, 2)[:2]
    return float(np.degrees(np.arctan2(ly - ry, lx - rx)))
