"""Merge stage: subject labels + detections -> ``faces.parquet``.

The K-Face metadata CSV (``KFace_data_information_Folder1_400.csv``) is CP949 with the
Korean headers ``ID``, ``연령대`` (``20대``..``50대``), ``성별`` (``남``/``여``). We detect the
encoding (UTF-8 with BOM, UTF-8, CP949) and accept English aliases (``subject_id``,
``age_band``, ``gender``; ``20s``, ``M``/``F``). Errors name the row and the column.

faces.parquet schema (one row per usable face; see docs/data-contracts.md): ``path``,
``subject_id``, ``age_band`` ('20s'..'50s'), ``gender`` ('M'/'F'), ``joint_class``
(e.g. '30s_M'), ``left, top, right, bottom`` (int32, box with margin), ``image_width``,
``image_height``, ``score``, ``age`` (exact years from a labelled folder's CSV, else
null), the K-Face attributes ``accessory``, ``light``,
``expression``, ``camera`` (null for a labelled folder), the photo's ``file_size``
and ``sha256`` (its content: the crop cache's fingerprints; ``mtime_ns`` instead where
the manifest has no hashes), and, only when the detector found
landmarks (``detector.kind: yunet``, or face chips), the ten landmark columns ``eye_r_x ...
mouth_l_y`` (float32 pixels), and with several labelled folders (``data.folders``) the
``source`` column. A res10 run's file is exactly as before landmarks existed, so its
digest, and every cache after it, stays current.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from core.labelled import normalise_age_band, normalise_gender
from models.detector import LANDMARK_COLUMNS

CODE_VERSION = "merge-2"  # the merge stage's; 2: exact ages kept

ID_COLUMNS = ("ID", "subject_id", "id")
AGE_COLUMNS = ("연령대", "age_band")
GENDER_COLUMNS = ("성별", "gender")
ENCODINGS = ("utf-8-sig", "cp949")  # utf-8-sig also reads plain UTF-8


class LabelsError(ValueError):
    """The metadata CSV cannot be used; the message names the file, row and column."""


def _pick(columns: list[str], names: tuple[str, ...], path: Path, what: str) -> str:
    for name in names:
        if name in columns:
            return name
    raise LabelsError(f"{path}: no {what} column (expected one of {list(names)}; "
                      f"found {columns})")


def read_metadata(path: Path) -> pd.DataFrame:
    """Read a metadata CSV into ``subject_id`` (8-digit str), ``age_band``, ``gender``."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"metadata CSV {path} not found (--metadata)")
    raw = path.read_bytes()
    for encoding in ENCODINGS:
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise LabelsError(f"{path}: not UTF-8 or CP949 text")
    from io import StringIO

    frame = pd.read_csv(StringIO(text), dtype=str, keep_default_na=False)
    frame.columns = [c.strip() for c in frame.columns]
    cols = list(frame.columns)
    id_col = _pick(cols, ID_COLUMNS, path, "subject ID")
    age_col = _pick(cols, AGE_COLUMNS, path, "age band")
    gender_col = _pick(cols, GENDER_COLUMNS, path, "gender")
    rows = []
    for i, rec in enumerate(frame.to_dict("records"), start=2):  # line 1 is the header
        sid = rec[id_col].strip()
        if not sid.isdigit():
            raise LabelsError(f"{path} line {i}, column {id_col!r}: {sid!r} is not a numeric ID")
        band = normalise_age_band(rec[age_col])
        if band is None:
            raise LabelsError(f"{path} line {i}, column {age_col!r}: {rec[age_col]!r} is not "
                              "one of 20대/30대/40대/50대 (or 20s..50s)")
        gender = normalise_gender(rec[gender_col])
        if gender is None:
            raise LabelsError(f"{path} line {i}, column {gender_col!r}: {rec[gender_col]!r} "
                              "is not 남/여 (or M/F)")
        rows.append((sid.zfill(8), band, gender, i))
    labels = pd.DataFrame(rows, columns=["subject_id", "age_band", "gender", "line"])
    conflicts = labels.groupby("subject_id")[["age_band", "gender"]].nunique().max(axis=1) > 1
    if conflicts.any():
        sid = conflicts[conflicts].index[0]
        lines = labels.loc[labels.subject_id == sid, "line"].tolist()
        raise LabelsError(f"{path}: ID {sid} has different labels on lines {lines}")
    return labels.drop_duplicates("subject_id").drop(columns="line").reset_index(drop=True)


FACES_COLUMNS = ["path", "subject_id", "age_band", "gender", "joint_class", "left", "top",
                 "right", "bottom", "image_width", "image_height", "score", "age", "accessory",
                 "light", "expression", "camera", "file_size"]


def merge_faces(manifest: pd.DataFrame, detections: pd.DataFrame,
                labels: pd.DataFrame | None) -> tuple[pa.Table, dict]:
    """Join ``ok`` detections with the manifest and the subject labels.

    ``labels`` is None for a labelled folder (the manifest already carries the labels).
    Returns the faces table and a report: subjects without labels (excluded), label rows
    without images, rows per joint class, rows in/out.
    """
    ok = detections[detections.status == "ok"]
    rows = ok.merge(manifest, on="path", how="inner")
    report: dict = {"detections": len(detections), "detections_ok": len(ok)}
    if labels is not None:
        rows = rows.drop(columns=["age_band", "gender"]).merge(
            labels, on="subject_id", how="left")
        unlabelled = sorted(rows.loc[rows.age_band.isna(), "subject_id"].unique())
        report["subjects_without_labels"] = len(unlabelled)
        report["subjects_without_labels_list"] = unlabelled[:50]
        report["images_without_labels"] = int(rows.age_band.isna().sum())
        seen = set(manifest.subject_id)
        report["label_rows_without_images"] = int((~labels.subject_id.isin(seen)).sum())
        rows = rows.dropna(subset=["age_band"])
    rows = rows.assign(joint_class=rows.age_band + "_" + rows.gender)
    landmarks = [c for c in LANDMARK_COLUMNS if c in rows and rows[c].notna().any()]
    source = ["source"] if "source" in rows else []
    content = ["sha256"] if "sha256" in rows else ["mtime_ns"]  # (not both: a copy's new
    rows = rows[FACES_COLUMNS + content + landmarks + source].sort_values(  # mtimes would
        "path").reset_index(drop=True)  # change the faces, and every key after them)
    for col in ("left", "top", "right", "bottom", "image_width", "image_height"):
        rows[col] = rows[col].astype("int32")
    for col in ("age", *landmarks):  # age: all null for K-Face, still a number column
        rows[col] = rows[col].astype("float32")
    report["faces"] = len(rows)
    report["subjects"] = int(rows.subject_id.nunique())
    report["joint_class_counts"] = rows.joint_class.value_counts().sort_index().to_dict()
    return pa.Table.from_pandas(rows, preserve_index=False), report
