"""Crop cache and a tiny real training run on real faces (no Prefect: the stage functions)."""

import json

import cv2
import numpy as np
import pytest

from models.classifier import load_classifier
from models.detector import DetectorConfig
from tasks.crops import CropConfig, crop_images
from tasks.detect import detect_images
from tasks.evaluate import compute_metrics, predict_frame, write_report
from tasks.select import DataConfig, SelectionConfig, select_images
from tasks.train import load_history


def test_cached_crop_equals_a_direct_crop(kface_tree):
    manifest, _ = select_images(DataConfig(root=kface_tree), SelectionConfig())
    rel = manifest.column("path").to_pylist()[5]
    row = detect_images(kface_tree, [rel], DetectorConfig()).to_pylist()[0]
    box = (row["left"], row["top"], row["right"], row["bottom"])
    cached = crop_images(kface_tree, [rel], [box], CropConfig(size=112)).to_pylist()[0]
    decoded = cv2.imdecode(np.frombuffer(cached["image"], np.uint8), cv2.IMREAD_COLOR)
    photo = cv2.imread(str(kface_tree / rel))
    direct = cv2.resize(photo[box[1]:box[3], box[0]:box[2]], (112, 112),
                        interpolation=cv2.INTER_AREA)
    assert decoded.shape == direct.shape == (112, 112, 3)
    assert np.abs(decoded.astype(int) - direct.astype(int)).mean() < 2.0  # JPEG q95 only


def test_tiny_training_writes_every_artifact_and_reloads(tiny_run, tmp_path):
    examples, model_dir = tiny_run["examples"], tiny_run["model_dir"]
    assert tiny_run["merge_report"]["faces"] >= 280
    assert len(examples["train"]) + len(examples["val"]) == len(tiny_run["frame"])
    assert tiny_run["result"]["epochs_run"] == 2
    for name in ("model.keras", "labels.json", "history.json", "history.csv"):
        assert (model_dir / name).exists(), name
    labels = json.loads((model_dir / "labels.json").read_text())
    assert labels["age_band"] == ["20s", "30s", "40s", "50s"] and labels["crop"]["size"] == 64
    assert list((tiny_run["work"] / "logs").rglob("events.out.tfevents.*"))
    model = load_classifier(model_dir / "model.keras")
    probs = predict_frame(model, examples["val"], 64)
    again = predict_frame(load_classifier(model_dir / "model.keras"), examples["val"], 64)
    np.testing.assert_allclose(probs["gender"], again["gender"], atol=1e-6)
    np.testing.assert_allclose(probs["age_band"].sum(1), 1.0, atol=1e-4)
    metrics = compute_metrics(examples["val"], probs)
    assert metrics["examples"] == len(examples["val"])
    assert 0 <= metrics["age_band"]["accuracy"] <= metrics["age_band"][
        "accuracy_within_one_band"] <= 1
    report = write_report(metrics, load_history(model_dir), tiny_run["split_report"],
                          {"joint_class_counts": {}}, tmp_path / "reports")
    for name in ("metrics.json", "confusion_gender.png", "confusion_age_band.png",
                 "confusion_age_band.json", "curve_gender.png", "curve_age_band.png",
                 "curve_loss.png"):
        assert (tmp_path / "reports" / name).stat().st_size > 0, name
    text = report.read_text()
    assert "| gender |" in text and "within one band" in text


def test_legacy_lr_schedule_is_the_originals():
    from tasks.train import legacy_exp_decay

    assert legacy_exp_decay(0) == pytest.approx(0.01)
    assert legacy_exp_decay(1) == pytest.approx(0.009048374180359595)  # the blog's epoch 2
