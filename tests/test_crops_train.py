"""Crop cache and a tiny real training run on real faces (no Prefect: the stage functions)."""

import json

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from models.classifier import ModelConfig, load_classifier
from models.detector import DetectorConfig
from tasks.crops import CropConfig, crop_images, crop_shard
from tasks.detect import detect_images, plan_shards
from tasks.evaluate import compute_metrics, predict_frame, write_report
from tasks.labels import merge_faces
from tasks.select import DataConfig, SelectionConfig, select_images
from tasks.split import SplitConfig, split_faces
from tasks.train import TrainConfig, load_examples, load_history, train_model


@pytest.fixture(scope="module")
def labelled_faces(tmp_path_factory, aaf_dir):
    """300 real AAF faces as a labelled folder, selected, detected and merged."""
    root = tmp_path_factory.mktemp("aaf300")
    labels = pd.read_csv(aaf_dir / "labels.csv").sample(300, random_state=3)
    for f in labels.file:
        (root / f).symlink_to(aaf_dir / f)
    labels.to_csv(root / "labels.csv", index=False)
    manifest, _ = select_images(DataConfig(root=root, layout="labelled"), SelectionConfig())
    detections = detect_images(root, manifest.column("path").to_pylist(), DetectorConfig())
    faces, report = merge_faces(manifest.to_pandas(), detections.to_pandas(), None)
    assert report["faces"] >= 280
    return root, faces


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


def test_tiny_training_writes_every_artifact_and_reloads(labelled_faces, tmp_path):
    root, faces = labelled_faces
    frame = faces.to_pandas()
    split, split_report = split_faces(frame, SplitConfig())
    pq.write_table(faces, tmp_path / "faces.parquet")
    pq.write_table(pd.DataFrame(split).pipe(lambda d: __import__("pyarrow").Table.from_pandas(
        d, preserve_index=False)), tmp_path / "split.parquet")
    crops_dir = tmp_path / "crops"
    for shard in plan_shards(faces, 100):
        boxes = [frame.set_index("path").loc[p, ["left", "top", "right", "bottom"]].tolist()
                 for p in shard.paths]
        crop_shard(root, shard, boxes, CropConfig(size=64), crops_dir)
    examples = load_examples(crops_dir, tmp_path / "faces.parquet", tmp_path / "split.parquet")
    assert len(examples["train"]) + len(examples["val"]) == len(frame)
    model_dir = tmp_path / "model"
    result = train_model(examples, 64, ModelConfig(backbone="small_cnn"),
                         TrainConfig(epochs=2, batch_size=32), model_dir, tmp_path / "logs")
    assert result["epochs_run"] == 2
    for name in ("model.keras", "labels.json", "history.json", "history.csv"):
        assert (model_dir / name).exists(), name
    assert json.loads((model_dir / "labels.json").read_text())["age_band"] == [
        "20s", "30s", "40s", "50s"]
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    model = load_classifier(model_dir / "model.keras")
    probs = predict_frame(model, examples["val"], 64)
    again = predict_frame(load_classifier(model_dir / "model.keras"), examples["val"], 64)
    np.testing.assert_allclose(probs["gender"], again["gender"], atol=1e-6)
    np.testing.assert_allclose(probs["age_band"].sum(1), 1.0, atol=1e-4)
    metrics = compute_metrics(examples["val"], probs)
    assert metrics["examples"] == len(examples["val"])
    assert 0 <= metrics["age_band"]["accuracy"] <= metrics["age_band"][
        "accuracy_within_one_band"] <= 1
    report = write_report(metrics, load_history(model_dir), split_report,
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
