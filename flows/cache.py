"""Where each stage's output lives, what its cache key is, and whether it is up to date.

A stage's cache key is the fingerprint of what its output depends on: its upstream
outputs (file sha256, or the shards' own keys), its config section(s) and its code
version. The key is stored with the output (Parquet schema metadata, or the stage's
``stages/<stage>.json``), so a run skips a stage whose stored key equals the expected
one, and ``kface status`` can tell, without running anything, which stages a run would
redo. Both use the functions below; nothing else computes keys for the run folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flows.config import PipelineConfig
from tasks.crops import crop_shard_key
from tasks.detect import Shard, plan_shards, shard_cache_key
from tasks.storage import file_sha256, fingerprint, read_cache_key
from tasks.train import CODE_VERSION as TRAIN_CODE_VERSION

SELECT_CODE_VERSION = "select-1"
MERGE_CODE_VERSION = "merge-1"
SPLIT_CODE_VERSION = "split-1"


def stage_paths(out: Path) -> dict[str, Path]:
    """The one place that says where each stage's output lives in a run folder."""
    out = Path(out)
    return {
        "config": out / "config.yaml",
        "manifest": out / "manifest.parquet",
        "detections": out / "detections",
        "faces": out / "faces.parquet",
        "split": out / "split.parquet",
        "crops": out / "crops",
        "model": out / "model",
        "logs": out / "logs",
        "reports": out / "reports",
        "stages": out / "stages",
    }


def table_digest(table: pa.Table) -> str:
    """sha256 of a table's data (schema metadata left out)."""
    sink = pa.BufferOutputStream()
    table = table.replace_schema_metadata(None)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _sha(path: Path) -> str | None:
    return file_sha256(path) if path.exists() else None


def _shard_keys(folder: Path) -> list[str | None]:
    return [read_cache_key(p) for p in sorted(Path(folder).glob("shard-*.parquet"))]


def select_key(config: PipelineConfig, manifest: pa.Table) -> str:
    """The dataset scan result (paths, sizes, mtimes) + data/selection settings."""
    return fingerprint(config.data.model_dump(mode="json"),
                       config.selection.model_dump(mode="json"), table_digest(manifest),
                       SELECT_CODE_VERSION)


def merge_key(config: PipelineConfig) -> str:
    paths = stage_paths(config.out)
    metadata = config.data.metadata if config.data.layout == "kface" else None
    return fingerprint(_sha(paths["manifest"]), _shard_keys(paths["detections"]),
                       _sha(metadata) if metadata else None, MERGE_CODE_VERSION)


def split_key(config: PipelineConfig) -> str:
    return fingerprint(_sha(stage_paths(config.out)["faces"]),
                       config.split.model_dump(mode="json"), SPLIT_CODE_VERSION)


def train_key(config: PipelineConfig) -> str:
    paths = stage_paths(config.out)
    return fingerprint(_shard_keys(paths["crops"]), _sha(paths["faces"]), _sha(paths["split"]),
                       config.crops.model_dump(), config.model.model_dump(),
                       config.train.model_dump(), TRAIN_CODE_VERSION)


def evaluate_key(train_cache_key: str | None) -> str:
    # imported here: tasks.evaluate loads matplotlib + scikit-learn (~100 MB), which the
    # spawned shard workers, importing this module with the flow, do not need
    from tasks.evaluate import CODE_VERSION

    return fingerprint(train_cache_key, CODE_VERSION)


def detect_shards(config: PipelineConfig) -> list[Shard]:
    manifest = pq.read_table(stage_paths(config.out)["manifest"],
                             columns=["path", "file_size", "mtime_ns"])
    return plan_shards(manifest, config.sharding.shard_size)


def crop_plan(config: PipelineConfig) -> tuple[list[Shard], dict[str, list[int]]]:
    """The crop shards (same cut as detection, over ``faces.parquet``) and each face's box."""
    table = pq.read_table(stage_paths(config.out)["faces"],
                          columns=["path", "file_size", "mtime_ns", "left", "top", "right",
                                   "bottom"])
    faces = table.to_pandas()
    boxes = dict(zip(faces.path, faces[["left", "top", "right", "bottom"]].to_numpy().tolist(),
                     strict=True))
    return plan_shards(table, config.sharding.shard_size), boxes


