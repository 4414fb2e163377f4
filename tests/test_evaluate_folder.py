"""``kface evaluate`` on a labelled folder of real faces: the report a user gets for their
own photos, with a Keras model and its ONNX export, and one line for bad input."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_kface
from PIL import Image


@pytest.fixture(scope="module")
def customers(aaf_dir, tmp_path_factory):
    """40 All-Age-Faces people spread over the ages, with their labels.csv."""
    root = tmp_path_factory.mktemp("customers")
    labels = pd.read_csv(aaf_dir / "labels.csv")
    pick = labels.iloc[::97].head(40)
    for name in pick.file:
        (root / name).symlink_to(aaf_dir / name)
    pick.to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def keras_report(tiny_run, customers, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    res = run_kface("evaluate", "--model", str(tiny_run["model_dir"]), "--data-root",
                    str(customers), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return res, out, json.loads((out / "metrics.json").read_text())


def test_the_report_scores_the_folder_with_intervals_age_and_calibration(keras_report):
    res, out, metrics = keras_report
    assert metrics["scored_split"] == "folder" and 36 <= metrics["examples"] <= 40
    assert metrics["left_out"]["photos"] == 40
    assert metrics["examples"] + metrics["left_out"]["no_face"] == 40
    for head in ("gender", "age_band"):
        lo, hi = metrics[head]["ci95"]["accuracy"]
        assert lo <= metrics[head]["accuracy"] <= hi
        assert "majority_class" in metrics[head]["baselines"]
        assert metrics["calibration"][head]["temperature"] > 0
        floor = metrics["calibration"][head]["ece_floor"]  # a calibrated model's ECE here
        assert 0 < floor["mean"] <= floor["p95"] < 1
    assert 0 < metrics["age"]["mae_years"] < 40 and metrics["age"]["examples"] == \
        metrics["examples"]
    assert set(metrics["age"]["signed_error_by_band"]) <= {"20s", "30s", "40s", "50s"}
    text = (out / "report.md").read_text()
    assert "Scored on **folder**" in text and "## Calibration" in text
    assert f"(<= {metrics['calibration']['age_band']['ece_floor']['p95']:.3f})" in text
    assert "mean signed error (predicted - true) per true band" in text
    for png in ("confusion_gender.png", "confusion_age_band.png", "reliability.png"):
        assert (out / png).stat().st_size > 0
    assert "age_band" in res.stdout and "people" in res.stderr
    assert "a calibrated model shows" in res.stderr


def test_the_soft_confusion_corrects_counts_with_kface_stats(keras_report, tiny_run,
                                                             customers, tmp_path):
    """evaluate writes soft_confusion.json (per true class: people, mean and covariance
    of the probabilities); stats --reference counts a predictions file with it, and a
    reference that is not one is one line."""
    _, out, metrics = keras_report
    ref = json.loads((out / "soft_confusion.json").read_text())
    assert ref["people"] == metrics["examples"]
    band = ref["heads"]["age_band"]
    assert band["classes"] == ["20s", "30s", "40s", "50s"]
    assert sum(r["people"] for r in band["rows"].values()) == metrics["examples"]
    for row in band["rows"].values():
        assert abs(sum(row["mean"]) - 1) < 1e-4 and len(row["cov"]) == 4
    assert len(ref["heads"]["joint"]["rows"]) == 8
    photos = sorted(customers.glob("*.jpg"))[:12]
    res = run_kface("predict", *map(str, photos), "--model", str(tiny_run["model_dir"]),
                    "--out", str(tmp_path / "p"))
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_kface("stats", str(tmp_path / "p" / "predictions.json"), "--out",
                    str(tmp_path / "s"), "--reference", str(out / "soft_confusion.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["estimator"].startswith("mix-corrected") and "mix-corrected" in res.stderr
    # the 40 people hold no man in his 40s: the joint cells fall back, and say so
    assert ref["heads"]["joint"]["rows"]["40s_M"]["people"] == 0
    assert any("40s_M" in w and "not corrected" in w for w in stats["warnings"])
    n = stats["visitors"]
    for head in ("age_band", "gender", "joint"):
        cells = stats[head].values()  # (each estimate rounded to 0.1)
        assert abs(sum(c["estimate"] for c in cells) - n) <= 0.05 * len(cells) + 1e-9, head
        assert all(0 <= c["low"] <= c["estimate"] <= c["high"] <= n
                   for c in stats[head].values())
    (tmp_path / "bad.json").write_text(json.dumps({"heads": {}}))
    res = run_kface("stats", str(tmp_path / "p" / "predictions.json"), "--out",
                    str(tmp_path / "s2"), "--reference", str(tmp_path / "bad.json"))
    assert res.returncode == 2 and "is not a soft_confusion.json" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s2").exists()


def test_an_exported_onnx_model_scores_the_same(keras_report, onnx_model, customers, tmp_path):
    _, _, keras = keras_report
    res = run_kface("evaluate", "--model", str(onnx_model), "--data-root", str(customers),
                    "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    onnx = json.loads((tmp_path / "metrics.json").read_text())
    assert onnx["examples"] == keras["examples"]
    for head in ("gender", "age_band"):
        assert onnx[head]["accuracy"] == keras[head]["accuracy"]
    assert onnx["age"]["mae_years"] == pytest.approx(keras["age"]["mae_years"], abs=0.05)


@pytest.mark.parametrize("case", ["no csv", "files missing", "no faces"])
def test_bad_folders_are_one_line(tiny_run, tmp_path, case):
    root = tmp_path / "photos"
    root.mkdir()
    if case == "no csv":
        Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(root / "a.jpg")
    else:
        names = ["a.jpg", "b.jpg", "c.jpg"]
        if case == "no faces":
            for name in names:
                Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(root / name)
        pd.DataFrame({"file": names, "age": [25, 35, 45], "gender": ["M", "F", "M"]}).to_csv(
            root / "labels.csv", index=False)
    says = {"no csv": "labels.csv not found", "files missing": "3 listed files not found",
            "no faces": "no face found in any of the 3 labelled photos"}[case]
    res = run_kface("evaluate", "--model", str(tiny_run["model_dir"]), "--data-root",
                    str(root), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and says in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "report.md").exists()
