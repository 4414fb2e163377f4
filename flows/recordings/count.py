"""The count stage of the recordings pipeline: each video of the folder counted into
the store (``inference.recordings``), one unit (shard) per video, keyed on its content
(sha256, with the run folder's stat cache), the model's id and the settings that change
a count. A rerun counts only new or changed videos; a run killed halfway redoes none it
finished, and a video's count replaces its earlier one in the store (never doubled)."""

from __future__ import annotations

import hashlib
import re

import pandas as pd

from core.content import content_hashes
from core.sharding import Shard, ShardPlan, ShardResult
from core.storage import fingerprint
from flows.machinery import ShardedStage, StageConfig, stage_log
from inference import recordings
from inference.store import StoreError
from inference.video import VideoError

CODE_VERSION = "count-1"


def _root(c: StageConfig):
    """The recordings folder (VideoError, one line, when it is not one)."""
    root = c.recordings.root
    if not root.is_dir():
        raise VideoError(f"recordings folder {root} not found: give the folder of videos")
    return root


def _units(c: StageConfig) -> list[Shard]:
    """One shard per file below the folder, named by its path (readable, and a hash:
    two paths never share a name)."""
    root = _root(c)
    files = recordings.list_recordings(root)
    if not files:
        return []
    table = pd.DataFrame(files, columns=["path", "file_size", "mtime_ns"])
    hashes, _ = content_hashes(table, lambda rel: root / rel, c.folder.file_hashes,
                               save=c.writing)
    return sorted((Shard(_name(rel), (rel,), (size,), (mtime,), (digest,))
                   for (rel, size, mtime), digest in zip(files, hashes, strict=True)),
                  key=lambda s: s.name)


def _name(rel: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", rel)[-60:]
    return f"{readable}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def _model(c: StageConfig, shards: list[Shard]) -> dict:
    """What the keys need besides a video: the model's and detector's identity (the
    analyser loaded once here, to read them)."""
    def read() -> dict:
        from models.analyzer import FaceAnalyzer

        made_by = FaceAnalyzer(c.recordings.model, threads=1).provenance()
        return {"model": made_by["model"]["id"], "sha256": made_by["model"]["sha256"],
                "mirror": made_by["model"].get("mirror"), "detector": made_by["detector"]}

    return c.memo_get("model", read)


def _key(c: StageConfig, model: dict, shard: Shard) -> str:
    return fingerprint(shard.content_fingerprint(), model, c.recordings.key_settings(),
                       CODE_VERSION)


def _stored(c: StageConfig, shard: Shard, key: str, model: dict | None
            ) -> ShardResult | None:
    return recordings.stored_video(ROW.output(c.folder) / shard.filename, key)


def _call(c: StageConfig, plan: ShardPlan, shard: Shard):
    return recordings.count_video_shard, (
        c.recordings.root, shard, c.recordings, ROW.output(c.folder) / shard.filename,
        _key(c, plan.extra, shard), c.sharding.opencv_threads)


def _check(c: StageConfig) -> None:
    from inference.store import Store

    _root(c)
    Store(c.recordings.store).close()  # (a store that cannot be opened: one line)


def _finish(c: StageConfig, plan: ShardPlan, summary: dict) -> None:
    counts = summary["status_counts"]
    if counts.get("error"):
        import pyarrow.parquet as pq

        failed = [row for s in plan.shards
                  for row in pq.read_table(ROW.output(c.folder) / s.filename).to_pylist()
                  if row["status"] == "error"]
        stage_log().warning("count: %d file(s) could not be counted: %s", len(failed),
                            "; ".join(f"{r['path']}: {r['reason']}" for r in failed[:5]))


ROW = ShardedStage(name="count", work=recordings.count_video_shard, reads=(),
                   writes="recordings", sections=("recordings", "sharding"),
                   code_version=CODE_VERSION, scope="data", check=_check,
                   errors=(VideoError, StoreError), unit=_units, context=_model,
                   shard_key=_key, stored=_stored, shard_call=_call, finish=_finish)