def stored_summary(config: PipelineConfig, stage: str) -> dict | None:
    path = stage_paths(config.out)["stages"] / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------- status

@dataclass
class StageStatus:
    """One stage's state for a config: done / cached / stale / missing (see ``status``)."""

    stage: str
    state: str
    detail: str


def _shard_state(folder: Path, expected: dict[str, str]) -> tuple[bool, bool, str]:
    """(exists, current, detail) of a sharded output against the planned shard keys."""
    on_disk = {p.name: read_cache_key(p) for p in sorted(Path(folder).glob("shard-*.parquet"))}
    current = sum(on_disk.get(name) == key for name, key in expected.items())
    extra = len(set(on_disk) - set(expected))
    detail = f"{current}/{len(expected)} shards current"
    if extra:
        detail += f", {extra} shard files no longer planned"
    return bool(on_disk), current == len(expected) and not extra, detail


def pipeline_status(config: PipelineConfig) -> list[StageStatus]:
    """Per stage, what the next run with ``config`` would do, read from the run folder.

    * ``missing``: no output yet; the run computes it.
    * ``stale``: an output exists but its inputs, config or code changed (or an upstream
      stage is stale or missing); the run recomputes it (sharded stages: only the shards
      that changed).
    * ``done``: up to date, computed by the last run that ran the stage.
    * ``cached``: up to date, and the last run reused it instead of recomputing.

    The select stage re-scans the dataset (the scan is cheap: ~200k paths/s), so new or
    changed photos show as ``stale``.
    """
    from tasks.select import select_images

    paths = stage_paths(config.out)
    result: list[StageStatus] = []
    upstream_ok = True

    def add(stage: str, exists: bool, current: bool, detail: str = "") -> None:
        nonlocal upstream_ok
        if not exists:
            state, detail = "missing", "not run yet"
        elif not upstream_ok:
            state, detail = "stale", "an upstream stage is stale or missing"
        elif not current:
            state = "stale"
        else:
            summary = stored_summary(config, stage) or {}
            state = "cached" if summary.get("reused") else "done"
        upstream_ok = upstream_ok and state in ("done", "cached")
        result.append(StageStatus(stage, state, detail))

    exists = paths["manifest"].exists()
    if exists:
        table, _ = select_images(config.data, config.selection)
        current = read_cache_key(paths["manifest"]) == select_key(config, table)
        add("select", True, current, "" if current else "the dataset or selection changed")
    else:
        add("select", False, False)

    if upstream_ok:
        shards = detect_shards(config)
        add("detect", *_shard_state(paths["detections"], {
            s.filename: shard_cache_key(s, config.detector) for s in shards}))
    else:
        add("detect", any(paths["detections"].glob("shard-*.parquet")), False)

    for stage, key_fn in (("merge", merge_key), ("split", split_key)):
        file = paths["faces" if stage == "merge" else "split"]
        current = file.exists() and upstream_ok and read_cache_key(file) == key_fn(config)
        add(stage, file.exists(), current, "" if current else "inputs or settings changed")

    if upstream_ok:
        shards, boxes = crop_plan(config)
        add("crops", *_shard_state(paths["crops"], {
            s.filename: crop_shard_key(s, [boxes[p] for p in s.paths], config.crops)
            for s in shards}))
    else:
        add("crops", any(paths["crops"].glob("shard-*.parquet")), False)

    expected_train = train_key(config)
    train = stored_summary(config, "train") or {}
    current = train.get("cache_key") == expected_train
    add("train", (paths["model"] / "model.keras").exists(), current,
        "" if current else "inputs or model/train settings changed")
    evaluate = stored_summary(config, "evaluate") or {}
    current = evaluate.get("cache_key") == evaluate_key(expected_train)
    add("evaluate", (paths["reports"] / "report.md").exists(), current,
        "" if current else "the model changed")
    return result
