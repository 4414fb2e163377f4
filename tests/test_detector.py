import cv2
import numpy as np
import pytest

from core.images import load_image
from models.detector import (
    DetectorConfig,
    DetectorError,
    FaceDetector,
    add_margin,
    box_iou,
    clip_unit_boxes,
    weights_sha256,
)


@pytest.fixture(scope="module")
def detector():
    return FaceDetector(DetectorConfig())


def test_symmetric_margin():
    assert add_margin((100, 100, 200, 300), 864, 576, 0.2) == (80, 60, 220, 340)


def test_legacy_margin_reproduces_the_original_arithmetic():
    # right grows from the already-moved left (24 px, not 20), bottom gets half the margin
    assert add_margin((100, 100, 200, 300), 864, 576, 0.2, "legacy") == (80, 60, 224, 324)


def test_margin_is_clipped_to_the_image():
    assert add_margin((10, 5, 100, 560), 120, 576, 0.2) == (0, 0, 118, 576)


def test_out_of_range_rows_are_clipped_or_dropped():
    rows = np.array([[-0.1, 0.2, 0.5, 1.3], [0.5, 0.5, 0.4, 0.9], [1.2, 0.1, 1.5, 0.2]])
    boxes, keep = clip_unit_boxes(rows)
    assert keep.tolist() == [True, False, False]
    assert boxes.tolist() == [[0.0, pytest.approx(0.2), 0.5, 1.0]]


def test_group_photo_faces(scenes_dir):
    image = cv2.imread(str(scenes_dir / "insightface_t1.jpg"))
    square = DetectorConfig(input_aspect="square")  # the original's 300x300 input
    assert len(FaceDetector(square.model_copy(update={"confidence": 0.5})).detect(image)) == 6
    assert len(FaceDetector(square).detect(image)) == 5
    faces = FaceDetector(DetectorConfig()).detect(image)  # 300x204: all six above 0.9
    assert len(faces) == 6
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    for f in faces:
        left, top, right, bottom = f.box_margin
        assert left <= f.box[0] and top <= f.box[1] and right >= f.box[2] and bottom >= f.box[3]


def test_overlapping_boxes_of_one_face_are_suppressed(detector, scenes_dir):
    image = cv2.imread(str(scenes_dir / "insightface_Tom_Hanks_54745.png"))
    raw = detector.raw_detections(image)
    assert (raw[:, 0] > 0.9).sum() == 7  # the network's own output: 7 boxes for one face
    assert ((raw[raw[:, 0] > 0.9, 1:] < 0) | (raw[raw[:, 0] > 0.9, 1:] > 1)).any()
    faces = detector.detect(image)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert 0 <= x1 < x2 <= 112 and 0 <= y1 < y2 <= 112


def test_input_keeps_the_aspect_ratio():
    from models.detectors.res10 import blob_size

    # the short side is congruent to 300 modulo 8 (the layers pad as at 300)
    assert blob_size(864, 576) == (300, 204)
    assert blob_size(576, 864) == (204, 300)
    assert blob_size(300, 340) == (268, 300)
    assert blob_size(1280, 886) == (300, 204)
    assert blob_size(864, 576, aspect="square") == (300, 300)
    assert blob_size(4000, 300) == (300, 20)
    assert blob_size(3000, 10) == (300, 12)  # never thinner than 12 px


def test_original_edge_rule_drops_every_row_outside():
    from models.detectors.res10 import original_inside

    rows = np.array([[1, 0.1, 0.0, 0.5, 0.5], [1, 0.0, 0.1, 0.5, 0.5], [1, 0.1, 0.1, 1.0, 0.5],
                     [1, 0.5, 0.5, 1.1, 1.2]], np.float32)
    assert original_inside(rows).tolist() == [True, False, False, False]


