"""Select stage: scan the dataset and choose the photos to use -> ``manifest.parquet``.

Two dataset layouts are supported:

* ``kface``: ``<root>/<Res>_Resolution/<ID>/<Sxxx>/<Lnn>/<Exx>/<Cnn>.jpg``. Every
  attribute and the 8-digit subject ID come from exactly one path component, matched by a
  full regular expression (never by substring or character offset).
* ``labelled``: a folder of images plus a CSV with ``file``, ``age`` or ``age_band``,
  ``gender`` and optionally ``subject_id`` (as in ``shared/data/faces/*/labels.csv``);
  or several such folders (``data.folders``), each with a name: a photo's manifest path
  then starts with its folder's name (``aaf/0001.jpg``), its subject ID too
  (``aaf/0001``), and the manifest has a ``source`` column. A folder of aligned face chips
  (``chips: true``) joins without a detector (``tasks.detect``).

Exact ages: a labelled CSV's ``age`` is kept for ages in ``data.ages`` (default 20-59);
with a wider range (e.g. 15-69) a face outside 20-59 gets the nearest band, trains the
exact-age head's ends and is never put in validation or test (``tasks.split``).

Manifest schema (one row per selected image; see docs/data-contracts.md):
``path`` (str, relative to the data root, POSIX separators), ``subject_id`` (str),
``resolution``, ``accessory``, ``light``, ``expression``, ``camera`` (str, null for the
labelled layout), ``age_band``, ``gender`` (str, null for K-Face: they come from the
metadata CSV later), ``age`` (float32 years: a labelled CSV's exact age, null when it
gives only bands and always for K-Face), ``file_size`` (int64 bytes), ``mtime_ns`` (int64),
``sha256`` (str, the file's content: ``core.content``; added by the select stage, which
keeps a stat cache so that an unchanged photo is not read again), and with
``data.folders`` only, ``source`` (str, the folder's name).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.images import ImageRoots
from core.labelled import (
    MANIFEST_SCHEMA,
    DatasetError,
    ScanReport,
    check_root,
    labels_file,
    read_labels_file,
    scan_folder,
)
from core.labels import BAND_AGES

CODE_VERSION = "select-2"  # 2: exact ages kept

# One regular expression per K-Face path component, anchored at both ends.
_KFACE_PARTS = {
    "subject_id": re.compile(r"\d{8}"),
    "accessory": re.compile(r"S\d{3}"),
    "light": re.compile(r"L\d{1,2}"),
    "expression": re.compile(r"E\d{2}"),
}
_CAMERA_FILE = re.compile(r"(C\d{1,2})\.jpg", re.IGNORECASE)
_ANNOTATION_FILE = re.compile(r"C\d{1,2}\.txt", re.IGNORECASE)



SOURCE_FIELD = pa.field("source", pa.string())  # the manifest's column with data.folders


class LabelledFolder(BaseModel):
    """One of several labelled folders read by one run (``data.folders``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$",
                      description="The folder's name (its 'source'): its photos' paths and "
                      "subject IDs in the manifest start with it.")
    root: Path = Field(..., description="The folder of images (read-only).")
    labels: Path | None = Field(None, description="Its labels CSV (default: "
                                "labels.csv in root).")
    chips: bool = Field(
        False, description="The images are face chips already aligned (as UTKFace's "
        "'aligned and cropped' faces): no detector runs; every chip's face is placed by "
        "chip_landmarks.")
    chip_landmarks: list[tuple[float, float]] | None = Field(
        None, min_length=5, max_length=5, description="chips: the five landmarks (right "
        "eye, left eye, nose tip, right and left mouth corner) as fractions of the chip's "
        "width and height. None: measured by YuNet on the folder's chips, enlarged and "
        "padded (docs/training.md, 'Face chips').")


