"""The crops stage: each face cut out (box with margin, or aligned on its landmarks) and
resized, as JPEG bytes, one shard file per group of subjects in ``crops/`` (the same
partition as detection, over ``faces.parquet``). A shard's key is its task's
(``tasks.crops.crop_shard_key``): the photos' content, their boxes (and landmarks when
aligned) and the crop settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from core.sharding import Shard, ShardPlan, ShardResult, plan_shards
from flows.machinery import ShardedStage, StageConfig, stage_log
from models.detector import LANDMARK_COLUMNS, LANDMARK_KINDS
from tasks import crops

# ``c`` below: a stage's view (``flows.machinery.StageConfig``) or a whole config: anything
# with ``.folder`` (a ``RunFolder``), ``.data`` and ``.crops``.
Sections = Any


@dataclass(frozen=True)
class CropPlan:
    """The crop shards and each face's box with margin and landmarks, as arrays (a face's
    row by its path: at K-Face size, 583,200 faces, lists of Python numbers per face
    would take gigabytes)."""

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
        return crops.crop_shard_key(shard, boxes, c.crops, landmarks, c.detector.margin)


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


def crop_files(c: Sections, crop_shards: list[Shard] | None = None) -> list[Path]:
    """The planned crop shard files (what train and evaluate read; never leftovers)."""
    if crop_shards is None:
        crop_shards = crop_plan(c).shards
    return [c.folder.crops / s.filename for s in crop_shards]


def crop_index(c: StageConfig):
    """For a stage that reads the crops (train, evaluate): the crop shards and their
    index of faces by split (``tasks.crop_stream.load_index``)."""
    from tasks.crop_stream import load_index

    producer, view = c.upstream("crops")
    return load_index(crop_files(view, producer.shards(view)), c.folder.faces,
                      c.folder.split)


def _plan(c: StageConfig, shards: list[Shard] | None = None) -> CropPlan:
    return c.memo_get("crop_plan", lambda: crop_plan(c))


def _stored(c: StageConfig, shard: Shard, key: str, plan: CropPlan | None
            ) -> ShardResult | None:
    return crops.stored_shard(c.folder.crops / shard.filename, key)


def _call(c: StageConfig, plan: ShardPlan, shard: Shard):
    boxes, landmarks = plan.extra.shard_faces(shard)
    return crops.crop_shard, (c.data.image_roots(), shard, boxes, c.crops, c.folder.crops,
                              c.sharding.opencv_threads, landmarks, c.detector.margin)


def _finish(c: StageConfig, plan: ShardPlan, summary: dict) -> None:
    if not c.crops.align:
        return
    unaligned = plan.extra.unaligned()  # faces without landmarks: box crops
    summary["status_counts"]["unaligned"] = unaligned
    if unaligned:
        stage_log().warning(
            "crops: %d faces have no landmarks (detector.kind %s finds none): cut as box "
            "crops; set detector.kind to one with landmarks (%s) to align them", unaligned,
            c.detector.kind, ", ".join(LANDMARK_KINDS))


ROW = ShardedStage(name="crops", work=crops.crop_shard, reads=("faces",), writes="crops",
                   sections=("data", "detector", "crops", "sharding"),
                   code_version=crops.CODE_VERSION, scope="data",
                   unit=lambda c: _plan(c).shards, context=_plan,
                   shard_key=lambda c, plan, shard: plan.shard_key(shard, c),
                   stored=_stored, shard_call=_call, finish=_finish)
