import numpy as np
import pandas as pd
import pytest

from tasks.split import SplitConfig, split_faces

ORIGINAL_COUNTS = {"40s_M": 80106, "30s_F": 67909, "30s_M": 60042, "50s_M": 52349,
                   "40s_F": 51619, "50s_F": 41387, "20s_F": 7175, "20s_M": 5085}


def synthetic_faces(n_subjects=120, per_subject=10, seed=0):
    rng = np.random.default_rng(seed)
    classes = list(ORIGINAL_COUNTS)
    weights = np.array(list(ORIGINAL_COUNTS.values()), float)
    subject_class = rng.choice(classes, size=n_subjects, p=weights / weights.sum())
    rows = [(f"{s:08d}/{i}.jpg", f"{s:08d}", subject_class[s])
            for s in range(n_subjects) for i in range(per_subject)]
    return pd.DataFrame(rows, columns=["path", "subject_id", "joint_class"])


def test_subject_split_is_person_disjoint_and_stratified():
    faces = synthetic_faces(n_subjects=300)
    split, report = split_faces(faces, SplitConfig())
    merged = faces.assign(split=split.split.to_numpy())
    people = {p: set(merged[merged.split == p].subject_id) for p in ("train", "val", "test")}
    assert not people["train"] & people["val"] and not people["train"] & people["test"]
    assert not people["val"] & people["test"] and report["subjects"]["in_both"] == 0
    for part in ("val", "test"):  # 70 / 15 / 15 by default
        assert abs((merged.split == part).mean() - 0.15) < 0.03, part
    assert report["rows"]["train"] + report["rows"]["val"] + report["rows"]["test"] == len(faces)
    overall = merged.joint_class.value_counts(normalize=True)
    for part in ("train", "val", "test"):
        share = merged[merged.split == part].joint_class.value_counts(normalize=True)
        for cls in overall.index:
            if overall[cls] > 0.05:
                assert abs(share.get(cls, 0) - overall[cls]) < 0.02 + 0.5 / len(people[part]), (
                    part, cls)


def test_no_test_split_when_test_fraction_is_zero():
    faces = synthetic_faces()
    split, report = split_faces(faces, SplitConfig(val_fraction=0.25, test_fraction=0))
    assert report["rows"]["test"] == 0 and abs((split.split == "val").mean() - 0.25) < 0.05


def test_same_seed_same_split_other_seed_differs():
    faces = synthetic_faces()
    a, _ = split_faces(faces, SplitConfig())
    b, _ = split_faces(faces, SplitConfig())
    c, _ = split_faces(faces, SplitConfig(seed=1))
    assert a.equals(b) and not a.split.equals(c.split)


def test_image_strategy_reproduces_the_blogs_274254_91418():
    faces = pd.DataFrame({"joint_class": np.repeat(list(ORIGINAL_COUNTS),
                                                   list(ORIGINAL_COUNTS.values()))})
    faces["path"] = np.arange(len(faces)).astype(str)
    faces["subject_id"] = (np.arange(len(faces)) % 400).astype(str)
    assert len(faces) == 365672
    split, report = split_faces(faces, SplitConfig(strategy="image", val_fraction=0.25,
                                                   test_fraction=0))
    assert report["rows"] == {"train": 274254, "val": 91418, "test": 0}
    assert "warning" in report and report["subjects"]["in_both"] == 400
    # class proportions preserved per split, as stratify promises
    merged = faces.assign(split=split.split.to_numpy())
    assert (merged[merged.split == "val"].joint_class.value_counts()["20s_M"]
            == pytest.approx(5085 * 0.25, abs=1))