class DataConfig(BaseModel):
    """Where the dataset is and how it is laid out."""

    model_config = ConfigDict(extra="forbid")

    root: Path = Field(Path("data"), description="Dataset root folder (read-only).")
    layout: Literal["kface", "labelled"] = Field(
        "kface", description="'kface': ROOT/High_Resolution/ID/Sxxx/Lnn/Exx/Cnn.jpg; "
        "'labelled': images + a labels CSV."
    )
    resolution: Literal["High", "Middle", "Low"] = Field(
        "High", description="K-Face resolution folder to read."
    )
    metadata: Path | None = Field(
        None, description="K-Face metadata CSV (ID, 연령대, 성별); used by the merge stage."
    )
    labels: Path | None = Field(
        None, description="Labels CSV for the 'labelled' layout (default: labels.csv in data.root)."
    )
    folders: list[LabelledFolder] = Field(
        default_factory=list, description="Layout 'labelled': several labelled folders in "
        "one run, each with a name, root and labels CSV (data.root and data.labels are "
        "then not read); split by person within each.")
    ages: tuple[int, int] = Field(
        BAND_AGES, description="Exact ages kept from a labels CSV. Wider than 20-59 (e.g. "
        "[15, 69]): faces outside 20-59 get the nearest band, train only (never validate "
        "or test) and widen the exact-age head; counts and bands stay 20s-50s.")

    @field_validator("folders")
    @classmethod
    def _unique_names(cls, value: list[LabelledFolder]) -> list[LabelledFolder]:
        names = [f.name for f in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"folder names must differ: {', '.join(twice)} given twice")
        return value

    @field_validator("ages")
    @classmethod
    def _ages_cover_the_bands(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] > BAND_AGES[0] or value[1] < BAND_AGES[1] or value[0] < 0:
            raise ValueError(f"must span at least {BAND_AGES[0]}-{BAND_AGES[1]} "
                             f"(got {value[0]}-{value[1]})")
        return value

    def image_roots(self) -> ImageRoots:
        """Where the manifest's paths are read from."""
        return ImageRoots(self.root, tuple((f.name, f.root) for f in self.folders))

    def labelled_folders(self) -> list[LabelledFolder]:
        """The labelled folders a run reads: ``folders``, or the one ``root`` (unnamed)."""
        return self.folders or [LabelledFolder.model_construct(  # (unnamed: not validated)
            name="", root=self.root, labels=self.labels, chips=False, chip_landmarks=None)]

    def chip_folders(self) -> list[LabelledFolder]:
        return [f for f in self.folders if f.chips]


class SelectionConfig(BaseModel):
    """Which K-Face photos to keep. Defaults are the original notebook's lists."""

    model_config = ConfigDict(extra="forbid")

    accessories: list[str] = Field(["S001", "S002", "S003"])
    lights: list[str] = Field(["L1", "L2", "L3", "L4", "L8", "L9", "L12", "L13", "L22"])
    cameras: list[str] = Field(["C4", "C5", "C6", "C7", "C8", "C9", "C10", "C19", "C20"])
    expressions: list[str] = Field(["E01", "E02"])
    legacy_substring_match: bool = Field(
        False,
        description="Reproduce the original notebook: match each list entry as a substring "
        "of the path, so 'L1' also takes L10-L19 (583,200 photos instead of 194,400).",
    )

    @field_validator("accessories", "lights", "cameras", "expressions")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one value")
        return value


def parse_kface_path(parts: tuple[str, ...]) -> dict[str, str] | None:
    """Parse ``(ID, Sxxx, Lnn, Exx, Cnn.jpg)`` into attributes, or None if it does not fit."""
    if len(parts) != 5:
        return None
    out: dict[str, str] = {}
    for (name, pattern), value in zip(_KFACE_PARTS.items(), parts[:4], strict=True):
        if not pattern.fullmatch(value):
            return None
        out[name] = value
    cam = _CAMERA_FILE.fullmatch(parts[4])
    if not cam:
        return None
    out["camera"] = cam.group(1).upper()
    return out


def _walk(top: str, sel: SelectionConfig | None = None):
    """Yield ``(rel_parts, DirEntry)`` for every file below ``top`` (symlinks not followed
    into directories; broken symlinks still yielded so they surface as errors later).

    With ``sel`` (a K-Face resolution folder), descend only into the accessory, light and
    expression folders it lists: ~34,000 listings for 400 subjects instead of ~216,000
    folders and 4.3M files. A folder whose name does not fit its level is yielded
    (reported as not in the layout); a fitting but unselected one is skipped unread.
    One loop over a stack of folders (no generator per level: 583,200 files in ~1 s)."""
    levels = (None, *(set(v) for v in (sel.accessories, sel.lights, sel.expressions))
              ) if sel is not None else ()
    patterns = tuple(_KFACE_PARTS.values())
    stack: list[tuple[str, tuple[str, ...]]] = [(top, ())]
    while stack:
        path, rel = stack.pop()
        try:  # in name order: a copy of the tree is walked in the same order
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue
        depth = len(rel)
        below = []
        for entry in entries:
            parts = (*rel, entry.name)
            if not entry.is_dir(follow_symlinks=False):
                yield parts, entry
            elif depth >= len(levels):
                below.append((entry.path, parts))
            elif not patterns[depth].fullmatch(entry.name):
                yield parts, entry
            elif levels[depth] is None or entry.name in levels[depth]:
                below.append((entry.path, parts))
        stack.extend(reversed(below))


