"""The face backbone: InsightFace's MobileFaceNet rebuilt in Keras from its MXNet files
equals the published TFLite conversion on real faces, aligned by YuNet's landmarks
exactly as the crops stage and every inference path align them; bad files are one line."""

import numpy as np
import pytest

from core.images import load_image
from models.classifier import ModelConfig, WeightsError, build_classifier
from models.detector import DetectorConfig, get_detector
from models.face_crop import CropSpec, face_crop
from models.mobilefacenet import (
    INPUT_SIZE,
    PARAMS,
    TFLITE,
    MobileFaceNetError,
    build_mobilefacenet,
    read_params,
    tflite_embeddings,
    weight_files,
)


@pytest.fixture(scope="module")
def weights(shared_data):
    return shared_data / "weights" / "mobilefacenet"


@pytest.fixture(scope="module")
def aligned_faces(aaf_dir):
    """Eight real AAF faces, found by YuNet and aligned to the ArcFace template (the
    recipe's crop: 112 px, margin 0.2)."""
    detector = get_detector(DetectorConfig(kind="yunet"))
    faces = []
    for path in sorted(aaf_dir.glob("*.jpg"))[:8]:
        image = load_image(path)[0]
        face = detector.detect(image)[0]
        crop, aligned = face_crop(image, face.box_margin, face.landmarks,
                                  CropSpec(INPUT_SIZE, True, 0.2))
        assert aligned
        faces.append(crop)
    return np.stack(faces).astype(np.float32)


def test_keras_embedding_equals_the_tflite_file(weights, aligned_faces):
    from models.preprocess import BackbonePreprocess

    network = build_mobilefacenet(weights)
    normalised = np.asarray(BackbonePreprocess("arcface")(aligned_faces))
    ours = network.predict(normalised, verbose=0)
    reference = tflite_embeddings(weights / TFLITE, aligned_faces)
    assert ours.shape == reference.shape == (8, 128)
    assert np.abs(ours - reference).max() < 1e-3
    # different people give different embeddings (the comparison is not trivially 0 = 0)
    cosine = reference @ reference.T / np.outer(*[np.linalg.norm(reference, axis=1)] * 2)
    assert cosine[~np.eye(8, dtype=bool)].max() < 0.9


def test_the_parts_compose_to_the_whole(weights):
    network = build_mobilefacenet(weights)
    lower = build_mobilefacenet(weights, stop="_plus9")
    upper = build_mobilefacenet(weights, start="_plus9")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)
    assert lower.output.shape[1:] == (14, 14, 128)
    np.testing.assert_allclose(upper.predict(lower.predict(x, verbose=0), verbose=0),
                               network.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(MobileFaceNetError, match="cut at a block's end"):  # mid-block
        build_mobilefacenet(weights, start="res_4_block5_conv_sep_relu")


def test_missing_or_changed_files_are_one_line(weights, tmp_path):
    with pytest.raises(MobileFaceNetError, match="not found: set model.weights to builtin"):
        weight_files(tmp_path)
    for name in ("model-y1-test2-symbol.json", PARAMS):
        (tmp_path / name).write_bytes((weights / name).read_bytes())
    data = bytearray((tmp_path / PARAMS).read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / PARAMS).write_bytes(bytes(data))
    with pytest.raises(MobileFaceNetError, match="sha256 .* not the published"):
        weight_files(tmp_path)
    (tmp_path / PARAMS).write_bytes(bytes(data[:1000]))
    with pytest.raises(MobileFaceNetError, match="truncated"):
        read_params(tmp_path / PARAMS)


def test_classifier_on_the_face_backbone(weights):
    cfg = ModelConfig(backbone="mobilefacenet", weights=str(weights), exact_age=True)
    model = build_classifier(cfg, INPUT_SIZE, exact_age=True, ages=tuple(range(15, 70)))
    out = model.predict(np.full((2, 112, 112, 3), 128, np.uint8), verbose=0)
    assert out["age"].shape == (2, 55) and out["age_band"].shape == (2, 4)
    np.testing.assert_allclose(out["age_band"].sum(1), 1, atol=1e-5)  # ages 15-69 folded
    with pytest.raises(WeightsError, match="crops.size: 112"):
        build_classifier(cfg, 160)
    with pytest.raises(WeightsError, match="set model.weights to builtin"):
        build_classifier(cfg.model_copy(update={"weights": "none"}), INPUT_SIZE)
