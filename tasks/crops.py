"""Crops stage: cut every face once -> ``crops/shard-NNNNN.parquet`` (``path``, ``image``).

Each face is cropped to its box with margin, resized to ``crops.size`` (INTER_AREA),
converted to RGB and stored as JPEG bytes. Training decodes these small crops instead of
re-reading and decoding every full photo in every epoch, as the original did. Shards are
planned, cached and written exactly like detection shards; the key adds the boxes and
the crop settings. A shard in which a photo could not be read for a passing reason is
written without its key, so the next run builds it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.detect import Shard, worker_id
from tasks.images import ImageError, load_image
from tasks.storage import fingerprint, read_cache_key, write_parquet_atomic

CODE_VERSION = "crops-1"
CHUNK_ROWS = 64  # crops per Parquet row group: the unit the training input reads
TRANSIENT_PREFIX = "unreadable: "  # an error that the next run retries
CROPS_SCHEMA = pa.schema([("path", pa.string()), ("image", pa.binary()),
                          ("error", pa.string())])


class CropConfig(BaseModel):
    """Face-crop cache settings (the crop size is the model's input size)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(224, ge=32, le=1024, description="Crop side in pixels = model input.")
    jpeg_quality: int = Field(95, ge=50, le=100)


def crop_face(image_bgr: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """Crop ``box`` = (left, top, right, bottom) from a BGR image; return RGB size x size."""
    left, top, right, bottom = (int(v) for v in box)
    face = image_bgr[top:bottom, left:right]
    if face.size == 0:
        raise ImageError(f"empty crop box {tuple(box)} for a {image_bgr.shape[1]}x"
                         f"{image_bgr.shape[0]} image")
    face = cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(face, cv2.COLOR_BGR2RGB)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()


def crop_images(root: Path, paths: Sequence[str], boxes: Sequence[Sequence[int]],
                cfg: CropConfig) -> pa.Table:
    """Crop each ``root / path`` at its box; a photo that fails gets ``error`` set."""
    images, errors = [], []
    for rel, box in zip(paths, boxes, strict=True):
        try:
            image, *_ = load_image(Path(root) / rel)
            images.append(encode_jpeg(crop_face(image, box, cfg.size), cfg.jpeg_quality))
            errors.append(None)
        except ImageError as exc:
            images.append(None)
            errors.append(f"{TRANSIENT_PREFIX}{exc}" if exc.transient else str(exc))
    return pa.table({"path": list(paths), "image": images, "error": errors},
                    schema=CROPS_SCHEMA)


def crop_shard_key(shard: Shard, boxes: Sequence[Sequence[int]], cfg: CropConfig) -> str:
    """Content fingerprint of the shard's photos + their boxes + crop settings + code."""
    return fingerprint(shard.content_fingerprint(), [list(b) for b in boxes],
                       cfg.model_dump(), CODE_VERSION)


def crop_shard(root: Path, shard: Shard, boxes: Sequence[Sequence[int]], cfg: CropConfig,
               out_dir: Path, opencv_threads: int = 1) -> dict:
    """Build one crop shard file unless it already holds this content's key."""
    cv2.setNumThreads(opencv_threads)
    final = Path(out_dir) / shard.filename
    key = crop_shard_key(shard, boxes, cfg)
    reused = final.exists() and read_cache_key(final) == key
    if reused:
        table = pq.read_table(final, columns=["error"])
    else:
        table = crop_images(root, shard.paths, boxes, cfg)
        errors = [e for e in table.column("error").to_pylist() if e]
        retry = any(e.startswith(TRANSIENT_PREFIX) for e in errors)
        write_parquet_atomic(final, table, None if retry else key, row_group_size=CHUNK_ROWS,
                             digest=False)
    ok = table.column("error").null_count  # error is null where the crop succeeded
    return {"shard": shard.name, "file": str(final), "rows": table.num_rows,
            "reused": reused, "status_counts": {"ok": ok, "error": table.num_rows - ok},
            "ran_on": worker_id()}
