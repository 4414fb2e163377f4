"""Detect stage: find the best face in every manifest image -> ``detections/shard-NNNNN.parquet``.

The manifest (sorted by path) is cut into consecutive shards of ``sharding.shard_size``
rows. Each shard is one unit of work and one file. A shard file carries its cache key in
its Parquet metadata: the shard's content fingerprint (paths, sizes, mtimes), the detector
settings, the weights' sha256 and ``CODE_VERSION``. A shard whose file already holds the
expected key is not recomputed, so reruns, crashed runs and runs without Prefect's result
store all resume from the files on disk.

Detections schema (one row per manifest image; see docs/data-contracts.md):
``path`` (str), ``image_width``, ``image_height`` (int32, full size), ``decode_factor``
(int8: 1, 2, 4, 8), ``n_faces`` (int16, faces above the threshold after NMS), ``score``
(float32, best face), ``x1, y1, x2, y2`` (int32, best face's raw box in pixels),
``left, top, right, bottom`` (int32, best box with margin, clipped to the image),
``status`` (``ok`` / ``no_face`` / ``error``), ``error`` (str, the reason, else null).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from models.detector import DetectorConfig, get_detector, weights_sha256
from tasks.images import ImageError, load_image
from tasks.storage import fingerprint, reuse_or_build

CODE_VERSION = "detect-2"  # 2: phantom rule, aspect-keeping input

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
    ]
)


class ShardingConfig(BaseModel):
    """How sharded stages split their work over worker processes."""

    model_config = ConfigDict(extra="forbid")

    shard_size: int = Field(
        250, ge=1, description="Images per shard (one task run, one file); the same "
        "manifest always gives the same shards.")
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1,
        description="Worker processes (ProcessPoolTaskRunner, spawn).",
    )
    opencv_threads: int = Field(1, ge=0, description="cv2.setNumThreads in each worker.")
    dask_address: str | None = Field(
        None, description="Run the sharded tasks on this existing Dask cluster "
        "(e.g. tcp://scheduler:8786) instead of local worker processes; every Dask worker "
        "must see data.root and out at the same paths.")


@dataclass(frozen=True)
class Shard:
    """One unit of sharded work: manifest rows ``[start, stop)``."""

    index: int
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    mtimes: tuple[int, ...]

    @property
    def filename(self) -> str:
        return f"shard-{self.index:05d}.parquet"

    def content_fingerprint(self) -> str:
        return fingerprint(self.paths, self.sizes, self.mtimes)


def plan_shards(manifest: pa.Table, shard_size: int) -> list[Shard]:
    """Cut the manifest (sorted by path) into consecutive shards of ``shard_size`` rows."""
    manifest = manifest.sort_by("path")
    paths = manifest.column("path").to_pylist()
    sizes = manifest.column("file_size").to_pylist()
    mtimes = manifest.column("mtime_ns").to_pylist()
    return [
        Shard(i // shard_size, tuple(paths[i:i + shard_size]), tuple(sizes[i:i + shard_size]),
              tuple(mtimes[i:i + shard_size]))
        for i in range(0, len(paths), shard_size)
    ]


def shard_cache_key(shard: Shard, detector: DetectorConfig) -> str:
    """Content fingerprint + detector settings + weights sha256 + code version."""
    return fingerprint(shard.content_fingerprint(), detector.model_dump(mode="json"),
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
            row.update(status="error", error=str(exc), n_faces=0)
        except cv2.error as exc:  # e.g. a degenerate image the network rejects
            row.update(status="error", error=f"OpenCV: {exc.err}", n_faces=0)
        else:
            row["n_faces"] = len(faces)
            if faces:
                best = faces[0]
                row.update(status="ok", score=best.score)
                row.update(zip(("x1", "y1", "x2", "y2"), best.box, strict=True))
                row.update(zip(("left", "top", "right", "bottom"), best.box_margin, strict=True))
            else:
                row["status"] = "no_face"
        for name in cols:
            cols[name].append(row[name])
    return pa.table(cols, schema=DETECTIONS_SCHEMA)


def detect_shard(root: Path, shard: Shard, cfg: DetectorConfig, out_dir: Path,
                 opencv_threads: int = 1) -> dict:
    """Detect one shard into ``out_dir/shard-NNNNN.parquet`` unless it is already there.

    Returns a summary: ``{"shard", "file", "rows", "reused", "status_counts"}``.
    """
    cv2.setNumThreads(opencv_threads)
    final = Path(out_dir) / shard.filename
    key = shard_cache_key(shard, cfg)
    table, reused = reuse_or_build(final, key, lambda: detect_images(root, shard.paths, cfg))
    if table is None:
        table = pq.read_table(final, columns=["status"])
    counts = pc.value_counts(table.column("status")).to_pylist()
    return {
        "shard": shard.index,
        "file": str(final),
        "rows": table.num_rows,
        "reused": reused,
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
