"""Several labelled folders in one run, folders of aligned face chips, and exact ages
beyond the bands: selection names each folder, chips join without a detector and land
on the crop template, out-of-band ages only train."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import run_kface

from core.images import ImageError, ImageRoots
from models.face_crop import alignment_template
from tasks.detect import detect_images, measure_chip_landmarks
from tasks.select import DataConfig, LabelledFolder, SelectionConfig, select_images
from tasks.split import SplitConfig, split_faces


def _folder(tmp_path, source, labels: pd.DataFrame, name: str):
    """A labelled folder of links to ``source``'s files, with its labels.csv."""
    folder = tmp_path / name
    folder.mkdir()
    for file in labels.file:
        (folder / file).symlink_to(source / file)
    labels.to_csv(folder / "labels.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def chips_dir(shared_data):
    return shared_data / "faces" / "utkface-64"


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory, aaf_dir, chips_dir, shared_data):
    """40 AAF photos, 30 UTKFace chips (ages 15-69) and 10 AAF photos aged 15-19 / 60-69."""
    tmp = tmp_path_factory.mktemp("folders")
    aaf = _folder(tmp, aaf_dir, pd.read_csv(aaf_dir / "labels.csv").sample(40, random_state=1),
                  "aaf")
    chips = pd.read_csv(chips_dir / "labels.csv")
    chips = pd.concat([chips[chips.age < 20].head(5), chips[chips.age >= 60].head(5),
                       chips[(chips.age >= 20) & (chips.age < 60)].sample(20, random_state=2)])
    utk = _folder(tmp, chips_dir, chips, "utk")
    more_dir = shared_data / "faces" / "aaf-more-ages"
    more = _folder(tmp, more_dir, pd.read_csv(more_dir / "labels.csv").sample(
        10, random_state=3), "more")
    return {"aaf": aaf, "utk": utk, "more": more, "tmp": tmp}


def _data(two_folders, ages=(20, 59)) -> DataConfig:
    return DataConfig(layout="labelled", ages=ages, folders=[
        LabelledFolder(name="aaf", root=two_folders["aaf"]),
        LabelledFolder(name="utk", root=two_folders["utk"], chips=True),
        LabelledFolder(name="more", root=two_folders["more"])])


def test_several_folders_are_one_manifest(two_folders):
    table, report = select_images(_data(two_folders), SelectionConfig())
    rows = table.to_pandas()
    assert set(rows.source) == {"aaf", "utk"}  # "more" holds only ages outside 20-59
    assert all(p.startswith(f"{s}/") for p, s in zip(rows.path, rows.source, strict=True))
    assert all(i.startswith(f"{s}/") for i, s in zip(rows.subject_id, rows.source,
                                                      strict=True))
    # ages outside 20-59 are left out by default (20 of them), kept with data.ages
    assert len(rows) == 60 and report.excluded_labels == 20
    wide, _ = select_images(_data(two_folders, (15, 69)), SelectionConfig())
    wide = wide.to_pandas()
    assert len(wide) == 80 and set(wide.source) == {"aaf", "utk", "more"}
    young, old = wide[wide.age < 20], wide[wide.age >= 60]
    assert len(young) and len(old)
    assert set(young.age_band) == {"20s"} and set(old.age_band) == {"50s"}
    roots = _data(two_folders).image_roots()
    assert roots(rows.path[0]).is_file()
    with pytest.raises(ImageError, match="no labelled folder named 'nope'"):
        roots("nope/x.jpg")


def test_out_of_band_ages_only_train(two_folders):
    table, _ = select_images(_data(two_folders, (15, 69)), SelectionConfig())
    faces = table.to_pandas().assign(joint_class=lambda f: f.age_band + "_" + f.gender)
    split, _ = split_faces(faces, SplitConfig(val_fraction=0.2, test_fraction=0.2))
    outside = faces.age.lt(20) | faces.age.ge(60)
    assert set(split.split[outside.to_numpy()]) == {"train"}
    inside = split.split[~outside.to_numpy()]
    assert {"val", "test"} <= set(inside)
    for source in ("aaf", "utk"):  # each folder is split by person in about the same shares
        assert (faces.source[split.split.eq("test").to_numpy()] == source).any()


def test_chip_geometry_is_measured_and_chips_need_no_detector(chips_dir, two_folders):
    from models.detector import DetectorConfig

    files = sorted(pd.read_csv(chips_dir / "labels.csv").file)
    points, found, tried = measure_chip_landmarks(chips_dir, files, sample=40)
    assert found >= 36 and tried == 40
    points = np.asarray(points)
    # the chips are aligned: eyes level, left-right symmetric, above the mouth
    assert abs(points[0, 1] - points[1, 1]) < 0.02
    assert abs((points[0, 0] + points[1, 0]) / 2 - 0.5) < 0.03
    assert points[3, 1] > points[2, 1] > points[0, 1]
    roots = ImageRoots(two_folders["tmp"], (("utk", two_folders["utk"]),))
    paths = [f"utk/{f}" for f in sorted(pd.read_csv(two_folders["utk"] / "labels.csv").file)]
    # res10 misses some 64 px chips (157 of 200 found on a larger sample; YuNet, which
    # enlarges its input, finds them): chips mode detects nothing and misses none
    plain = detect_images(roots, paths, DetectorConfig()).to_pandas()
    assert (plain.status == "no_face").sum() >= 2
    chips = detect_images(roots, paths, DetectorConfig(),
                          {"utk": points.tolist()}).to_pandas()
    assert (chips.status == "ok").all()
    assert (chips[["left", "top"]] == 0).all().all()
    assert np.allclose(chips.eye_r_x, points[0, 0] * chips.image_width, atol=0.01)


