"""Batch inference on images and folders -> ``predictions.json`` (+ CSV, annotated images).

``predictions.json``: ``{"model": {name, id, file, sha256}, "detector": {kind,
confidence}, "images": [...]}`` (what made the answers: ``FaceAnalyzer.provenance``;
files of kface before 2026-12 are the bare list, which ``read_predictions`` still
reads). ``images`` has one entry per image: ``path``, ``width``, ``height``,
``faces: [{box: [left, top, right, bottom], score, gender, gender_probs: {M, F},
age_band, age_band_probs: {20s, 30s, 40s, 50s}, age, landmarks}]``, and ``error`` (null, or why
the image could not be read; such an image is skipped, never fatal). ``landmarks`` is the
five ``[x, y]`` points (right eye, left eye, nose tip, right and left mouth corner) with
the YuNet detector, else null; ``age`` is the age in years (the mean of the exact-age
head's distribution) when the model has that head, else null.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from core.images import IMAGE_SUFFIXES, ImageError, image_header, load_image, read_file
from core.storage import write_bytes_atomic, write_json_atomic
from core.threads import READERS, ordered_map
from models.analyzer import FaceAnalyzer, FacePrediction
from models.detector import LANDMARK_COLUMNS, Face

GENDER_NAMES = {"M": "Man", "F": "Woman"}
PHOTOS_PER_BATCH = 16  # photos whose faces go through the classifier together


class PhotoInputError(ValueError):
    """The paths given hold no photo to analyse; the message says which and why."""


# every file and folder kface predict may write in --out (core.storage.staged_outputs)
PREDICT_OUTPUTS = ("predictions.json", "predictions.csv", "annotated")

def check_photos(inputs: Iterable[Path]) -> list[Path]:
    """The image files of ``inputs`` (files, and image files below folders), checked
    before any model is loaded: every path exists, there is at least one image, and at
    least one of them can be read (its header; the others are reported as they come).
    Raises PhotoInputError with one line otherwise."""
    inputs = [Path(p) for p in inputs]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise PhotoInputError(f"not found: {', '.join(missing)}")
    photos = list(iter_images(inputs))
    if not photos:
        raise PhotoInputError(f"no image file in {', '.join(map(str, inputs))} (looked for "
                              f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    problems = []
    for photo in photos:
        try:
            image_header(read_file(photo))
            return photos
        except ImageError as exc:
            problems.append(f"{photo}: {exc}")
    raise PhotoInputError(f"none of the {len(photos)} image file(s) can be read, e.g. "
                          f"{problems[0]}")


def display_paths(inputs: Iterable[Path], paths: Iterable[str]) -> list[str]:
    """``paths`` as a person reads them: relative to the folder the inputs share (a
    K-Face tree's ``C1.jpg`` keeps its subject, light and expression folders)."""
    import os

    inputs = [Path(p) for p in inputs]
    if not inputs:
        return list(paths)
    base = os.path.commonpath([str(p if p.is_dir() else p.parent) for p in inputs])
    return [os.path.relpath(p, base) if str(p).startswith(base) else str(p) for p in paths]


def iter_images(inputs: Iterable[Path]) -> Iterator[Path]:
    """Files given directly, and image files found recursively in given folders (sorted)."""
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            yield from sorted(p for p in item.rglob("*")
                              if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        else:
            yield item


def label_text(face: FacePrediction) -> str:
    """``Man 97%, 30s 64%``, and ``, age 34`` when the model estimates the age."""
    return (f"{GENDER_NAMES.get(face.gender, face.gender)} "
            f"{face.gender_probs[face.gender]:.0%}, {face.age_band} "
            f"{face.age_band_probs[face.age_band]:.0%}"
            + ("" if face.age is None else f", age {face.age:.0f}"))


def annotate(image: np.ndarray, faces: Iterable[FacePrediction],
             labels: Iterable[str] | None = None) -> np.ndarray:
    """Draw each face's box and label (gender + age band with probabilities), and its
    landmarks when it has them."""
    out = image.copy()
    faces = list(faces)
    texts = list(labels) if labels is not None else [label_text(f) for f in faces]
    for face, text in zip(faces, texts, strict=True):
        left, top, right, bottom = face.box
        cv2.rectangle(out, (left, top), (right, bottom), (0, 255, 0), 2)
        cv2.putText(out, text, (left, max(12, top - 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 255, 0), 2)
        for x, y in face.landmarks or ():
            cv2.circle(out, (int(round(x)), int(round(y))), 2, (0, 255, 255), -1)
    return out


def read_photo(analyzer: FaceAnalyzer, path: Path
               ) -> tuple[dict, np.ndarray | None, tuple[list[Face], np.ndarray] | None]:
    """A photo's predictions.json entry (faces still empty), its image and its detected
    faces with their crops; for an unreadable file the entry's ``error`` and two Nones."""
    entry: dict = {"path": str(path), "width": None, "height": None, "faces": [],
                   "error": None}
    try:
        image, width, height, _ = load_image(Path(path))
    except ImageError as exc:
        entry["error"] = str(exc)
        return entry, None, None
    entry.update(width=width, height=height)
    return entry, image, analyzer.crops(image)


def predict_entries(analyzer: FaceAnalyzer, paths: Iterable[Path],
                    annotated_dir: Path | None = None, start: int = 0,
                    batch: int = PHOTOS_PER_BATCH, readers: int = 1) -> list[dict]:
    """One predictions.json entry per image path; annotated copies into ``annotated_dir``
    (numbered from ``start``) when given. Unreadable images get ``error``, never raise.
    ``readers`` threads read and detect the next photos while the faces of ``batch``
    photos are classified together."""
    entries: list[dict] = []
    pending: list[tuple[dict, np.ndarray, tuple, int]] = []  # entry, image, crops, number

    def flush() -> None:
        found = analyzer.predictions([crops for _, _, crops, _ in pending])
        for (entry, image, _, number), faces in zip(pending, found, strict=True):
            entry["faces"] = [f.as_dict() for f in faces]
            if annotated_dir is not None:
                ok, buf = cv2.imencode(".jpg", annotate(image, faces))
                if ok:
                    name = f"{number:05d}_{Path(entry['path']).stem}.jpg"
                    write_bytes_atomic(Path(annotated_dir) / name, buf.tobytes())
        pending.clear()

    for entry, image, crops in ordered_map(lambda p: read_photo(analyzer, p), paths,
                                           readers):
        entries.append(entry)
        if image is None:
            continue
        pending.append((entry, image, crops, start + len(entries)))
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    return entries


def write_predictions(entries: list[dict], out: Path, write_csv: bool = False,
                      provenance: dict | None = None) -> None:
    """Write ``out/predictions.json`` (and ``predictions.csv``) atomically, with what made
    them (``provenance``: ``model`` and ``detector``)."""
    write_json_atomic(Path(out) / "predictions.json", {**(provenance or {}),
                                                        "images": entries})
    if write_csv:
        write_bytes_atomic(Path(out) / "predictions.csv", predictions_csv(entries).encode())


def predict_images(analyzer: FaceAnalyzer, inputs: Iterable[Path], out: Path,
                   write_csv: bool = False, annotated: bool = False,
                   batch: int = PHOTOS_PER_BATCH, readers: int = READERS) -> list[dict]:
    """Analyse every image in one process (``readers`` threads read and detect); write
    ``out/predictions.json`` (+ extras)."""
    out = Path(out)
    entries = predict_entries(analyzer, iter_images(inputs),
                              out / "annotated" if annotated else None, batch=batch,
                              readers=readers)
    write_predictions(entries, out, write_csv, analyzer.provenance())
    return entries


def read_predictions(path: Path) -> tuple[dict, list[dict]]:
    """A predictions.json's provenance (``model``, ``detector``; empty for a file of an
    earlier kface) and its entries."""
    import json

    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return {}, data
    return {k: v for k, v in data.items() if k != "images"}, data["images"]


def predictions_csv(entries: list[dict]) -> str:
    """One CSV row per face (images without faces or with errors get one empty row); the
    landmark columns are empty without landmarks. Unix line endings."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["path", "left", "top", "right", "bottom", "score", "gender", "p_M", "p_F",
              "age_band", "p_20s", "p_30s", "p_40s", "p_50s", "age", *LANDMARK_COLUMNS,
              "error"]
    writer.writerow(header)
    for e in entries:
        if not e["faces"]:
            writer.writerow([e["path"], *[""] * (len(header) - 2), e["error"] or ""])
        for f in e["faces"]:
            points = ([v for point in f["landmarks"] for v in point] if f.get("landmarks")
                      else [""] * len(LANDMARK_COLUMNS))
            writer.writerow([e["path"], *f["box"], f["score"], f["gender"],
                             *f["gender_probs"].values(), f["age_band"],
                             *f["age_band_probs"].values(),
                             "" if f.get("age") is None else f["age"], *points, ""])
    return buf.getvalue()