def test_tensorflow_weights_agree_with_caffe(detector, shared_data, scenes_dir):
    tf = FaceDetector(DetectorConfig(
        model_path=shared_data / "detector" / "opencv_face_detector_uint8.pb",
        config_path=shared_data / "detector" / "opencv_face_detector.pbtxt"))
    image = cv2.imread(str(scenes_dir / "insightface_t1.jpg"))
    a, b = detector.detect(image), tf.detect(image)
    assert len(a) == len(b)
    for fa in a:
        assert max(box_iou(fa.box, fb.box) for fb in b) > 0.9


def test_corrupt_weights_are_refused(tmp_path, detector):
    from models.detector import resolve_weights

    model, config = resolve_weights(DetectorConfig())
    bad = tmp_path / model.name
    bad.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DetectorError, match="sha256"):
        weights_sha256(DetectorConfig(model_path=bad, config_path=config))
    with pytest.raises(DetectorError, match="not found"):
        FaceDetector(DetectorConfig(model_path=tmp_path / "x.pb", config_path=config))


def test_reduced_decode_agrees_with_full_decode(tmp_path, aaf_dir, detector):
    from tasks.sample_data import compose_photo

    ious = []
    for i, name in enumerate(sorted(p.name for p in aaf_dir.glob("*.jpg"))[:5]):
        face = cv2.imread(str(aaf_dir / name))
        photo = compose_photo(face, i, "L1", "C7", "S001", "E01", size=(4000, 3000))
        path = tmp_path / f"{i}.jpg"
        cv2.imwrite(str(path), photo)
        full, w, h, f1 = load_image(path, min_decode_side=0)
        small, w2, h2, f4 = load_image(path, min_decode_side=600)
        assert (f1, f4, w2, h2) == (1, 4, 4000, 3000) and small.shape[:2] == (750, 1000)
        a = detector.detect(full)[0]
        b = detector.detect(small, w2, h2)[0]
        ious.append(box_iou(a.box, b.box))
    assert min(ious) > 0.95


def test_yunet_on_onnx_runtime_gives_opencvs_rows(shared_data, scenes_dir):
    """``OrtYuNet`` (where ONNX Runtime is installed) and OpenCV's FaceDetectorYN give the
    same raw rows on real faces: portraits at the square input, a group photo, a 720p-size
    frame with the aspect kept; and its any-size file is the shipped one with open input
    sizes, the nodes and weights the same."""
    import cv2
    import pytest

    onnx = pytest.importorskip("onnx")
    from models.detectors.yunet import (
        NMS,
        PACKAGE_DATA,
        RAW_SCORE,
        TOP_K,
        YUNET_ANY_SIZE,
        YUNET_MODEL,
        OrtYuNet,
        any_size,
        input_size,
    )

    original = onnx.load(str(PACKAGE_DATA / YUNET_MODEL))
    any_size(original)
    assert original.SerializeToString() == onnx.load(
        str(PACKAGE_DATA / YUNET_ANY_SIZE)).SerializeToString()
    ours = OrtYuNet(PACKAGE_DATA / YUNET_ANY_SIZE)
    theirs = cv2.FaceDetectorYN.create(str(PACKAGE_DATA / YUNET_MODEL), "", (300, 300),
                                       RAW_SCORE, NMS, TOP_K)
    photos = sorted((shared_data / "faces" / "aaf").glob("*.jpg"))[:40]
    images = [(cv2.imread(str(p)), (300, 300)) for p in photos]
    group = cv2.imread(str(scenes_dir / "insightface_t1.jpg"))
    images += [(group, input_size(group.shape[1], group.shape[0], 640, "keep")),
               (cv2.resize(group, (1280, 720)), (533, 300))]
    found = 0
    for image, size in images:
        resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        ours.setInputSize(size)
        theirs.setInputSize(size)
        a, b = ours.detect(resized)[1], theirs.detect(resized)[1]
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-3)
            found += len(a)
    assert found >= 40 + 6  # a face in each portrait, the group's six at least