def test_a_run_over_folders_with_chips_trains_the_face_backbone(two_folders, tmp_path,
                                                                 prefect_env, shared_data):
    """select -> evaluate over three folders (one of chips) with MobileFaceNet and ages
    15-69, as the quality recipe runs, at a tiny size."""
    import yaml

    out = tmp_path / "run"
    data = _data(two_folders, (15, 69)).model_dump(mode="json")
    config = tmp_path / "folders.yaml"
    config.write_text(yaml.safe_dump({
        "out": str(out), "data": data, "detector": {"kind": "yunet"},
        "sharding": {"workers": 1}, "split": {"val_fraction": 0.2, "test_fraction": 0.2},
        "crops": {"size": 112, "align": True},
        "model": {"backbone": "mobilefacenet", "exact_age": True, "frozen_until": "14px",
                  "flip_average": True,
                  "weights": str(shared_data / "weights" / "mobilefacenet")},
        "train": {"epochs": 1, "batch_size": 16, "calibration_bias": True,
                  "calibration_folder": "aaf"}}))
    res = run_kface("run", "-c", str(config), env=prefect_env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    detect = json.loads((out / "stages" / "detect.json").read_text())
    geometry = detect["chip_geometry"]["utk"]
    assert geometry["measured"] and geometry["chips_with_a_face"] >= 25
    faces = pq.read_table(out / "faces.parquet").to_pandas()
    assert set(faces.source) == {"aaf", "utk", "more"} and len(faces) >= 78
    chip = faces[faces.source == "utk"].iloc[0]  # the chip's landmarks map onto the template
    crop = pq.read_table(next((out / "crops").glob("shard-*.parquet"))).to_pandas()
    assert crop.error.isna().all()
    labels = json.loads((out / "experiments" / "default" / "model" / "labels.json").read_text())
    assert labels["ages"] == list(range(15, 70)) and labels["backbone"] == "mobilefacenet"
    assert labels["crop"]["align"] is True and labels["crop"]["size"] == 112
    # calibrated on the aaf folder's validation people only, the age band with a bias
    split = pq.read_table(out / "split.parquet").to_pandas().merge(faces, on="path")
    aaf_val = int(((split.split == "val") & (split.source == "aaf")).sum())
    calibration = labels["calibration"]
    assert calibration["folder"] == "aaf" and 0 < aaf_val < (split.split == "val").sum()
    assert calibration["age_band"]["examples"] == calibration["gender"]["examples"] == aaf_val
    assert set(labels["bias"]) == {"age_band"} and len(labels["bias"]["age_band"]) == 4
    assert labels["bias"]["age_band"][-1] == 0.0 and any(labels["bias"]["age_band"][:3])
    model_dir = out / "experiments" / "default" / "model"
    assert not (model_dir / "features").exists()  # the feature cache served the training
    train = json.loads((out / "experiments" / "default" / "stages" / "train.json").read_text())
    assert train["train_examples"] >= 40 and "Report" in res.stdout + res.stderr
    assert chip.eye_r_y == pytest.approx(geometry["landmarks"][0][1] * chip.image_height, 0.01)
    assert alignment_template(112, 0.2)[0][1] == pytest.approx(51.7, abs=0.1)

    # a calibration setting changed: status says so, and the run refits the calibration
    # on the trained network (on every validation person now) without training anew
    from core.storage import file_sha256
    from flows.config import load_config
    from flows.stages import pipeline_status

    network = file_sha256(model_dir / "model.keras")
    evaluated = (out / "experiments" / "default" / "stages" / "evaluate.json").read_text()
    states = {r.stage: r for r in pipeline_status(load_config(
        config, {"train.calibration_folder": None}))}
    assert states["train"].state == "stale" and "refits the calibration" in states[
        "train"].detail and states["evaluate"].state == "stale"
    assert {r.stage: r.state for r in pipeline_status(load_config(
        config, {"train.epochs": 2}))}["train"] == "stale"
    assert "refits" not in {r.stage: r for r in pipeline_status(load_config(
        config, {"train.epochs": 2, "train.calibration_bias": False}))}["train"].detail
    res = run_kface("run", "-c", str(config), "--set", "train.calibration_folder=null",
                    env=prefect_env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert file_sha256(model_dir / "model.keras") == network
    again = json.loads((model_dir / "labels.json").read_text())
    all_val = int((split.split == "val").sum())
    assert again["calibration"]["age_band"]["examples"] == all_val > aaf_val
    assert "folder" not in again["calibration"] and set(again["bias"]) == {"age_band"}
    assert again["model_id"] != labels["model_id"] and again["ages"] == labels["ages"]
    retrain = json.loads((out / "experiments" / "default" / "stages" / "train.json").read_text())
    assert retrain["recalibrated"]["examples"] == all_val and not retrain["reused"]
    assert retrain["work_seconds"] == train["seconds"] > retrain["seconds"]
    assert retrain["epochs_run"] == train["epochs_run"]
    assert (out / "experiments" / "default" / "stages" / "evaluate.json").read_text() != evaluated
    assert "refitted on" in res.stdout + res.stderr
    # without its labels.json (removed by hand) the model is trained anew: status says so
    labels_file = model_dir / "labels.json"
    kept = labels_file.read_bytes()
    labels_file.unlink()
    detail = {r.stage: r for r in pipeline_status(load_config(
        config, {"train.calibration_bias": False}))}["train"].detail
    labels_file.write_bytes(kept)
    assert "refits" not in detail, detail
