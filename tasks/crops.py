"""Crops stage: cut every face once -> ``crops/shard-NNNNN.parquet`` (``path``, ``image``).

Each face is cut by ``models.face_crop.face_crop`` (the function every inference path
uses too): its box with margin resized to ``crops.size`` (INTER_AREA), or with
``crops.align`` the landmark-aligned crop (faces without landmarks, as res10 finds them,
fall back to the box crop and are counted as ``unaligned``), converted to RGB and stored
as JPEG bytes. Training decodes these small crops instead of re-reading and decoding
every full photo in every epoch, as the original did. Shards are planned, cached and
written exactly like detection shards; the key adds the boxes and the crop settings (and,
for aligned crops, the landmarks and the margin). A shard in which a photo could not be
read for a passing reason is written without its key, so the next run builds it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from core.images import ImageError, ImageRoots, as_roots, load_image
from core.sharding import Shard, ShardResult, holds_key
from core.storage import fingerprint, write_parquet_atomic
from models.face_crop import CropError, CropSpec, face_crop

CODE_VERSION = "crops-1"
CHUNK_ROWS = 64  # crops per Parquet row group: the unit the training input reads
TRANSIENT_PREFIX = "unreadable: "  # an error that the next run retries
CROPS_SCHEMA = pa.schema([("path", pa.string()), ("image", pa.binary()),
                          ("error", pa.string())])
Landmarks = Sequence[Sequence[float]] | None  # five (x, y) points, or None


class CropConfig(BaseModel):
    """Face-crop cache settings (the crop size is the model's input size)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(224, ge=32, le=1024, description="Crop side in pixels = model input.")
    jpeg_quality: int = Field(95, ge=50, le=100)
    align: bool = Field(
        False, description="Align each face by its five landmarks (a similarity transform "
        "to a fixed template: eyes level, same place in every crop) instead of cutting "
        "its box. Needs detector.kind: yunet (res10 finds no landmarks: its faces are "
        "box-cropped, and the run says so). The model records it; inference cuts faces "
        "the same way.")

    def key_settings(self) -> dict:
        """What cache keys read of this section: without ``align`` while it is off, so
        models trained before alignment existed stay current."""
        return self.model_dump(exclude=None if self.align else {"align"})

    def spec(self, margin: float) -> CropSpec:
        """The crop function's settings; ``margin`` is the detector's."""
        return CropSpec(self.size, self.align, margin)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()


def crop_images(root: Path | ImageRoots, paths: Sequence[str], boxes: Sequence[Sequence[int]],
                cfg: CropConfig, landmarks: Sequence[Landmarks] | None = None,
                margin: float = 0.2) -> pa.Table:
    """Cut each path's face (box, or landmarks with ``cfg.align``; read from ``root``, a
    folder or the ``ImageRoots`` of several); a photo that fails gets ``error`` set."""
    spec = cfg.spec(margin)
    roots = as_roots(root)
    images, errors = [], []
    for rel, box, points in zip(paths, boxes, landmarks or [None] * len(paths), strict=True):
        try:
            image, *_ = load_image(roots(rel))
            images.append(encode_jpeg(face_crop(image, box, points, spec)[0],
                                      cfg.jpeg_quality))
            errors.append(None)
        except ImageError as exc:
            images.append(None)
            errors.append(f"{TRANSIENT_PREFIX}{exc}" if exc.transient else str(exc))
        except CropError as exc:
            images.append(None)
            errors.append(str(exc))
    return pa.table({"path": list(paths), "image": images, "error": errors},
                    schema=CROPS_SCHEMA)


def aligns(cfg: CropConfig, landmarks: Sequence[Landmarks] | None) -> bool:
    """Whether any face of these is cut aligned (``align`` on and landmarks known)."""
    return cfg.align and any(p is not None for p in landmarks or ())


def crop_shard_key(shard: Shard, boxes: Sequence[Sequence[int]], cfg: CropConfig,
                   landmarks: Sequence[Landmarks] | None = None, margin: float = 0.2) -> str:
    """Content fingerprint of the shard's photos + their boxes + crop settings + code;
    aligned crops add the landmarks and the margin. Box crops (``align`` off, or no
    landmarks) keep the key they had before alignment existed."""
    if not aligns(cfg, landmarks):
        return fingerprint(shard.content_fingerprint(), [list(b) for b in boxes],
                           cfg.model_dump(exclude={"align"}), CODE_VERSION)
    return fingerprint(shard.content_fingerprint(), [list(b) for b in boxes],
                       cfg.model_dump(), [_flat(p) for p in landmarks], margin, CODE_VERSION)


def _flat(points: Landmarks | None) -> list[float] | None:
    """Five (x, y) points as ten numbers (lists of floats as they are: ``np.asarray`` per
    face cost 3 s of 583,200 faces' keys)."""
    if points is None:
        return None
    if isinstance(points, list) and all(isinstance(xy, list) for xy in points):
        return [v for xy in points for v in xy]
    return np.asarray(points).ravel().tolist()


def stored_shard(final: Path, key: str) -> ShardResult | None:
    """The summary of a crop shard file that holds ``key`` (its error column's null
    count from the file's statistics, no data read); None when it needs work."""
    if not holds_key(final, key):
        return None
    meta = pq.ParquetFile(final).metadata
    error = meta.schema.to_arrow_schema().get_field_index("error")
    rows = meta.num_rows
    stats = [meta.row_group(i).column(error).statistics for i in range(meta.num_row_groups)]
    if all(s is not None and s.has_null_count for s in stats):
        ok = sum(s.null_count for s in stats)
    else:  # a writer without statistics: read the column
        ok = pq.read_table(final, columns=["error"]).column("error").null_count
    return ShardResult.on_disk(final, rows, {"ok": ok, "error": rows - ok})


def crop_shard(root: Path | ImageRoots, shard: Shard, boxes: Sequence[Sequence[int]],
               cfg: CropConfig, out_dir: Path, opencv_threads: int = 1,
               landmarks: Sequence[Landmarks] | None = None, margin: float = 0.2
               ) -> ShardResult:
    """Build one crop shard file unless it already holds this content's key."""
    cv2.setNumThreads(opencv_threads)
    final = Path(out_dir) / shard.filename
    key = crop_shard_key(shard, boxes, cfg, landmarks, margin)
    reused = holds_key(final, key)
    if reused:
        table = pq.read_table(final, columns=["error"])
    else:
        table = crop_images(root, shard.paths, boxes, cfg, landmarks, margin)
        errors = [e for e in table.column("error").to_pylist() if e]
        retry = any(e.startswith(TRANSIENT_PREFIX) for e in errors)
        write_parquet_atomic(final, table, None if retry else key, row_group_size=CHUNK_ROWS,
                             digest=False)
    ok = table.column("error").null_count  # error is null where the crop succeeded
    return ShardResult.done_here(shard, final, table.num_rows,
                                 {"ok": ok, "error": table.num_rows - ok}, reused)
