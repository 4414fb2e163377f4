"""Aligned face crops on real faces: a face turned by a known angle comes out upright with
its eyes on the template's; large photos give the same crop; faces without landmarks fall
back to the box crop; the crop stage's cache follows the alignment setting."""

import cv2
import numpy as np
import pytest

from core.sharding import Shard
from models.detector import DetectorConfig, FaceDetector
from models.detector_quality import turned_photo
from models.face_crop import (
    CropSpec,
    align_face,
    alignment_template,
    crop_face,
    eye_angle,
    face_crop,
    similarity_transform,
)
from tasks.crops import CropConfig, crop_images, crop_shard_key

SIZE = 160


@pytest.fixture(scope="module")
def yunet():
    return FaceDetector(DetectorConfig(kind="yunet", confidence=0.5))


def turned(detector: FaceDetector, photo: np.ndarray, degrees: float):
    """The photo turned by ``degrees`` and where the face's five landmarks truly are in it:
    the detector's landmarks on the upright photo (its best case), carried by the known
    rotation."""
    truth = np.asarray(detector.detect(turned_photo(photo, 0)[0])[0].landmarks)
    turned_image, matrix = turned_photo(photo, degrees)
    return turned_image, np.c_[truth, np.ones(5)] @ matrix.T


def mapped(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return np.c_[np.asarray(points).reshape(5, 2), np.ones(5)] @ np.asarray(matrix).T


@pytest.mark.parametrize("degrees", [-30, -12, 12, 30])
def test_a_turned_face_comes_out_upright_at_the_template(aaf_dir, yunet, degrees):
    """Given where the landmarks are, the aligned crop of a turned face has its eyes level
    (within 2 degrees) at the template's eye positions, and is the crop of the upright
    photo."""
    template = alignment_template(SIZE)
    for path in sorted(aaf_dir.glob("*.jpg"))[40:640:150]:
        photo = cv2.imread(str(path))
        turned_photo, truth = turned(yunet, photo, degrees)
        assert abs(eye_angle(truth)) > abs(degrees) - 12  # it is turned
        matrix = similarity_transform(truth, template)
        eyes = mapped(truth, matrix)[:2]
        assert abs(eye_angle([*eyes, *template[2:]])) <= 2.0, path
        assert np.abs(eyes - template[:2]).max() <= 0.03 * SIZE, (path, eyes)
        # the pixels agree: the crop of the turned photo is the upright photo's crop
        upright_photo, upright_truth = turned(yunet, photo, 0)
        crop = align_face(turned_photo, truth, SIZE)
        reference = align_face(upright_photo, upright_truth, SIZE)
        inside = np.s_[SIZE // 5:-SIZE // 5, SIZE // 5:-SIZE // 5]  # the face, no corners
        assert np.abs(crop[inside].astype(int) - reference[inside]).mean() < 6, path


def test_yunet_landmarks_turn_the_face_back_most_of_the_way(aaf_dir, yunet):
    """With the landmarks YuNet finds on the turned photo, alignment removes most of a 12
    degree turn. YuNet's landmarks on turned faces lean towards upright (measured: the
    eye line it finds is turned about half as much as the face; docs/detection.md), so
    the crop keeps part of the turn."""
    left, kept = [], []
    for path in sorted(aaf_dir.glob("*.jpg"))[40:1640:100]:
        for degrees in (-12, 12):
            turned_photo, truth = turned(yunet, cv2.imread(str(path)), degrees)
            found = yunet.detect(turned_photo)[0].landmarks
            matrix = similarity_transform(found, alignment_template(SIZE))
            left.append(abs(eye_angle(mapped(truth, matrix))))
            kept.append(abs(eye_angle(truth)))
    assert np.mean(left) < 0.6 * np.mean(kept), (np.mean(left), np.mean(kept))


def test_a_large_photo_gives_the_same_aligned_crop(aaf_dir, yunet):
    """Faces shrunk by more than half are reduced with INTER_AREA first: the crop of an
    8x enlarged photo equals the crop of the photo itself."""
    photo = cv2.imread(str(sorted(aaf_dir.glob("*.jpg"))[10]))
    face = yunet.detect(photo)[0]
    big = cv2.resize(photo, None, fx=8, fy=8, interpolation=cv2.INTER_CUBIC)
    small_crop = align_face(photo, face.landmarks, 96)
    big_crop = align_face(big, np.asarray(face.landmarks) * 8 + 3.5, 96)  # pixel centres
    difference = np.abs(small_crop.astype(int) - big_crop.astype(int)).mean()
    assert difference < 6, difference


def test_faces_without_landmarks_fall_back_to_the_box_crop(aaf_dir):
    photo = cv2.imread(str(sorted(aaf_dir.glob("*.jpg"))[10]))
    res10 = FaceDetector(DetectorConfig()).detect(photo)[0]
    assert res10.landmarks is None
    crop, aligned = face_crop(photo, res10.box_margin, None, CropSpec(SIZE, align=True))
    assert not aligned
    np.testing.assert_array_equal(crop, crop_face(photo, res10.box_margin, SIZE))


def test_crop_stage_aligns_and_keys_on_the_landmarks(aaf_dir, yunet):
    paths = [p.name for p in sorted(aaf_dir.glob("*.jpg"))[20:24]]
    faces = [yunet.detect(cv2.imread(str(aaf_dir / p)))[0] for p in paths]
    boxes = [list(f.box_margin) for f in faces]
    points = [np.asarray(f.landmarks).tolist() for f in faces]
    aligned = crop_images(aaf_dir, paths, boxes, CropConfig(size=64, align=True), points)
    plain = crop_images(aaf_dir, paths, boxes, CropConfig(size=64), points)
    for a, b, face, path in zip(aligned.to_pylist(), plain.to_pylist(), faces, paths,
                                strict=True):
        assert a["error"] is None and b["error"] is None
        decoded = cv2.imdecode(np.frombuffer(a["image"], np.uint8), cv2.IMREAD_COLOR)
        expected = align_face(cv2.imread(str(aaf_dir / path)), face.landmarks, 64)
        jpeg_error = np.abs(decoded[..., ::-1].astype(int) - expected).mean()
        assert jpeg_error < 4 and a["image"] != b["image"]

    shard = Shard("h000", tuple(paths), (1,) * 4, (2,) * 4)
    box_key = crop_shard_key(shard, boxes, CropConfig(size=64))
    # without landmarks (res10) the aligned setting cuts box crops: the same key
    assert crop_shard_key(shard, boxes, CropConfig(size=64, align=True)) == box_key
    assert crop_shard_key(shard, boxes, CropConfig(size=64), points) == box_key
    aligned_key = crop_shard_key(shard, boxes, CropConfig(size=64, align=True), points)
    assert aligned_key != box_key
    moved = [[[x + 1, y] for x, y in face] for face in points]
    assert crop_shard_key(shard, boxes, CropConfig(size=64, align=True), moved) != aligned_key
    assert crop_shard_key(shard, boxes, CropConfig(size=64, align=True), points,
                          margin=0.3) != aligned_key