def _kface_walk(data: DataConfig, sel: SelectionConfig):
    """The K-Face scan's walk of the resolution folder: the selected folders only, or
    everything under ``legacy_substring_match`` (the original's substring rule can match
    any folder name)."""
    res_dir = _check_resolution_folder(data)
    return _walk(str(res_dir), None if sel.legacy_substring_match else sel)


def _listed(parts: tuple[str, ...]) -> bytes:
    """One walked name as ``listing_digest`` and the scan hash it."""
    return "/".join(parts).encode() + b"\n"


def listing_digest(data: DataConfig, sel: SelectionConfig) -> str:
    """sha256 of the names the K-Face scan's walk sees (no stat, no parsing): equal
    between two walks when no file was added, removed or renamed where the scan looks."""
    h = hashlib.sha256()
    for parts, _ in _kface_walk(data, sel):
        h.update(_listed(parts))
    return h.hexdigest()


def manifest_is_current(data: DataConfig, sel: SelectionConfig, manifest: Path,
                        listing: str | None) -> bool:
    """Whether a K-Face scan now would give back ``manifest`` (written by a scan whose
    walk saw ``listing``, ``listing_digest``; the same selection): the same names are
    there, and each selected photo has the manifest's size and mtime (so the stat cache
    gives it the manifest's sha256) and every photo has its sha256 (a photo that could
    not be read is read again by the scan). Costs the walk and a stat per photo (583,200
    photos: ~3 s) instead of the scan's parsing and hashing; False (scan again) on any
    doubt, and always for the labelled layout (a labels file and folders to compare)."""
    if data.layout != "kface" or not listing or not Path(manifest).exists():
        return False
    if listing_digest(data, sel) != listing:
        return False
    import pyarrow.parquet as pq

    if "sha256" not in pq.read_schema(manifest).names:
        return False  # a manifest of a kface before content hashes: the scan adds them
    table = pq.read_table(manifest, columns=["path", "file_size", "mtime_ns", "sha256"])
    if table.column("sha256").null_count:
        return False  # photos that could not be read for their hash: the scan retries them
    root = str(data.root) + os.sep
    try:
        for path, size, mtime in zip(table.column("path").to_pylist(),
                                     table.column("file_size").to_pylist(),
                                     table.column("mtime_ns").to_pylist(), strict=True):
            st = os.stat(root + path)
            if st.st_size != size or st.st_mtime_ns != mtime:
                return False
    except OSError:
        return False
    return True


def _stat(entry: os.DirEntry) -> tuple[int, int]:
    try:
        st = entry.stat()
    except OSError:  # broken symlink, vanished file: keep it, detection reports the error
        st = entry.stat(follow_symlinks=False)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _substring_patterns(lists: tuple[tuple[str, ...], ...]) -> tuple[re.Pattern, ...]:
    """One regular expression per attribute list: any of its entries anywhere (the
    original's substring rule, one search instead of a loop per entry)."""
    return tuple(re.compile("|".join(map(re.escape, values))) for values in lists)


def is_selected(attrs: dict[str, str], rel_path: str, sel: SelectionConfig) -> bool:
    """Whether one K-Face photo passes the selection.

    Exact match of each attribute against its list; with ``legacy_substring_match`` the
    original's rule instead: some list entry occurs anywhere in the path string.
    """
    lists = (tuple(sel.accessories), tuple(sel.lights), tuple(sel.cameras),
             tuple(sel.expressions))
    if sel.legacy_substring_match:
        return all(pattern.search(rel_path) for pattern in _substring_patterns(lists))
    keys = ("accessory", "light", "camera", "expression")
    return all(attrs[k] in values for k, values in zip(keys, lists, strict=True))


