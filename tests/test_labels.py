import pandas as pd
import pytest

from tasks.labels import LabelsError, merge_faces, read_metadata
from tasks.sample_data import write_metadata_csv


def test_cp949_korean_csv(tmp_path):
    path = tmp_path / "KFace_data_information_Folder1_400.csv"
    write_metadata_csv(path, [("19062421", "30s", "M"), ("19062521", "50s", "F")])
    raw = path.read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # really CP949, as the K-Face file
    labels = read_metadata(path)
    assert labels.to_dict("records") == [
        {"subject_id": "19062421", "age_band": "30s", "gender": "M"},
        {"subject_id": "19062521", "age_band": "50s", "gender": "F"}]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_utf8_and_english_aliases(tmp_path, encoding):
    path = tmp_path / "meta.csv"
    path.write_text("subject_id,age_band,gender,extra\n19062421,20s,F,x\n19062431,40대,남,y\n",
                    encoding=encoding)
    labels = read_metadata(path)
    assert labels.age_band.tolist() == ["20s", "40s"] and labels.gender.tolist() == ["F", "M"]


@pytest.mark.parametrize("content, message", [
    ("ID,연령대,성별\n19062421,70대,남\n", r"line 2, column '연령대': '70대'"),
    ("ID,연령대,성별\n19062421,30대,X\n", r"line 2, column '성별': 'X'"),
    ("ID,연령대,성별\n19062421,30대,남\nabc,30대,남\n", r"line 3, column 'ID': 'abc'"),
    ("ID,나이,성별\n19062421,30,남\n", r"no age band column"),
    ("ID,연령대,성별\n19062421,30대,남\n19062421,40대,남\n", r"ID 19062421 .* lines \[2, 3\]"),
])
def test_bad_csv_messages(tmp_path, content, message):
    path = tmp_path / "meta.csv"
    path.write_bytes(content.encode("cp949"))
    with pytest.raises(LabelsError, match=message):
        read_metadata(path)


def test_missing_csv(tmp_path):
    with pytest.raises(LabelsError, match="not found"):
        read_metadata(tmp_path / "nope.csv")


def test_merge_counts_unlabelled_subjects():
    manifest = pd.DataFrame({
        "path": ["a/1.jpg", "a/2.jpg", "b/1.jpg", "c/1.jpg"],
        "subject_id": ["00000001", "00000001", "00000002", "00000003"],
        "resolution": "High", "accessory": "S001", "light": "L1", "expression": "E01",
        "camera": "C7", "age_band": None, "gender": None, "age": None, "file_size": 10,
        "mtime_ns": 1})
    det = pd.DataFrame({"path": manifest.path, "status": ["ok", "no_face", "ok", "ok"],
                        "left": 1, "top": 2, "right": 30, "bottom": 40, "image_width": 864,
                        "image_height": 576, "score": 0.99})
    labels = pd.DataFrame({"subject_id": ["00000001", "00000003", "00000009"],
                           "age_band": ["30s", "20s", "40s"], "gender": ["M", "F", "F"]})
    table, report = merge_faces(manifest, det, labels)
    faces = table.to_pandas()
    assert faces.path.tolist() == ["a/1.jpg", "c/1.jpg"]
    assert faces.joint_class.tolist() == ["30s_M", "20s_F"]
    assert table.schema.field("age").type == "float" and faces.age.isna().all()  # K-Face
    assert report["subjects_without_labels"] == 1
    assert report["subjects_without_labels_list"] == ["00000002"]
    assert report["label_rows_without_images"] == 1
