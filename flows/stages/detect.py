"""The detect stage: each selected photo's face (box, score, landmarks) or why there is
none, one shard file per group of subjects in ``detections/``. A shard's key is its
task's (``tasks.detect.shard_cache_key``: the photos' paths below the root and content,
the detector's settings and weights, the chips' landmarks)."""

from __future__ import annotations

import pyarrow.parquet as pq

from core.run_folder import RunFolder
from core.sharding import Shard, ShardPlan, ShardResult, plan_shards
from flows.machinery import ShardedStage, StageConfig, stage_log
from models.detector import DetectorError
from tasks import detect


def detect_shards(c: StageConfig) -> list[Shard]:
    """The detection shards of the run folder's manifest (empty before select ran)."""
    if not c.folder.manifest.exists():
        return []
    names = set(pq.read_schema(c.folder.manifest).names)
    manifest = pq.read_table(c.folder.manifest, columns=[
        n for n in ("path", "subject_id", "file_size", "mtime_ns", "sha256") if n in names])
    return plan_shards(manifest, c.data.layout)


def _chip_geometry(c: StageConfig, shards: list[Shard]) -> dict[str, dict]:
    """Per folder of face chips: its five landmarks (given, or measured on its chips),
    and how they were found."""
    def measure() -> dict[str, dict]:
        geometry = {}
        for folder in c.data.chip_folders():
            if folder.chip_landmarks is not None:
                geometry[folder.name] = {"landmarks": [list(p) for p in folder.chip_landmarks],
                                         "measured": False}
                continue
            paths = sorted(p for s in shards for p in s.paths
                           if p.startswith(f"{folder.name}/"))
            if not paths:
                continue
            points, found, tried = detect.measure_chip_landmarks(c.data.image_roots(), paths)
            geometry[folder.name] = {"landmarks": points, "measured": True,
                                     "chips_with_a_face": found, "chips_tried": tried}
        return geometry

    return c.memo_get("chip_geometry", measure)


def _chips(c: StageConfig, shards: list[Shard]) -> dict[str, list]:
    """What the keys and calls need besides a shard: each chips folder's landmarks."""
    return {name: g["landmarks"] for name, g in _chip_geometry(c, shards).items()}


def _shard_key(c: StageConfig, chips: dict, shard: Shard) -> str:
    return detect.shard_cache_key(shard, c.detector, chips)


def _stored(c: StageConfig, shard: Shard, key: str, chips: dict | None
            ) -> ShardResult | None:
    # (a file keyed on the photos' sizes and mtimes, before keys had content hashes, is
    # adopted by a run)
    by_stat = None if chips is None else (
        lambda: detect.shard_cache_key(shard, c.detector, chips, by_stat=True))
    return detect.stored_shard(c.folder.detections / shard.filename, key, by_stat,
                               adopt=c.writing)


def _call(c: StageConfig, plan: ShardPlan, shard: Shard):
    return detect.detect_shard, (c.data.image_roots(), shard, c.detector,
                                 c.folder.detections, c.sharding.opencv_threads, plan.extra)


def _check(c: StageConfig) -> None:
    from models.detector import resolve_weights, weights_sha256

    resolve_weights(c.detector)
    weights_sha256(c.detector)


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


def _problems(c: StageConfig) -> dict[str, dict[str, int]]:
    """Failed rows by status and reason, read from the shards whose stored summary has
    errors or that need work (a shard with rows to retry needs work)."""
    plan = ROW.plan(c)
    suspect = [s for s, done in zip(plan.shards, plan.stored, strict=True)
               if done is None or done.status_counts.get("error")]
    return detection_errors(c.folder, suspect)


def _finish(c: StageConfig, plan: ShardPlan, summary: dict) -> None:
    geometry = _chip_geometry(c, plan.shards)
    if geometry:  # how each chips folder's faces were placed (docs/training.md)
        summary["chip_geometry"] = geometry
        for name, g in geometry.items():
            stage_log().info(
                "detect: chips folder %s: landmarks %s (fractions of the chip; %s)", name,
                g["landmarks"], "measured on {chips_with_a_face} of {chips_tried} chips"
                .format(**g) if g["measured"] else "given")
    counts = summary["status_counts"]
    if not counts.get("error", 0) + counts.get("unreadable", 0):
        return
    examples: dict[str, list[str]] = {}
    errors = detection_errors(c.folder, plan.shards, examples)
    summary.update(errors=errors, error_examples=examples)
    for status, by_reason in sorted(errors.items()):  # why, per kind, with example paths
        stage_log().warning(
            "detect: %d photo(s) %s: %s", sum(by_reason.values()),
            "could not be used (not a usable image)" if status == "error" else
            "could not be read this time (the next run retries them)",
            "; ".join(f"{reason} {n} (e.g. {', '.join(examples[reason])})"
                      for reason, n in sorted(by_reason.items())))


ROW = ShardedStage(name="detect", work=detect.detect_shard, reads=("manifest",),
                   writes="detections", sections=("data", "detector", "sharding"),
                   code_version=detect.CODE_VERSION, scope="data", check=_check,
                   errors=(DetectorError,), problems=_problems, unit=detect_shards,
                   context=_chips, shard_key=_shard_key, stored=_stored, shard_call=_call,
                   finish=_finish)
