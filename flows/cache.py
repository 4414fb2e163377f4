"""The shard plans of the sharded stages, and what the run folder's shards report.

A stage's cache key is derived from its row in the stage table (``Stage.key`` in
``flows.stages``): the digests of the outputs it reads (a Parquet file's stored
``content_digest``, a sharded output's planned shard keys, a model's training key), the
settings its row names (a file's setting by the file's sha256, never its path), what it
reads from outside the run folder (the select stage's scan) and its code version. The
same dataset reached through a symlink, a relative path or another mount point gives the
same keys. A detection or crop shard's own key is its task's (``tasks.detect``,
``tasks.crops``): the photos' paths below the root and content, and the settings. Where
the outputs live: ``core.run_folder``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from core.run_folder import RunFolder
from core.sharding import Shard, plan_shards
from models.detector import LANDMARK_COLUMNS
from tasks.crops import crop_shard_key

# The functions below take ``c``: a stage's ``flows.stages.StageConfig`` (the sections
# that stage declared): anything with ``.folder`` (a ``RunFolder``) and the sections read.
Sections = Any


def detect_shards(c: Sections) -> list[Shard]:
    """The detection shards of the run folder's manifest (empty before select ran)."""
    if not c.folder.manifest.exists():
        return []
    names = set(pq.read_schema(c.folder.manifest).names)
    manifest = pq.read_table(c.folder.manifest, columns=[
        n for n in ("path", "subject_id", "file_size", "mtime_ns", "sha256") if n in names])
    return plan_shards(manifest, c.data.layout)


@dataclass(frozen=True)
class CropPlan:
    """The crop shards (same partition as detection, over ``faces.parquet``) and each
    face's box with margin and landmarks, as arrays (a face's row by its path: at K-Face
    size, 583,200 faces, lists of Python numbers per face would take gigabytes)."""

    shards: list[Shard]
    row: dict[str, int]  # path -> its row in the arrays
    boxes: np.ndarray  # (faces, 4) int: left, top, right, bottom
    landmarks: np.ndarray | None  # (faces, 10) float, NaN for a face without them

    def shard_faces(self, shard: Shard) -> tuple[list[list[int]], list | None]:
        """A shard's boxes and landmarks (five (x, y) points, None for a face without
        them), in its path order (``landmarks`` None when no face has any)."""
        rows = [self.row[p] for p in shard.paths]
        boxes = self.boxes[rows].tolist()
        if self.landmarks is None:
            return boxes, None
        chosen = self.landmarks[rows]
        found = np.isfinite(chosen).all(axis=1).tolist()
        points = chosen.reshape(-1, 5, 2).tolist()
        return boxes, [p if ok else None for p, ok in zip(points, found, strict=True)]

    def unaligned(self) -> int:
        """How many faces have no landmarks (aligned crops cut them as box crops)."""
        if self.landmarks is None:
            return len(self.boxes)
        return int((~np.isfinite(self.landmarks).all(axis=1)).sum())

    def shard_key(self, shard: Shard, c: Sections) -> str:
        boxes, landmarks = self.shard_faces(shard)
        return crop_shard_key(shard, boxes, c.crops, landmarks, c.detector.margin)


def crop_plan(c: Sections) -> CropPlan:
    """The crop stage's plan, read from ``faces.parquet`` (empty before merge ran); the
    landmarks are read with ``crops.align`` only (box crops and their keys ignore them)."""
    path = c.folder.faces
    if not path.exists():
        return CropPlan([], {}, np.zeros((0, 4), int), None)
    names = pq.read_schema(path).names
    landmark_columns = [col for col in LANDMARK_COLUMNS if col in names and c.crops.align]
    content = [col for col in ("mtime_ns", "sha256") if col in names]
    table = pq.read_table(path, columns=["path", "subject_id", "file_size", *content,
                                         "left", "top", "right", "bottom",
                                         *landmark_columns])
    boxes = np.column_stack([table.column(col).to_numpy()
                             for col in ("left", "top", "right", "bottom")])
    landmarks = None
    if len(landmark_columns) == len(LANDMARK_COLUMNS):
        points = np.column_stack([table.column(col).to_numpy(zero_copy_only=False)
                                  for col in LANDMARK_COLUMNS]).astype(float)
        if np.isfinite(points).all(axis=1).any():
            landmarks = points
    row = {p: i for i, p in enumerate(table.column("path").to_pylist())}
    shards = plan_shards(table.drop_columns(["left", "top", "right", "bottom",
                                              *landmark_columns]), c.data.layout)
    return CropPlan(shards, row, boxes, landmarks)


def detection_errors(folder: RunFolder, shards: list[Shard],
                     examples: dict[str, list[str]] | None = None
                     ) -> dict[str, dict[str, int]]:
    """Counts of the planned detection shards' failed rows: ``{status: {reason: n}}`` for
    the statuses ``error`` (final) and ``unreadable`` (retried by the next run). With
    ``examples``, up to three paths per reason are added to it."""
    counts: dict[str, dict[str, int]] = {}
    for shard in shards:
        if not (folder.detections / shard.filename).exists():
            continue
        file = pq.ParquetFile(folder.detections / shard.filename)
        if "reason" not in file.schema_arrow.names:
            continue  # written before reasons were recorded; recomputed by the next run
        table = file.read(columns=["path", "status", "reason"])
        for path, status, reason in zip(table.column("path").to_pylist(),
                                        table.column("status").to_pylist(),
                                        table.column("reason").to_pylist(), strict=True):
            if status in ("error", "unreadable"):
                by_reason = counts.setdefault(status, {})
                by_reason[reason] = by_reason.get(reason, 0) + 1
                if examples is not None and len(examples.setdefault(reason, [])) < 3:
                    examples[reason].append(path)
    return counts


def crop_files(c: Sections, crop_shards: list[Shard] | None = None) -> list[Path]:
    """The planned crop shard files (what train and evaluate read; never leftovers)."""
    if crop_shards is None:
        crop_shards = crop_plan(c).shards
    return [c.folder.crops / s.filename for s in crop_shards]