def scan_kface(data: DataConfig, sel: SelectionConfig) -> tuple[pd.DataFrame, ScanReport]:
    """Scan a K-Face tree and return the selected rows (manifest columns) and a report.
    Only the selected accessory/light/expression folders are listed (except with
    ``legacy_substring_match``), so ``report.images`` counts the photos in those."""
    check_root(Path(data.root))
    report = ScanReport()
    rows: list[tuple] = []
    prefix = f"{data.resolution}_Resolution/"
    listing = hashlib.sha256()  # what ``manifest_is_current`` compares
    for parts, entry in _kface_walk(data, sel):
        listing.update(_listed(parts))
        rel = prefix + "/".join(parts)
        attrs = parse_kface_path(parts)
        if attrs is None:
            if len(parts) == 5 and _ANNOTATION_FILE.fullmatch(parts[4]):
                report.annotations += 1
            else:  # a folder here is one that does not fit its level (not read)
                report.note_unrecognised(rel + "/" * entry.is_dir(follow_symlinks=False))
            continue
        report.images += 1
        if not is_selected(attrs, rel, sel):
            continue
        size, mtime = _stat(entry)
        rows.append(
            (rel, attrs["subject_id"], data.resolution, attrs["accessory"], attrs["light"],
             attrs["expression"], attrs["camera"], None, None, None, size, mtime)
        )
    report.selected = len(rows)
    report.listing_digest = listing.hexdigest()
    return _frame(rows), report


def scan_labelled(data: DataConfig) -> tuple[pd.DataFrame, ScanReport]:
    """Read the labelled folder (or each of ``data.folders``) into manifest rows and a
    report."""
    report = ScanReport()
    frames = []
    for folder in data.labelled_folders():
        named = folder.name if data.folders else None
        frame = scan_folder(folder.root, folder.labels, data.ages, named, report)
        frames.append(frame.assign(source=named) if named else frame)
    report.selected = sum(len(f) for f in frames)
    return pd.concat(frames, ignore_index=True).sort_values("path", kind="stable"
                                                           ).reset_index(drop=True), report


def labels_path(data: DataConfig) -> Path:
    """The labelled layout's CSV: ``data.labels``, else ``<root>/labels.csv``."""
    return labels_file(data.root, data.labels)


def read_labels_csv(data: DataConfig) -> pd.DataFrame:
    """Read the labelled layout's CSV (all text), checking that it has the columns needed."""
    return read_labels_file(labels_path(data))


def check_dataset(data: DataConfig) -> None:
    """Cheap checks of the dataset before a run (no scan): the root, the K-Face
    resolution folder or the labels CSV. Raises DatasetError."""
    if data.layout == "kface":
        check_root(Path(data.root))
        _check_resolution_folder(data)
        return
    for folder in data.labelled_folders():
        check_root(Path(folder.root))
        read_labels_file(Path(folder.labels) if folder.labels
                         else Path(folder.root) / "labels.csv")


def _check_resolution_folder(data: DataConfig) -> Path:
    res_dir = Path(data.root) / f"{data.resolution}_Resolution"
    if not res_dir.is_dir():
        raise DatasetError(
            f"{res_dir} does not exist: a K-Face root must contain "
            f"'{data.resolution}_Resolution/<ID>/<Sxxx>/<Lnn>/<Exx>/<Cnn>.jpg' "
            "(set data.resolution, or --layout labelled for an image folder with a CSV)"
        )
    return res_dir


def _frame(rows: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=MANIFEST_SCHEMA.names)
    return frame.sort_values("path", kind="stable").reset_index(drop=True)


def select_images(data: DataConfig, sel: SelectionConfig, hash_cache: Path | None = None,
                  save_hashes: bool = True) -> tuple[pa.Table, ScanReport]:
    """Scan the dataset per its layout; return the manifest table and the scan report.
    With ``hash_cache`` (the run folder's ``file_hashes.parquet``) the manifest gets each
    photo's ``sha256`` (``core.content.content_hashes``: read only where the cache has no
    entry of that size and mtime; the cache saved with ``save_hashes``)."""
    if data.layout == "kface":
        frame, report = scan_kface(data, sel)
    else:
        frame, report = scan_labelled(data)
    if frame.empty:
        where = (", ".join(str(f.root) for f in data.folders) if data.folders
                 else data.root)
        raise DatasetError(
            f"no images selected under {where} (layout {data.layout!r}): "
            f"{report.images} images seen, {report.unrecognised} files not in the layout, "
            f"e.g. {report.unrecognised_examples[:3]}"
        )
    schema = MANIFEST_SCHEMA.append(SOURCE_FIELD) if "source" in frame else MANIFEST_SCHEMA
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    if hash_cache is not None:
        from core.content import content_hashes

        hashes, report.files_hashed = content_hashes(
            frame[["path", "file_size", "mtime_ns"]], data.image_roots(), hash_cache,
            save=save_hashes)
        table = table.append_column("sha256", pa.array(hashes, pa.string()))
    return table, report
