"""Build K-Face-layout sample trees from a labelled face folder (tests, benchmarks, demo).

``build_kface_tree`` places each face photo on an 864x576 background (K-Face High size)
and writes one JPEG per attribute combination under
``High_Resolution/<8-digit ID>/<Sxxx>/<Lnn>/<Exx>/<Cnn>.jpg``. Variants are plain image
transforms: lighting scales brightness, camera shifts and scales the face, accessory
S002/S003 darken a band over the eyes/hair, expression E02/E03 mirror/blur. The labels go
into a CP949 metadata CSV with the Korean headers ``ID``, ``연령대``, ``성별`` (the real
K-Face file's format). The labels are the source photos' labels; the images are synthetic.

Without a labelled face folder (a fresh machine without ``../shared``),
``write_public_faces`` makes one from the public-domain astronaut photo (NASA) that
scikit-image ships: one variant per subject (colour, gamma, tilt, mirror) and synthetic
labels, enough to run the pipeline end to end, not to learn anything.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from core.boxes import write_box_file
from core.labelled import normalise_age_band, normalise_gender
from core.labels import AGE_BANDS, GENDERS, age_to_band
from core.storage import atomic_path

HIGH_SIZE = (864, 576)  # width, height of K-Face High_Resolution photos
# beside labels that are made up; the evaluation report then says so in its first lines
SYNTHETIC_MARKER = "LABELS_ARE_SYNTHETIC"
KOREAN_GENDER = {"M": "남", "F": "여"}
ASTRONAUT_FACE = (125, 5, 325, 235)  # left, top, right, bottom: the face with a margin


class SampleDataError(RuntimeError):
    """Sample data cannot be built (e.g. the optional scikit-image is missing)."""


def write_public_faces(out: Path, n_subjects: int, seed: int = 0) -> Path:
    """Write ``out/face-NNN.jpg`` + ``out/labels.csv``: ``n_subjects`` variants of
    scikit-image's astronaut photo with synthetic labels cycling through every age band
    and gender. Returns ``out``."""
    try:
        from skimage import data
    except ImportError as exc:
        raise SampleDataError("no face folder given and scikit-image is not installed: "
                              "pip install scikit-image (or pip install -e '.[demo]'), or "
                              "pass --faces DIR") from exc
    left, top, right, bottom = ASTRONAUT_FACE
    face = np.ascontiguousarray(data.astronaut()[top:bottom, left:right, ::-1])
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_subjects):
        hsv = cv2.cvtColor(face, cv2.COLOR_BGR2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-8, 8)) % 180
        hsv[..., 1] *= rng.uniform(0.6, 1.3)
        img = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR)
        img = np.clip(255 * (img / 255.0) ** rng.uniform(0.7, 1.4), 0, 255).astype(np.uint8)
        h, w = img.shape[:2]
        turn = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-8, 8), 1.0)
        img = cv2.warpAffine(img, turn, (w, h), borderMode=cv2.BORDER_REFLECT)
        if i % 2:
            img = img[:, ::-1]
        name = f"face-{i:03d}.jpg"
        cv2.imwrite(str(out / name), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        rows.append((name, AGE_BANDS[i % 4], GENDERS[(i // 4) % 2]))
    pd.DataFrame(rows, columns=["file", "age_band", "gender"]).to_csv(out / "labels.csv",
                                                                        index=False)
    (out / SYNTHETIC_MARKER).write_text(_SYNTHETIC_NOTE)
    return out


_SYNTHETIC_NOTE = ("The labels in this folder are synthetic: made up by kface's sample "
                   "generator (tasks/sample_data.py) to run the pipeline end to end. A model "
                   "trained on them learns nothing about age or gender.\n")


@dataclass(frozen=True)
class TreeSpec:
    """Which attribute folders each subject gets."""

    accessories: Sequence[str] = ("S001",)
    lights: Sequence[str] = ("L1",)
    expressions: Sequence[str] = ("E01",)
    cameras: Sequence[str] = ("C7",)
    size: tuple[int, int] = HIGH_SIZE


# ``kface sample-data``'s tree: light L10 and camera C1 lie outside K-Face's usual
# selection, written to show that select leaves them out
SAMPLE_SPEC = TreeSpec(accessories=("S001", "S002"), lights=("L1", "L2", "L10"),
                       expressions=("E01",), cameras=("C4", "C7", "C1"))


def sample_summary(spec: TreeSpec, subjects: int, out: Path) -> str:
    """What ``build_kface_tree`` wrote with ``spec``, and how many photos the default
    selection keeps (the others are written to show that they are left out)."""
    import math

    from tasks.select import SelectionConfig

    selection = SelectionConfig()
    values = {"accessories": spec.accessories, "lights": spec.lights,
              "expressions": spec.expressions, "cameras": spec.cameras}
    kept = {name: [v for v in vs if v in getattr(selection, name)]
            for name, vs in values.items()}
    left_out = [v for name, vs in values.items() for v in vs if v not in kept[name]]
    total = subjects * math.prod(len(vs) for vs in values.values())
    selected = subjects * math.prod(len(vs) for vs in kept.values())
    return (f"wrote {total} photos of {subjects} subjects under {out}/High_Resolution and "
            f"{out}/KFace_metadata.csv; the default selection keeps {selected} of them"
            + (f" ({', '.join(left_out)} lie outside K-Face's usual selection, written to "
               "show that they are left out)" if left_out else ""))


def read_face_labels(faces_dir: Path) -> pd.DataFrame:
    """Read ``faces_dir/labels.csv`` into columns ``file``, ``age_band``, ``gender``."""
    labels = pd.read_csv(Path(faces_dir) / "labels.csv", dtype=str)
    if "age_band" in labels:
        labels["age_band"] = labels["age_band"].map(normalise_age_band)
    else:
        labels["age_band"] = labels["age"].astype(float).map(age_to_band)
    labels["gender"] = labels["gender"].map(normalise_gender)
    return labels.dropna(subset=["age_band", "gender"]).reset_index(drop=True)


def face_placement(face_shape: tuple[int, ...], camera: str,
                   size: tuple[int, int] = HIGH_SIZE) -> tuple[int, int, int, int]:
    """Where ``compose_photo`` puts a source photo of ``face_shape``: ``(x, y, w, h)``."""
    width, height = size
    cam = int(camera[1:])
    scale = min(height * (0.55 + 0.02 * (cam % 5)) / face_shape[0],
                width * 0.6 / face_shape[1])
    fw, fh = max(1, int(face_shape[1] * scale)), max(1, int(face_shape[0] * scale))
    x = int((width - fw) * (0.3 + 0.4 * ((cam * 37) % 10) / 10))
    y = int((height - fh) * 0.5)
    return x, y, fw, fh


def placed_box(source_box: tuple[int, int, int, int], face_shape: tuple[int, ...],
               camera: str, expression: str, size: tuple[int, int] = HIGH_SIZE
               ) -> tuple[int, int, int, int]:
    """Map a ``(left, top, right, bottom)`` box in the source photo to the composed photo
    (scaled, moved, mirrored for E02), as ``compose_photo`` moves the pixels."""
    x, y, fw, fh = face_placement(face_shape, camera, size)
    sx, sy = fw / face_shape[1], fh / face_shape[0]
    left, top, right, bottom = source_box
    if expression == "E02":
        left, right = face_shape[1] - right, face_shape[1] - left
    return (int(round(x + left * sx)), int(round(y + top * sy)),
            int(round(x + right * sx)), int(round(y + bottom * sy)))


def compose_photo(face: np.ndarray, seed: int, light: str, camera: str, accessory: str,
                  expression: str, size: tuple[int, int] = HIGH_SIZE) -> np.ndarray:
    """Place ``face`` on a textured background of ``size`` and apply the attribute variants."""
    width, height = size
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=3)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = base
    noise = rng.normal(0, 12, (height // 8, width // 8, 3))
    canvas = np.clip(canvas + cv2.resize(noise, (width, height)), 0, 255).astype(np.uint8)
    x, y, fw, fh = face_placement(face.shape, camera, size)
    face = cv2.resize(face, (fw, fh), interpolation=cv2.INTER_AREA)
    if expression == "E02":
        face = face[:, ::-1]
    elif expression == "E03":
        face = cv2.GaussianBlur(face, (5, 5), 0)
    if accessory in ("S002", "S003"):  # a dark band (glasses / hat brim)
        top = fh // 4 if accessory == "S002" else 0
        face = face.copy()
        face[top:top + fh // 8] = (face[top:top + fh // 8] * 0.35).astype(np.uint8)
    canvas[y:y + fh, x:x + fw] = face
    gain = 0.6 + 0.8 * ((int(light[1:]) * 7) % 10) / 10
    return np.clip(canvas.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def source_face_box(face: np.ndarray) -> tuple[int, int, int, int] | None:
    """The subject's face in a source photo: the largest face the detector finds (at 0.5)
    on the photo as it is, where the face fills the frame; None when there is none.

    This is the ground truth written beside each composed photo: the composed photo shows
    the same face smaller, on another background, perhaps mirrored, darkened or blurred,
    so the detect stage must find the box that this one maps to.
    """
    from models.detector import DetectorConfig, get_detector

    faces = get_detector(DetectorConfig(confidence=0.5)).detect(face)
    if not faces:
        return None
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])).box


def write_metadata_csv(path: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    """Write ``(ID, age_band, gender)`` rows as the K-Face CP949 CSV (``30대``, ``남``/``여``)."""
    frame = pd.DataFrame(
        [(sid, band.replace("s", "대"), KOREAN_GENDER[g]) for sid, band, g in rows],
        columns=["ID", "연령대", "성별"],
    )
    with atomic_path(Path(path)) as tmp:
        frame.to_csv(tmp, index=False, encoding="cp949")


def build_kface_tree(faces_dir: Path, out: Path, n_subjects: int, spec: TreeSpec = TreeSpec(),
                     seed: int = 0, first_id: int = 19062400, quality: int = 90,
                     ground_truth: bool = True) -> pd.DataFrame:
    """Write a K-Face tree under ``out`` and ``out/KFace_metadata.csv``.

    With ``ground_truth`` each ``Cnn.jpg`` gets a ``Cnn.txt`` beside it, as K-Face ships
    for some photos: the placed face's box, one line ``left top right bottom`` in pixels
    (``source_face_box`` mapped by ``placed_box``; subjects whose source photo has no
    detectable face get none).

    Uses ``n_subjects`` labelled photos of ``faces_dir`` drawn at random (``seed``), so
    every age band and gender appears. Returns the subjects' table: ``subject_id``,
    ``source``, ``age_band``, ``gender``.
    """
    labels = read_face_labels(faces_dir)
    if len(labels) < n_subjects:
        raise ValueError(f"{faces_dir} has only {len(labels)} usable labelled photos")
    labels = labels.sample(n_subjects, random_state=seed)
    out = Path(out)
    subjects = []
    for offset, rec in enumerate(labels.itertuples(index=False)):
        sid = f"{first_id + offset:08d}"
        face = cv2.imread(str(Path(faces_dir) / rec.file))
        if face is None:
            raise ValueError(f"{Path(faces_dir) / rec.file}: cannot be decoded")
        truth = source_face_box(face) if ground_truth else None
        for s in spec.accessories:
            for light in spec.lights:
                for e in spec.expressions:
                    folder = out / "High_Resolution" / sid / s / light / e
                    folder.mkdir(parents=True, exist_ok=True)
                    for c in spec.cameras:
                        seed = zlib.crc32(f"{sid}/{s}/{light}/{e}/{c}".encode())
                        img = compose_photo(face, seed, light, c, s, e, spec.size)
                        cv2.imwrite(str(folder / f"{c}.jpg"), img,
                                    [cv2.IMWRITE_JPEG_QUALITY, quality])
                        if truth is not None:
                            box = placed_box(truth, face.shape, c, e, spec.size)
                            write_box_file(folder / f"{c}.txt", box)
        subjects.append((sid, rec.file, rec.age_band, rec.gender))
    table = pd.DataFrame(subjects, columns=["subject_id", "source", "age_band", "gender"])
    if (Path(faces_dir) / SYNTHETIC_MARKER).exists():
        (out / SYNTHETIC_MARKER).write_text(_SYNTHETIC_NOTE)
    write_metadata_csv(out / "KFace_metadata.csv",
                       list(zip(table.subject_id, table.age_band, table.gender, strict=True)))
    return table


@dataclass(frozen=True)
class Visit:
    """One person in view of a generated shop camera: the face photo ``person`` (a file
    under the faces folder) from ``start_s`` to ``end_s``, walking slowly in lane
    ``lane`` (0, 1 or 2: left, middle, right)."""

    person: str
    start_s: float
    end_s: float
    lane: int


FACE_SIZE = (150, 170)  # (width, height) of a face in a generated clip


def write_visit_clip(faces_dir: Path, visits: Sequence[Visit], path: Path, fps: int = 10,
                     size: tuple[int, int] = (640, 480), miss_rate: float = 0.0,
                     seed: int = 0) -> int:
    """Write an MP4 clip of ``visits`` (real face photos on a grey wall, each walking a
    pixel a frame back and forth inside its lane) and return its frame count. With
    ``miss_rate``, each visible face is left out of a frame with that probability (a face
    the detector would miss: turned away, hidden), never in a visit's first or last
    frame."""
    rng = np.random.default_rng(seed)
    width, height = size
    lane_width = width // 3
    faces = {v.person: cv2.resize(cv2.imread(str(Path(faces_dir) / v.person)), FACE_SIZE)
             for v in visits}
    frames = int(np.ceil(max(v.end_s for v in visits) * fps)) + fps
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    top = (height - FACE_SIZE[1]) // 2
    for i in range(frames):
        frame = np.full((height, width, 3), 110, np.uint8)
        for v in visits:
            first, last = round(v.start_s * fps), round(v.end_s * fps) - 1
            if not first <= i <= last or (first < i < last and rng.random() < miss_rate):
                continue
            span = max(1, lane_width - FACE_SIZE[0] - 10)  # back and forth in the lane
            step = (i - first) % (2 * span)
            drift = step if step < span else 2 * span - step
            x = v.lane * lane_width + 5 + drift
            frame[top:top + FACE_SIZE[1], x:x + FACE_SIZE[0]] = faces[v.person]
        writer.write(frame)
    writer.release()
    return frames
