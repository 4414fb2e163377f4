import pandas as pd
from conftest import run_kface

from tasks.labels import read_metadata
from tasks.select import DataConfig, SelectionConfig, select_images


def test_sample_data_cli_builds_a_kface_tree(tmp_path, aaf_dir):
    out = tmp_path / "sample"
    res = run_kface("sample-data", "--faces", str(aaf_dir), "--out", str(out),
                    "--subjects", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    photos = sorted((out / "High_Resolution").rglob("*.jpg"))
    assert len(photos) == 3 * 2 * 3 * 3  # subjects x S x L x C
    table, report = select_images(DataConfig(root=out), SelectionConfig())
    assert table.num_rows == 3 * 2 * 2 * 2 and report.unrecognised == 0  # L10, C1 dropped
    import cv2

    assert cv2.imread(str(photos[0])).shape == (576, 864, 3)
    labels = read_metadata(out / "KFace_metadata.csv")
    assert sorted(labels.subject_id) == sorted(set(table.column("subject_id").to_pylist()))
    source = pd.read_csv(aaf_dir / "labels.csv")
    assert set(labels.gender) <= {"M", "F"} and len(source) > 3
    again = run_kface("sample-data", "--faces", str(aaf_dir), "--out", str(out))
    assert again.returncode == 0 and "reusing" in again.stderr


def test_sample_data_without_a_face_folder_uses_the_public_photo(tmp_path):
    """A fresh machine without ../shared: scikit-image's astronaut, synthetic labels, and
    the real detector finds the face in every selected photo."""
    out = tmp_path / "public"
    res = run_kface("sample-data", "--out", str(out), "--subjects", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SYNTHETIC" in res.stderr
    labels = read_metadata(out / "KFace_metadata.csv")
    assert len(labels) == 8 and set(labels.age_band) == {"20s", "30s", "40s", "50s"}
    assert set(labels.gender) == {"M", "F"}
    table, _ = select_images(DataConfig(root=out), SelectionConfig())
    from models.detector import DetectorConfig
    from tasks.detect import detect_images

    found = detect_images(out, table.column("path").to_pylist(), DetectorConfig())
    assert found.num_rows == 64
    assert found.column("status").to_pylist().count("ok") >= 60
