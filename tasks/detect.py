"""Detect stage: find the best face in every manifest image -> ``detections/shard-<name>.parquet``.

The manifest is partitioned by subject (``plan_shards``): a K-Face subject is one shard
(``shard-19062421.parquet``, 486 photos with the default selection); other layouts put
each subject into one of ``HASH_BUCKETS`` buckets by a stable hash of its ID
(``shard-h042.parquet``). So adding subjects adds or changes only their own shards,
removing photos changes only their subject's shard, and no performance setting
(``shard_size``, workers, Dask) moves a photo to another shard. ``sharding.shard_size``
only groups consecutive shards into one task run.

A shard file carries its cache key in its Parquet metadata: the shard's content
fingerprint (paths relative to the data root, sizes, mtimes), the detector settings (not
the weight paths), the weights' sha256 and ``CODE_VERSION``. A shard whose file already
holds the expected key is not recomputed, so reruns, crashed runs, moved dataset roots and
runs without Prefect's result store all resume from the files on disk. Rows whose photo
could not be read for a passing reason (status ``unreadable``) are retried on the next
run, alone.

Detections schema (one row per manifest image; see docs/data-contracts.md):
``path`` (str), ``image_width``, ``image_height`` (int32, full size), ``decode_factor``
(int8: 1, 2, 4, 8), ``n_faces`` (int16, faces above the threshold after NMS), ``score``
(float32, best face), ``x1, y1, x2, y2`` (int32, best face's raw box in pixels),
``left, top, right, bottom`` (int32, best box with margin, clipped to the image),
``status`` (``ok`` / ``no_face`` / ``error`` / ``unreadable``), ``error`` (str, the
message, else null), ``reason`` (str, the error's short code, see ``ImageError``), and the
best face's five landmarks in pixels, ``eye_r_x, eye_r_y, eye_l_x, ..., mouth_l_y``
(float32, ``models.detector.LANDMARK_COLUMNS``; null for res10, which finds none; shards
written before landmarks existed lack the columns and read as null).

Face chips (a labelled folder with ``chips: true``, ``data.folders``): images that are
already aligned faces, too small and too tight for a detector (UTKFace's 64 px chips).
No detector runs on them: each chip is one ``ok`` face whose box is the whole chip and
whose landmarks are the folder's chip geometry (five points as fractions of the chip's
side) scaled to the chip, so the crops stage maps the chip onto the template as it maps
a detected face. ``measure_chip_landmarks`` finds that geometry: YuNet on enlarged,
padded copies of up to 200 of the folder's chips, the median of each point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.images import ImageError, ImageRoots, as_roots, load_image
from core.sharding import Shard, ShardResult, holds_key
from core.storage import fingerprint, write_parquet_atomic
from models.detector import (
    CHIP_KIND,
    LANDMARK_COLUMNS,
    DetectorConfig,
    Face,
    get_detector,
    result_settings,
    weights_sha256,
)

CODE_VERSION = "detect-3"  # 2: phantom rule, aspect-keeping input; 3: error reasons

DETECTIONS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("decode_factor", pa.int8()),
        ("n_faces", pa.int16()),
        ("score", pa.float32()),
        ("x1", pa.int32()), ("y1", pa.int32()), ("x2", pa.int32()), ("y2", pa.int32()),
        ("left", pa.int32()), ("top", pa.int32()), ("right", pa.int32()), ("bottom", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("reason", pa.string()),
        *((name, pa.float32()) for name in LANDMARK_COLUMNS),
    ]
)


ChipGeometry = Mapping[str, Sequence[Sequence[float]]]  # folder name -> five (x, y) fractions
CHIP_SAMPLE = 200  # chips measured per folder
CHIP_ENLARGE, CHIP_PAD = 4, 0.5  # a 64 px chip -> 256 px, padded by half its side


def _chip_folder(rel: str, chips: ChipGeometry | None) -> str | None:
    """The chips folder a manifest path belongs to, or None."""
    if not chips:
        return None
    name = rel.partition("/")[0]
    return name if name in chips else None


def shard_cache_key(shard: Shard, detector: DetectorConfig,
                    chips: ChipGeometry | None = None, by_stat: bool = False) -> str | None:
    """Content fingerprint (the photos' paths and sha256, ``Shard.content_fingerprint``)
    + detector settings (``result_settings``: not the weights' paths, whose sha256 stands
    for them) + weights sha256 + code version; with chips in the shard, their folders'
    geometry (a shard without chips keeps the key it had). ``by_stat``: the key as it was
    made before content hashes (paths, sizes, mtimes; None without mtimes), with which
    ``stored_shard`` adopts the files of those runs."""
    content = shard.stat_fingerprint() if by_stat else shard.content_fingerprint()
    if content is None:
        return None
    used = sorted({name for p in shard.paths if (name := _chip_folder(p, chips))})
    geometry = [[name, np.round(np.asarray(chips[name], float), 4).tolist()]
                for name in used]
    return fingerprint(content, result_settings(detector), weights_sha256(detector),
                       CODE_VERSION, *([geometry] if used else []))


def measure_chip_landmarks(root: Path | ImageRoots, paths: Sequence[str],
                           sample: int = CHIP_SAMPLE) -> tuple[list[list[float]], int, int]:
    """Where a folder of aligned face chips puts the five landmarks: ``CHIP_KIND`` (YuNet,
    the kind that declares ``measures_chips``; threshold
    0.5) on up to ``sample`` chips (evenly spaced in ``paths``), each enlarged
    ``CHIP_ENLARGE`` times and padded by ``CHIP_PAD`` of its side with its edge pixels
    (a detector needs context around a face); per point the median, as fractions of the
    chip's width and height. Returns the points, the chips where a face was found and
    the chips tried."""
    roots = as_roots(root)
    detector = get_detector(DetectorConfig(kind=CHIP_KIND, confidence=0.5))
    picks = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1,
                                                     min(sample, len(paths))).astype(int))]
    found = []
    for rel in picks:
        try:
            chip = load_image(roots(rel))[0]
        except ImageError:
            continue
        h, w = chip.shape[:2]
        big = cv2.resize(chip, (w * CHIP_ENLARGE, h * CHIP_ENLARGE),
                         interpolation=cv2.INTER_CUBIC)
        pad = int(round(max(w, h) * CHIP_ENLARGE * CHIP_PAD))
        big = cv2.copyMakeBorder(big, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        faces = detector.detect(big)
        if faces and faces[0].landmarks is not None:
            points = (np.asarray(faces[0].landmarks) - pad) / CHIP_ENLARGE
            found.append(points / [w, h])
    if not found:
        raise ValueError(f"no face found in {len(picks)} chips (e.g. {picks[:2]}): set "
                         "the folder's chip_landmarks by hand")
    return np.median(found, axis=0).round(4).tolist(), len(found), len(picks)


def detect_images(root: Path | ImageRoots, paths: Sequence[str], cfg: DetectorConfig,
                  chips: ChipGeometry | None = None) -> pa.Table:
    """Run the detector on each path (read from ``root``: a folder, or the ``ImageRoots``
    of several); one row per path, never raises for a bad image (it becomes an ``error``
    row). A path in a folder of ``chips`` is not detected: its face is the whole chip,
    with the folder's landmarks (see the module docstring)."""
    roots = as_roots(root)
    cols: dict[str, list] = {name: [] for name in DETECTIONS_SCHEMA.names}
    for rel in paths:
        row = dict.fromkeys(DETECTIONS_SCHEMA.names)
        row["path"] = rel
        chip = _chip_folder(rel, chips)
        try:
            image, width, height, factor = load_image(
                roots(rel), 0 if chip else cfg.min_decode_side, cfg.max_pixels)
            row.update(image_width=width, image_height=height, decode_factor=factor)
            faces = (chip_faces(width, height, chips[chip]) if chip
                     else get_detector(cfg).detect(image, width, height))
        except ImageError as exc:
            row.update(status="unreadable" if exc.transient else "error", error=str(exc),
                       reason=exc.reason, n_faces=0)
        except cv2.error as exc:  # e.g. a degenerate image the network rejects
            row.update(status="error", error=f"OpenCV: {exc.err}", reason="detector",
                       n_faces=0)
        else:
            row["n_faces"] = len(faces)
            if faces:
                best = faces[0]
                row.update(status="ok", score=best.score)
                row.update(zip(("x1", "y1", "x2", "y2"), best.box, strict=True))
                row.update(zip(("left", "top", "right", "bottom"), best.box_margin, strict=True))
                if best.landmarks is not None:
                    row.update(zip(LANDMARK_COLUMNS,
                                   (v for point in best.landmarks for v in point), strict=True))
            else:
                row["status"] = "no_face"
        for name in cols:
            cols[name].append(row[name])
    return pa.table(cols, schema=DETECTIONS_SCHEMA)


def chip_faces(width: int, height: int, landmarks: Sequence[Sequence[float]]) -> list[Face]:
    """The one face of an aligned chip: the whole chip, with the folder's landmarks."""
    points = tuple((round(float(x) * width, 2), round(float(y) * height, 2))
                   for x, y in landmarks)
    box = (0, 0, width, height)
    return [Face(1.0, box, box, points)]


def conform(table: pa.Table) -> pa.Table:
    """A detections table in ``DETECTIONS_SCHEMA``: columns missing from a shard written by
    an earlier version (the landmarks) are added as nulls."""
    columns = [table.column(f.name) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in DETECTIONS_SCHEMA]
    return pa.table(columns, schema=DETECTIONS_SCHEMA)


def stored_shard(final: Path, key: str, stat_key: Callable[[], str | None] | None = None,
                 adopt: bool = False) -> ShardResult | None:
    """The summary of a shard file complete for ``key`` (``core.sharding.holds_key``;
    ``stat_key()``: the key of the same photos' sizes and mtimes, before keys had content
    hashes) with no ``unreadable`` row to retry, read from its status column; None when
    it needs work. The flow decides with it which shards to submit, and ``kface status``
    what a run would redo."""
    if not holds_key(final, key, stat_key, adopt):
        return None
    statuses = pq.read_table(final, columns=["status"]).column("status")
    counts = {c["values"]: c["counts"] for c in pc.value_counts(statuses).to_pylist()}
    if counts.get("unreadable"):
        return None
    return ShardResult.on_disk(final, len(statuses), counts)


def detect_shard(root: Path | ImageRoots, shard: Shard, cfg: DetectorConfig, out_dir: Path,
                 opencv_threads: int = 1, chips: ChipGeometry | None = None) -> ShardResult:
    """Detect one shard into ``out_dir/shard-<name>.parquet`` unless it is already there;
    a shard on disk with ``unreadable`` rows gets only those rows detected again."""
    cv2.setNumThreads(opencv_threads)
    final = Path(out_dir) / shard.filename
    key = shard_cache_key(shard, cfg, chips)
    retried, reused = 0, False
    if holds_key(final, key):
        table = pq.read_table(final, columns=["status"])
        redo = pc.equal(table.column("status"), "unreadable")
        retried = pc.sum(redo).as_py() or 0
        if retried:
            table = conform(pq.read_table(final).replace_schema_metadata(None))
            paths = table.filter(redo).column("path").to_pylist()
            table = pa.concat_tables([table.filter(pc.invert(redo)),
                                      detect_images(root, paths, cfg, chips)]
                                     ).sort_by("path")
            write_parquet_atomic(final, table, key, digest=False)
        reused = not retried
    else:
        table = detect_images(root, shard.paths, cfg, chips)
        write_parquet_atomic(final, table, key, digest=False)
    counts = pc.value_counts(table.column("status")).to_pylist()
    return ShardResult.done_here(shard, final, table.num_rows,
                                 {c["values"]: c["counts"] for c in counts}, reused, retried)
