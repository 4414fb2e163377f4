"""A labelled photo folder: images and a labels CSV (``file``, ``gender`` and ``age`` or
``age_band``, optionally ``subject_id``), read into manifest rows.

What the pipeline's select stage (``data.layout: labelled``) and ``kface evaluate`` (a
model scored on any labelled folder) both read, below both of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from core.labels import AGE_BANDS, in_bands, nearest_band

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("subject_id", pa.string()),
        ("resolution", pa.string()),
        ("accessory", pa.string()),
        ("light", pa.string()),
        ("expression", pa.string()),
        ("camera", pa.string()),
        ("age_band", pa.string()),
        ("gender", pa.string()),
        ("age", pa.float32()),
        ("file_size", pa.int64()),
        ("mtime_ns", pa.int64()),
    ]
)


@dataclass
class ScanReport:
    """What a scan saw besides the images it kept."""

    images: int = 0
    selected: int = 0
    annotations: int = 0
    unrecognised: int = 0
    unrecognised_examples: list[str] = field(default_factory=list)
    excluded_labels: int = 0
    excluded_label_examples: list[str] = field(default_factory=list)
    files_hashed: int = 0  # photos read for their sha256 (``core.content``)
    listing_digest: str | None = None  # K-Face: the names the walk saw (``listing_digest``)

    def note_unrecognised(self, rel: str) -> None:
        self.unrecognised += 1
        if len(self.unrecognised_examples) < 10:
            self.unrecognised_examples.append(rel)

    def as_dict(self) -> dict:
        return self.__dict__.copy()


class DatasetError(ValueError):
    """The dataset root, layout or labels file cannot be used; the message says why."""


def exact_age(value: str | None) -> float | None:
    """An age in years from a labels CSV cell; None when empty or not a number."""
    if value in (None, ""):
        return None
    try:
        age = float(value)
    except ValueError:
        return None
    return None if math.isnan(age) else age


def normalise_age_band(value: str) -> str | None:
    """Accept '30s', '30대', '30' and return '30s'; None if not one of the four bands."""
    text = str(value).strip().replace("대", "s")
    if text.isdigit():
        text += "s"
    return text if text in AGE_BANDS else None


def normalise_gender(value: str) -> str | None:
    """Accept M/F, male/female, 남/여 (any case) and return 'M' or 'F'; None otherwise."""
    text = str(value).strip().lower()
    if text in ("m", "male", "남", "남자", "man"):
        return "M"
    if text in ("f", "female", "여", "여자", "woman"):
        return "F"
    return None


def labels_file(root: Path, labels: Path | None = None) -> Path:
    """A labelled folder's CSV: ``labels``, else ``<root>/labels.csv``."""
    return Path(labels) if labels else Path(root) / "labels.csv"


def read_labels_file(path: Path) -> pd.DataFrame:
    """Read a labels CSV (all text), checking that it has the columns needed."""
    if not path.is_file():
        raise DatasetError(f"labels CSV {path} not found (set data.labels or --labels)")
    try:
        labels = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot parse as CSV: {exc}") from exc
    missing = {"file", "gender"} - set(labels.columns)
    if missing or not ({"age", "age_band"} & set(labels.columns)):
        raise DatasetError(
            f"{path}: needs columns 'file', 'gender' and 'age' or 'age_band'; "
            f"found {list(labels.columns)}"
        )
    return labels


def scan_folder(root: Path, labels_file: Path | None, ages: tuple[int, int],
                 name: str | None, report: ScanReport) -> pd.DataFrame:
    """One labelled folder's manifest rows (``MANIFEST_SCHEMA``'s columns, in the CSV's
    order; faces aged outside ``ages`` get the band alone); ``name`` prefixes paths and
    subject IDs; what was left out is counted in ``report``."""
    root = Path(root)
    check_root(root)
    csv = Path(labels_file) if labels_file else root / "labels.csv"
    labels = read_labels_file(csv)
    prefix = f"{name}/" if name else ""
    rows: list[tuple] = []
    for line_no, rec in enumerate(labels.to_dict("records"), start=2):
        rel = rec["file"].replace("\\", "/")
        age = exact_age(rec.get("age"))
        if age is not None and not ages[0] <= age < ages[1] + 1:
            age = None  # outside the ages kept: the band decides, if the CSV gives one
        if "age_band" in rec and rec["age_band"]:
            band = normalise_age_band(rec["age_band"])
            if age is not None and nearest_band(age) != band:
                age = None  # an age that contradicts the given band is not used
            if age is not None and not in_bands(age):
                band = None  # a band given for an age outside the bands: not trusted
        else:
            band = None if age is None else nearest_band(age)
        gender = normalise_gender(rec["gender"])
        report.images += 1
        if band is None or gender is None:
            report.excluded_labels += 1
            if len(report.excluded_label_examples) < 10:
                what = "age" if band is None else "gender"
                value = rec.get("age_band") or rec.get("age") if band is None else rec["gender"]
                report.excluded_label_examples.append(
                    f"{csv.name} line {line_no}: {rel}: {what} {value!r} outside "
                    f"{'the ages kept (data.ages) and ' if band is None else ''}"
                    "the bands 20s-50s / M,F")
            continue
        path = root / rel
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            report.note_unrecognised(prefix + rel)  # listed in the CSV but not on disk
            continue
        subject = prefix + (rec.get("subject_id") or Path(rel).stem)
        rows.append((prefix + rel, subject, None, None, None, None, None, band, gender, age,
                     size, mtime))
    return pd.DataFrame(rows, columns=MANIFEST_SCHEMA.names)


def check_root(root: Path) -> None:
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder (--data-root)")
    if not any(root.iterdir()):
        raise DatasetError(f"dataset root {root} is empty")
