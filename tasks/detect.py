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
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

import cv2
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.images import ImageError, load_image
from core.sharding import Shard
from core.storage import fingerprint, read_cache_key, write_parquet_atomic
from models.detector import (
    LANDMARK_COLUMNS,
    DetectorConfig,
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


def shard_cache_key(shard: Shard, detector: DetectorConfig) -> str:
    """Content fingerprint + detector settings (``result_settings``: not the weights' paths,
    whose sha256 stands for them) + weights sha256 + code version."""
    return fingerprint(shard.content_fingerprint(), result_settings(detector),
                       weights_sha256(detector), CODE_VERSION)


def detect_images(root: Path, paths: Sequence[str], cfg: DetectorConfig) -> pa.Table:
    """Run the detector on ``root / path`` for each path; one row per path, never raises
    for a bad image (it becomes an ``error`` row)."""
    detector = get_detector(cfg)
    cols: dict[str, list] = {name: [] for name in DETECTIONS_SCHEMA.names}
    for rel in paths:
        row = dict.fromkeys(DETECTIONS_SCHEMA.names)
        row["path"] = rel
        try:
            image, width, height, factor = load_image(
                Path(root) / rel, cfg.min_decode_side, cfg.max_pixels)
            row.update(image_width=width, image_height=height, decode_factor=factor)
            faces = detector.detect(image, width, height)
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


def conform(table: pa.Table) -> pa.Table:
    """A detections table in ``DETECTIONS_SCHEMA``: columns missing from a shard written by
    an earlier version (the landmarks) are added as nulls."""
    columns = [table.column(f.name) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in DETECTIONS_SCHEMA]
    return pa.table(columns, schema=DETECTIONS_SCHEMA)


def stored_shard(final: Path, key: str) -> dict | None:
    """The summary of a shard file that is complete for ``key`` (it holds the key and no
    ``unreadable`` row to retry), read from its status column; None when it needs work.
    The flow decides with it which shards to submit, and ``kface status`` what a run
    would redo."""
    if read_cache_key(final) != key:
        return None
    statuses = pq.read_table(final, columns=["status"]).column("status")
    counts = {c["values"]: c["counts"] for c in pc.value_counts(statuses).to_pylist()}
    if counts.get("unreadable"):
        return None
    return {"shard": Path(final).stem.removeprefix("shard-"), "file": str(final),
            "rows": len(statuses), "reused": True, "retried": 0, "status_counts": counts,
            "ran_on": None}


def detect_shard(root: Path, shard: Shard, cfg: DetectorConfig, out_dir: Path,
                 opencv_threads: int = 1) -> dict:
    """Detect one shard into ``out_dir/shard-<name>.parquet`` unless it is already there;
    a shard on disk with ``unreadable`` rows gets only those rows detected again.

    Returns a summary: ``{"shard", "file", "rows", "reused", "retried", "status_counts"}``.
    """
    cv2.setNumThreads(opencv_threads)
    final = Path(out_dir) / shard.filename
    key = shard_cache_key(shard, cfg)
    retried, reused = 0, False
    if final.exists() and read_cache_key(final) == key:
        table = pq.read_table(final, columns=["status"])
        redo = pc.equal(table.column("status"), "unreadable")
        retried = pc.sum(redo).as_py() or 0
        if retried:
            table = conform(pq.read_table(final).replace_schema_metadata(None))
            paths = table.filter(redo).column("path").to_pylist()
            table = pa.concat_tables([table.filter(pc.invert(redo)),
                                      detect_images(root, paths, cfg)]).sort_by("path")
            write_parquet_atomic(final, table, key, digest=False)
        reused = not retried
    else:
        table = detect_images(root, shard.paths, cfg)
        write_parquet_atomic(final, table, key, digest=False)
    counts = pc.value_counts(table.column("status")).to_pylist()
    return {
        "shard": shard.name,
        "file": str(final),
        "rows": table.num_rows,
        "reused": reused,
        "retried": retried,
        "status_counts": {c["values"]: c["counts"] for c in counts},
        "ran_on": worker_id(),
    }


def worker_id() -> str:
    """``host:pid`` of the process doing a shard (the stage summary lists them)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def remove_stale_shards(out_dir: Path, shards: Sequence[Shard]) -> list[str]:
    """Delete shard files that the current plan does not contain (e.g. after the manifest
    shrank), so readers of ``shard-*.parquet`` see exactly this run's shards."""
    wanted = {s.filename for s in shards}
    removed = []
    for path in sorted(Path(out_dir).glob("shard-*.parquet")):
        if path.name not in wanted:
            path.unlink()
            removed.append(path.name)
    return removed
