"""Detection you can trust, measured on real photos: one face per single-person photo, the
chosen box is the placed face (generator ground truth), phantoms rejected, real faces cut
by the frame kept, the group photo's 6 faces. Both detectors (res10, YuNet) pass the same
tests."""

import cv2
import numpy as np
import pytest

from core.boxes import read_box_file
from models.analyzer import inference_detector_config
from models.detector import (
    LANDMARK_COLUMNS,
    DetectorConfig,
    FaceDetector,
    box_iou,
)
from models.detector_quality import count_faces, single_face_summary, truth_agreement
from models.detectors.res10 import phantom_rows
from tasks.detect import detect_images
from tasks.sample_data import TreeSpec, build_kface_tree


def test_phantom_rule_on_the_rows_from_the_issue():
    # one All-Age-Faces photo: the face and a phantom in the lower-right corner, both 1.0
    rows = np.array([[1.0, 0.203, 0.188, 0.821, 0.887], [1.0, 0.527, 0.507, 1.166, 1.229]],
                    np.float32)
    assert phantom_rows(rows).tolist() == [False, True]
    # a second person cut by the right edge, beside (not inside) the face: kept
    beside = np.array([[0.99, 0.07, 0.27, 0.68, 0.89], [0.99, 0.72, 0.02, 1.0, 0.42]],
                      np.float32)
    assert phantom_rows(beside).tolist() == [False, False]
    # a small box inside a large face, or a face around a small box: not copies
    nested = np.array([[0.99, 0.2, 0.2, 0.8, 0.9], [0.95, 0.75, 0.8, 0.95, 1.05],
                       [0.97, 0.05, 0.05, 0.3, 0.3], [0.96, 0.1, 0.1, 0.9, 1.2]], np.float32)
    assert phantom_rows(nested).tolist() == [False, False, False, False]


@pytest.fixture(scope="module")
def aaf_counts(aaf_dir):
    photos = sorted(aaf_dir.glob("*.jpg"))[::8]  # 611 single-person photos
    return count_faces(photos, {
        "train": DetectorConfig(), "inference": inference_detector_config(),
        "yunet_train": DetectorConfig(kind="yunet"),
        "yunet_inference": inference_detector_config(kind="yunet"),
        "clip_all": DetectorConfig(edge_rows="clip", input_aspect="square"),
        "original_drop": DetectorConfig(edge_rows="drop", input_aspect="square")})


def test_one_face_per_single_person_photo(aaf_counts):
    summary = {k: single_face_summary(v) for k, v in aaf_counts.items()}
    print(summary)
    for name in ("train", "inference"):
        assert summary[name]["exactly_one_rate"] >= 0.98, name
    # YuNet finds real people in the background that res10 misses (the boxes it adds
    # between 0.7 and 0.8 were looked at: nearly all are faces; docs/detection.md), so its
    # single-face share is a little lower; it misses almost none
    for name in ("yunet_train", "yunet_inference"):
        assert summary[name]["exactly_one_rate"] >= 0.975, name
        assert summary[name]["none"] <= 0.002 * summary[name]["photos"], name
    # clipping every row (the previous behaviour) turns phantoms into faces: the test
    # photos do provoke phantoms, so the rule above is what removes them
    assert summary["clip_all"]["several"] > 0.3 * summary["clip_all"]["photos"]
    # and the rule keeps the faces the original's drop-everything rule loses
    assert summary["train"]["none"] <= summary["original_drop"]["none"]


@pytest.mark.parametrize("cfg", [DetectorConfig(), inference_detector_config(kind="yunet")],
                         ids=["res10", "yunet"])
