import os
from pathlib import Path

import pytest

from core.labels import age_to_band
from tasks.select import (
    DataConfig,
    DatasetError,
    SelectionConfig,
    is_selected,
    parse_kface_path,
    select_images,
)


def make_empty_tree(root: Path, subjects=("19062421", "19101513"), accessories=6, lights=30,
                    expressions=3, cameras=20) -> None:
    for sid in subjects:
        for s in range(1, accessories + 1):
            for light in range(1, lights + 1):
                for e in range(1, expressions + 1):
                    d = root / "High_Resolution" / sid / f"S{s:03d}" / f"L{light}" / f"E{e:02d}"
                    d.mkdir(parents=True)
                    for c in range(1, cameras + 1):
                        (d / f"C{c}.jpg").touch()
                    (d / "C1.txt").write_text("box")


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    make_empty_tree(root)
    return root


def test_parse_components_exactly():
    assert parse_kface_path(("19062421", "S001", "L12", "E01", "C10.jpg")) == {
        "subject_id": "19062421", "accessory": "S001", "light": "L12",
        "expression": "E01", "camera": "C10"}
    assert parse_kface_path(("1906242", "S001", "L1", "E01", "C1.jpg")) is None  # 7 digits
    assert parse_kface_path(("19062421", "S001x", "L1", "E01", "C1.jpg")) is None
    assert parse_kface_path(("19062421", "S001", "L1", "E01", "C1.png")) is None
    assert parse_kface_path(("19062421", "S001", "L1", "E01")) is None


def test_exact_selection_avoids_the_substring_trap(full_tree):
    table, report = select_images(DataConfig(root=full_tree), SelectionConfig())
    lights = set(table.column("light").to_pylist())
    assert lights == {"L1", "L2", "L3", "L4", "L8", "L9", "L12", "L13", "L22"}
    assert "L10" not in lights and "L21" not in lights
    assert table.num_rows == 2 * 3 * 9 * 2 * 9  # 400 subjects would give 194,400
    # only the selected accessory/light/expression folders are listed
    assert report.images == 2 * 3 * 9 * 2 * 20
    assert report.annotations == 2 * 3 * 9 * 2 and report.unrecognised == 0
    assert set(table.column("subject_id").to_pylist()) == {"19062421", "19101513"}


def test_pruned_scan_finds_what_a_full_walk_finds(full_tree):
    sel = SelectionConfig(lights=["L1", "L30"], accessories=["S006"], cameras=["C1", "C20"])
    table, _ = select_images(DataConfig(root=full_tree), sel)
    expected = set()
    res = full_tree / "High_Resolution"
    for dirpath, _, files in os.walk(res):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), full_tree)
            attrs = parse_kface_path(tuple(rel.split(os.sep)[1:]))
            if attrs and is_selected(attrs, rel, sel):
                expected.add(rel)
    assert set(table.column("path").to_pylist()) == expected and len(expected) == 2 * 1 * 2 * 2 * 2


def test_legacy_substring_match_reproduces_27_lights(full_tree):
    table, _ = select_images(DataConfig(root=full_tree),
                             SelectionConfig(legacy_substring_match=True))
    lights = set(table.column("light").to_pylist())
    assert len(lights) == 27 and "L10" in lights and "L30" in lights and "L5" not in lights
    assert table.num_rows == 2 * 3 * 27 * 2 * 9  # 400 subjects would give 583,200
    assert set(table.column("camera").to_pylist()) == {
        "C4", "C5", "C6", "C7", "C8", "C9", "C10", "C19", "C20"}


def test_files_outside_the_layout_are_reported(tmp_path):
    make_empty_tree(tmp_path, subjects=("19062421",), accessories=1, lights=1, expressions=1,
                    cameras=4)
    (tmp_path / "High_Resolution" / "19062421" / "S001" / "L1" / "E01" / "photo.jpg").touch()
    (tmp_path / "High_Resolution" / "abc").mkdir()
    (tmp_path / "High_Resolution" / "abc" / "C1.jpg").touch()
    table, report = select_images(DataConfig(root=tmp_path),
                                  SelectionConfig(cameras=["C1", "C2", "C3", "C4"]))
    assert table.num_rows == 4
    assert report.unrecognised == 2
    assert "High_Resolution/abc/" in report.unrecognised_examples  # the folder, unread


def test_manifest_columns(kface_tree):
    table, _ = select_images(DataConfig(root=kface_tree), SelectionConfig())
    row = table.slice(0, 1).to_pylist()[0]
    assert row["path"].startswith("High_Resolution/19062400/S001/L1/E01/")
    assert row["file_size"] >= 0 and row["mtime_ns"] > 0
    assert table.column("path").to_pylist() == sorted(table.column("path").to_pylist())


def test_missing_and_empty_roots_fail_clearly(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        select_images(DataConfig(root=tmp_path / "nope"), SelectionConfig())
    with pytest.raises(DatasetError, match="is empty"):
        select_images(DataConfig(root=tmp_path), SelectionConfig())
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match="High_Resolution"):
        select_images(DataConfig(root=tmp_path), SelectionConfig())


def test_age_bands():
    assert [age_to_band(a) for a in (19, 20, 29.9, 30, 59, 60)] == [
        None, "20s", "20s", "30s", "50s", None]


def test_labelled_folder_adapter(tmp_path, aaf_dir):
    import pandas as pd

    labels = pd.read_csv(aaf_dir / "labels.csv").head(5)
    for f in labels.file:
        (tmp_path / f).write_bytes((aaf_dir / f).read_bytes())
    labels.loc[0, "age"] = 75
    labels.loc[1, "gender"] = "X"
    labels.to_csv(tmp_path / "labels.csv", index=False)
    table, report = select_images(DataConfig(root=tmp_path, layout="labelled"),
                                  SelectionConfig())
    assert table.num_rows == 3
    assert report.excluded_labels == 2
    example = report.excluded_label_examples[0]
    assert "75" in example and "line 2" in example
    assert set(table.column("age_band").to_pylist()) <= {"20s", "30s", "40s", "50s"}
    assert table.column("subject_id").to_pylist()[0] == Path(labels.file[2]).stem
