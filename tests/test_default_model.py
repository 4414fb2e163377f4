"""The model that ships with kface (``models/data/default``, rebuilt by
``bench/build_default_model.py``): small, complete, used when no --model is given (and
said so), the same answers in its Keras and ONNX forms, its reference correcting counts
out of the box, and a start for a training of one's own (``model.init: default``)."""

import json

import numpy as np
import pytest
from conftest import run_kface

from models.analyzer import DEFAULT_MODEL, FaceAnalyzer


def test_the_shipped_model_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL.iterdir()}
    assert {"model.keras", "model.onnx", "labels.json", "soft_confusion.json"} <= set(files)
    assert sum(files.values()) <= 10 * 2 ** 20, files
    labels = json.loads((DEFAULT_MODEL / "labels.json").read_text())
    assert labels["backbone"] == "mobilefacenet" and labels["crop"]["align"] is True
    assert labels["model_id"] and labels["card"]["name"] and labels["age_calibration"]
    assert set(labels["temperature"]) == {"gender", "age_band"}
    # calibrated on the AAF validation people, the age band with a bias per band
    assert labels["calibration"]["folder"] == "aaf" and len(labels["bias"]["age_band"]) == 4
    reference = json.loads((DEFAULT_MODEL / "soft_confusion.json").read_text())
    assert reference["model"]["id"] == labels["model_id"] and reference["people"] > 900
    # the moments kface stats matches (probabilities and their squares), every class
    assert all(len(row["moments"]["mean"]) == 2 * (len(head["classes"]) - 1)
               for head in reference["heads"].values() for row in head["rows"].values())


def test_predict_without_a_model_uses_the_shipped_one(scenes_dir, tmp_path):
    res = run_kface("predict", str(scenes_dir / "insightface_t1.jpg"), "--out",
                    str(tmp_path / "p"))
    assert res.returncode == 0, res.stderr[-2000:]
    labels = json.loads((DEFAULT_MODEL / "labels.json").read_text())
    assert "no --model: using the shipped model" in res.stderr
    assert labels["card"]["name"] in res.stderr
    made = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert made["model"]["name"] == labels["card"]["name"]
    assert made["model"]["id"] == labels["model_id"] and made["detector"]["kind"] == "yunet"
    faces = made["images"][0]["faces"]
    assert len(faces) == 6 and all(15 <= f["age"] <= 69 and f["landmarks"] for f in faces)
    assert made["model"]["mirror"] is False  # the shipped model's choice (docs/model.md)
    res = run_kface("predict", str(scenes_dir / "insightface_t1.jpg"), "--out",
                    str(tmp_path / "m"), "--mirror")  # the mirror pass, asked for
    assert res.returncode == 0, res.stderr[-2000:]
    mirrored = json.loads((tmp_path / "m" / "predictions.json").read_text())
    assert mirrored["model"]["mirror"] is True
    assert [f["box"] for f in mirrored["images"][0]["faces"]] == [f["box"] for f in faces]
    assert [f["age_band_probs"] for f in mirrored["images"][0]["faces"]] != [
        f["age_band_probs"] for f in faces]
    res = run_kface("stats", str(tmp_path / "p" / "predictions.json"), "--out",
                    str(tmp_path / "s"), "--reference",
                    str(DEFAULT_MODEL / "soft_confusion.json"))
    assert res.returncode == 0, res.stderr[-2000:]  # its own reference: counts corrected
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["estimator"].startswith("mix-corrected") and stats["visitors"] == 6
    assert stats["reference_source"] == "given"
    # no --reference: the shipped model's visitors are corrected with its own, out of the box
    res = run_kface("stats", str(tmp_path / "p" / "predictions.json"), "--out",
                    str(tmp_path / "d"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "shipped model's own reference" in res.stderr
    auto = json.loads((tmp_path / "d" / "stats.json").read_text())
    assert auto["reference_source"] == "the shipped model's own"
    assert {h: auto[h] for h in ("age_band", "gender", "joint")} == {
        h: stats[h] for h in ("age_band", "gender", "joint")}
    res = run_kface("stats", str(tmp_path / "p" / "predictions.json"), "--out",
                    str(tmp_path / "m"), "--summed")  # the summed probabilities, asked for
    assert res.returncode == 0, res.stderr[-2000:]
    summed = json.loads((tmp_path / "m" / "stats.json").read_text())
    assert summed["estimator"].startswith("sum of calibrated") and "reference" not in summed
    res = run_kface("stats", str(tmp_path / "p" / "predictions.json"), "--out",
                    str(tmp_path / "x"), "--summed", "--reference",
                    str(DEFAULT_MODEL / "soft_confusion.json"))
    assert res.returncode == 2 and "not both" in res.stderr and not (tmp_path / "x").exists()


def test_keras_and_onnx_forms_answer_the_same(scenes_dir):
    import cv2

    from models.backends import KerasClassifier, OnnxClassifier

    analyzer = FaceAnalyzer(None)
    assert not analyzer.model.mirror  # the shipped model answers without the mirror pass
    _, crops = analyzer.crops(cv2.imread(str(scenes_dir / "insightface_t1.jpg")))
    for mirror in (False, True):  # without it and with it (--mirror), both forms agree
        keras = KerasClassifier(DEFAULT_MODEL / "model.keras", mirror)(crops)
        onnx = OnnxClassifier(DEFAULT_MODEL / "model.onnx", mirror=mirror)(crops)
        assert set(keras) == set(onnx) == {"gender", "age_band", "age"}
        for head in keras:
            np.testing.assert_allclose(keras[head], onnx[head], atol=1e-4)
    assert not np.allclose(keras["age_band"], analyzer.model(crops)["age_band"], atol=1e-4)


def test_the_shipped_onnx_file_keeps_the_fast_graph():
    """``models.onnx_graph`` has rewritten its PReLUs (no Neg left: ONNX Runtime keeps
    its blocked layout, bench/bench_shipped.py) and it holds the single-view network."""
    import onnx

    graph = onnx.load(str(DEFAULT_MODEL / "model.onnx")).graph
    kinds = {node.op_type for node in graph.node}
    assert "Neg" not in kinds and "ReverseSequence" not in kinds and "Conv" in kinds


def test_a_training_can_start_from_the_shipped_model(shared_data):
    """``model.init: default``: the recipe's trained part takes the shipped model's weights
    layer by layer; a band head without exact ages (K-Face) starts fresh."""
    from models.classifier import ModelConfig, build_parts, initialise, load_classifier

    cfg = ModelConfig(backbone="mobilefacenet", frozen_until="14px", exact_age=False,
                      weights=str(shared_data / "weights" / "mobilefacenet"))
    _, upper = build_parts(cfg, 112)
    started = initialise(upper, "default")
    assert "head_dense" in started and "conv_6dw7_7_conv2d" in started
    assert "age_band" not in started  # K-Face's band head: another shape, trained anew
    shipped = load_classifier(DEFAULT_MODEL / "model.keras", compile=False)

    def weights(model, name):
        for layer in model.layers:
            if layer.name == name:
                return layer.get_weights()
            if hasattr(layer, "layers") and (found := weights(layer, name)) is not None:
                return found
        return None

    for a, b in zip(weights(upper, "head_dense"), weights(shipped, "head_dense"),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(Exception, match="model.init"):
        initialise(upper, "/no/such/model")