def test_faces_cut_by_the_frame_are_kept(aaf_dir, cfg):
    """A face cut by any edge is still one face (the original's rule drops it). Where to
    cut comes from res10's box on the whole photo, the same for both detectors. YuNet
    scores a face cut by a quarter lower than res10 does: at the inference threshold
    (0.8) it keeps 79 of these 80, at the training threshold (0.9) 74 (docs/detection.md)."""
    ours, original = FaceDetector(cfg), FaceDetector(
        DetectorConfig(edge_rows="drop", input_aspect="square"))
    reference = FaceDetector(DetectorConfig())
    kept, dropped = 0, 0
    photos = sorted(aaf_dir.glob("*.jpg"))[5:400:20]
    for path in photos:
        image = cv2.imread(str(path))
        face = reference.detect(image)[0].box
        x1, y1, x2, y2 = face
        cut = (x2 - x1) // 4, (y2 - y1) // 4  # a quarter of the face outside the frame
        for part in (image[:, :x2 - cut[0]], image[:y2 - cut[1]], image[:, x1 + cut[0]:],
                     image[y1 + cut[1]:]):
            part = np.ascontiguousarray(part)
            faces = ours.detect(part)
            kept += len(faces) >= 1
            dropped += len(original.detect(part)) == 0
            assert len(faces) <= 2, path  # no phantom pile-up on the cut photo
    assert kept >= 0.95 * 4 * len(photos)
    assert dropped > 0  # the original's rule loses some of these faces


@pytest.fixture(scope="module")
def truth_tree(tmp_path_factory, aaf_dir):
    root = tmp_path_factory.mktemp("truth")
    build_kface_tree(aaf_dir, root, 150, TreeSpec(
        accessories=("S001", "S002"), lights=("L3",), expressions=("E01", "E02"),
        cameras=("C4", "C19")), seed=7)
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    return root, paths


def test_generator_writes_the_placed_face(truth_tree):
    root, paths = truth_tree
    assert len(paths) == 1200
    boxes = [read_box_file((root / p).with_suffix(".txt")) for p in paths[:8]]
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 864 and 0 <= top < bottom <= 576
    # E02 is the mirror image: the box moves to the mirrored place within the photo
    e1 = [p for p in paths if "/E01/" in p][0]
    e2 = e1.replace("/E01/", "/E02/")
    a, b = read_box_file((root / e1).with_suffix(".txt")), read_box_file(
        (root / e2).with_suffix(".txt"))
    assert a[2] - a[0] == b[2] - b[0] and a[3] - a[1] == b[3] - b[1]


@pytest.mark.parametrize("kind", ["res10", "yunet"])
def test_detect_stage_finds_the_placed_face(truth_tree, kind):
    root, paths = truth_tree
    table = detect_images(root, paths, DetectorConfig(kind=kind)).to_pylist()
    counts = single_face_summary(np.array([r["n_faces"] for r in table]))
    truth = truth_agreement(root, table)
    print(counts, truth)
    assert counts["exactly_one_rate"] >= (0.98 if kind == "res10" else 0.975)  # (above)
    assert truth["rows_with_truth"] >= 0.97 * len(paths)
    assert truth["match_rate"] >= 0.995
    if kind == "yunet":  # every face it finds has its five landmarks inside its box
        for row in table:
            if row["status"] == "ok":
                xs, ys = [row[c] for c in LANDMARK_COLUMNS[::2]], [
                    row[c] for c in LANDMARK_COLUMNS[1::2]]
                assert row["x1"] <= min(xs) and max(xs) <= row["x2"], row
                assert row["y1"] <= min(ys) and max(ys) <= row["y2"], row
        return
    assert all(row["eye_r_x"] is None for row in table)  # res10 finds no landmarks
    # the reference input (300x300, the original's) finds no more faces than ours
    reference = detect_images(root, paths[::4], DetectorConfig(input_aspect="square"))
    ours = [r for r in table[::4]]
    assert sum(r["status"] == "ok" for r in ours) >= sum(
        s == "ok" for s in reference.column("status").to_pylist())


@pytest.mark.parametrize("kind", ["res10", "yunet"])
def test_group_photo_keeps_its_six_faces(scenes_dir, kind):
    image = cv2.imread(str(scenes_dir / "insightface_t1.jpg"))
    faces = FaceDetector(inference_detector_config(kind=kind)).detect(image)
    assert len(faces) == 6
    ours = FaceDetector(DetectorConfig(kind=kind)).detect(image)  # training settings, 0.9
    assert len(ours) == 6
    for f in faces:
        assert max(box_iou(f.box, g.box) for g in ours) > 0.5
