"""Where each stage's output lives, what its cache key is, and whether it is up to date.

A stage's cache key is the fingerprint of what its output depends on: the content of
its upstream outputs (their stored ``content_digest``, or the shards' own keys), the
content of the files it reads from outside (the metadata CSV's, the weights' sha256), the
settings that change its result and its code version. Never a path: the same dataset
reached through a symlink, a relative path or another mount point gives the same keys, so
nothing is recomputed (photos are identified by their path below the root, size and
mtime: a move that keeps mtimes, such as ``mv``, ``cp -a`` or ``rsync -a``, keeps every
key). The key is stored with the output (Parquet schema metadata, or the stage's
``stages/<stage>.json``), so a run skips a stage whose stored key equals the expected
one, and ``kface status`` can tell, without running anything, which stages a run would
redo. Both use the functions below; nothing else computes keys for the run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.sharding import Shard, plan_shards
from core.storage import content_digest, file_sha256, fingerprint, read_cache_key, table_digest
from flows.config import PipelineConfig
from models.detector import LANDMARK_COLUMNS
from tasks.crops import crop_shard_key
from tasks.detect import shard_cache_key
from tasks.train import CODE_VERSION as TRAIN_CODE_VERSION

SELECT_CODE_VERSION = "select-2"  # 2: exact ages kept
MERGE_CODE_VERSION = "merge-2"  # 2: exact ages kept
SPLIT_CODE_VERSION = "split-1"


def stage_paths(out: Path, experiment: str = "default") -> dict[str, Path]:
    """The one place that says where each stage's output lives in a run folder. The data
    stages (select to crops) are shared; each experiment trains and reports in its own
    ``experiments/<name>/``."""
    out = Path(out)
    exp = out / "experiments" / experiment
    return {
        "config": out / "config.yaml",
        "manifest": out / "manifest.parquet",
        "detections": out / "detections",
        "faces": out / "faces.parquet",
        "split": out / "split.parquet",
        "crops": out / "crops",
        "stages": out / "stages",
        "experiments": out / "experiments",
        "experiment": exp,
        "experiment_config": exp / "config.yaml",
        "model": exp / "model",
        "logs": exp / "logs",
        "reports": exp / "reports",
        "experiment_stages": exp / "stages",
    }


EXPERIMENT_STAGES = ("train", "evaluate")


def summary_path(config: PipelineConfig, stage: str) -> Path:
    """``stages/<stage>.json``: the run folder's for data stages, the experiment's for
    train and evaluate."""
    paths = stage_paths(config.out, config.experiment)
    folder = paths["experiment_stages" if stage in EXPERIMENT_STAGES else "stages"]
    return folder / f"{stage}.json"


def _sha(path: Path) -> str | None:
    return file_sha256(path) if path.exists() else None


def _shard_keys(folder: Path, shards: list[Shard]) -> list[str | None]:
    """The stored keys of the planned shard files (files not in the plan are ignored)."""
    return [read_cache_key(Path(folder) / s.filename) for s in shards]


def select_key(config: PipelineConfig, manifest: pa.Table) -> str:
    """The scan result (paths below the root, sizes, mtimes, labels) + the settings that
    choose photos; not where the root or the labels file is."""
    return fingerprint(config.data.layout, config.data.resolution,
                       config.selection.model_dump(mode="json"), table_digest(manifest),
                       SELECT_CODE_VERSION)


def merge_key(config: PipelineConfig, shards: list[Shard] | None = None) -> str:
    """``shards``: ``detect_shards(config)`` when the caller has it already."""
    paths = stage_paths(config.out, config.experiment)
    metadata = config.data.metadata if config.data.layout == "kface" else None
    if shards is None:
        shards = detect_shards(config)
    return fingerprint(content_digest(paths["manifest"]),
                       _shard_keys(paths["detections"], shards),
                       _sha(Path(metadata)) if metadata else None, MERGE_CODE_VERSION)


def split_key(config: PipelineConfig) -> str:
    return fingerprint(content_digest(stage_paths(config.out, config.experiment)["faces"]),
                       config.split.model_dump(mode="json"), SPLIT_CODE_VERSION)


def model_settings(config: PipelineConfig) -> dict:
    """The model section with a weights file replaced by its sha256 (not its path)."""
    settings = config.model.model_dump(mode="json")
    if config.model.weights not in ("none", "imagenet") and Path(config.model.weights).is_file():
        settings["weights"] = file_sha256(Path(config.model.weights))
    return settings


def crop_settings(config: PipelineConfig) -> dict:
    """The crops section as the train key sees it: without ``align`` while it is off, so
    models trained before alignment existed stay current."""
    return config.crops.model_dump(exclude=None if config.crops.align else {"align"})


def train_key(config: PipelineConfig, crop_shards: list[Shard] | None = None) -> str:
    """``crop_shards``: ``crop_plan(config).shards`` when the caller has it already."""
    paths = stage_paths(config.out, config.experiment)
    if crop_shards is None:
        crop_shards = crop_plan(config).shards
    return fingerprint(_shard_keys(paths["crops"], crop_shards),
                       content_digest(paths["faces"]), content_digest(paths["split"]),
                       crop_settings(config), model_settings(config),
                       config.train.model_dump(), TRAIN_CODE_VERSION)


def evaluate_key(train_cache_key: str | None) -> str:
    # imported here: tasks.evaluate loads matplotlib + scikit-learn (~100 MB), which the
    # spawned shard workers, importing this module with the flow, do not need
    from tasks.evaluate import CODE_VERSION

    return fingerprint(train_cache_key, CODE_VERSION)


def detect_shards(config: PipelineConfig) -> list[Shard]:
    """The detection shards of the run folder's manifest (empty before select ran)."""
    path = stage_paths(config.out, config.experiment)["manifest"]
    if not path.exists():
        return []
    manifest = pq.read_table(path, columns=["path", "subject_id", "file_size", "mtime_ns"])
    return plan_shards(manifest, config.data.layout)


@dataclass(frozen=True)
class CropPlan:
    """The crop shards (same partition as detection, over ``faces.parquet``) and each
    face's box with margin and landmarks (five (x, y) points; None without them)."""

    shards: list[Shard]
    boxes: dict[str, list[int]]
    landmarks: dict[str, list[list[float]]]

    def shard_faces(self, shard: Shard) -> tuple[list[list[int]], list | None]:
        """A shard's boxes and landmarks, in its path order (``landmarks`` None when the
        faces have none)."""
        boxes = [self.boxes[p] for p in shard.paths]
        if not self.landmarks:
            return boxes, None
        return boxes, [self.landmarks.get(p) for p in shard.paths]

    def shard_key(self, shard: Shard, config: PipelineConfig) -> str:
        boxes, landmarks = self.shard_faces(shard)
        return crop_shard_key(shard, boxes, config.crops, landmarks, config.detector.margin)


def crop_plan(config: PipelineConfig) -> CropPlan:
    """The crop stage's plan, read from ``faces.parquet`` (empty before merge ran); the
    landmarks are read with ``crops.align`` only (box crops and their keys ignore them)."""
    path = stage_paths(config.out, config.experiment)["faces"]
    if not path.exists():
        return CropPlan([], {}, {})
    # landmarks only where they cut the crops: 10 floats a face are ~4x the boxes' memory
    names = pq.read_schema(path).names if config.crops.align else []
    landmark_columns = [c for c in LANDMARK_COLUMNS if c in names]
    table = pq.read_table(path, columns=["path", "subject_id", "file_size", "mtime_ns",
                                         "left", "top", "right", "bottom",
                                         *landmark_columns])
    faces = table.to_pandas()
    boxes = dict(zip(faces.path, faces[["left", "top", "right", "bottom"]].to_numpy().tolist(),
                     strict=True))
    landmarks = {}
    if len(landmark_columns) == len(LANDMARK_COLUMNS):
        points = faces[list(LANDMARK_COLUMNS)].to_numpy(dtype=float)
        landmarks = {path: row.reshape(5, 2).tolist()
                     for path, row in zip(faces.path, points, strict=True)
                     if np.isfinite(row).all()}
    return CropPlan(plan_shards(table, config.data.layout), boxes, landmarks)


def detection_errors(config: PipelineConfig, shards: list[Shard],
                     examples: dict[str, list[str]] | None = None
                     ) -> dict[str, dict[str, int]]:
    """Counts of the planned detection shards' failed rows: ``{status: {reason: n}}`` for
    the statuses ``error`` (final) and ``unreadable`` (retried by the next run). With
    ``examples``, up to three paths per reason are added to it."""
    folder = stage_paths(config.out, config.experiment)["detections"]
    counts: dict[str, dict[str, int]] = {}
    for shard in shards:
        if not (folder / shard.filename).exists():
            continue
        file = pq.ParquetFile(folder / shard.filename)
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


def crop_files(config: PipelineConfig, crop_shards: list[Shard] | None = None) -> list[Path]:
    """The planned crop shard files (what train and evaluate read; never leftovers)."""
    folder = stage_paths(config.out, config.experiment)["crops"]
    if crop_shards is None:
        crop_shards = crop_plan(config).shards
    return [folder / s.filename for s in crop_shards]


def stored_summary(config: PipelineConfig, stage: str) -> dict | None:
    return _json(summary_path(config, stage)) or None


# ---------------------------------------------------------------------------- status

@dataclass
class StageStatus:
    """One stage's state for a config: done / cached / stale / missing (see ``status``)."""

    stage: str
    state: str
    detail: str
    errors: dict[str, dict[str, int]] | None = None  # detect: ``detection_errors``

    def as_dict(self) -> dict:
        return {"stage": self.stage, "state": self.state, "detail": self.detail,
                "errors": self.errors}


def _shard_state(folder: Path, expected: dict[str, str]) -> tuple[bool, bool, str]:
    """(exists, current, detail) of a sharded output against the planned shard keys."""
    on_disk = {p.name: read_cache_key(p) for p in sorted(Path(folder).glob("shard-*.parquet"))}
    current = sum(on_disk.get(name) == key for name, key in expected.items())
    extra = len(set(on_disk) - set(expected))
    detail = f"{current}/{len(expected)} shards current"
    if extra:  # never read (merge and crops read the planned files); the next run drops them
        detail += f", {extra} shard files no longer planned"
    return bool(on_disk), current == len(expected), detail


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

    paths = stage_paths(config.out, config.experiment)
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

    shards = detect_shards(config)  # each plan is read once here
    errors = detection_errors(config, shards)
    if upstream_ok:
        exists, current, detail = _shard_state(paths["detections"], {
            s.filename: shard_cache_key(s, config.detector) for s in shards})
        unreadable = errors.get("unreadable", {})
        if current and unreadable:
            current = False
            detail += (f", {sum(unreadable.values())} photo(s) could not be read last time "
                       "(retried)")
        add("detect", exists, current, detail)
    else:
        add("detect", any(paths["detections"].glob("shard-*.parquet")), False)
    result[-1].errors = errors

    for stage, key in (("merge", lambda: merge_key(config, shards)),
                       ("split", lambda: split_key(config))):
        file = paths["faces" if stage == "merge" else "split"]
        current = file.exists() and upstream_ok and read_cache_key(file) == key()
        add(stage, file.exists(), current, "" if current else "inputs or settings changed")

    plan = crop_plan(config)
    crop_shards = plan.shards
    if upstream_ok:
        add("crops", *_shard_state(paths["crops"], {
            s.filename: plan.shard_key(s, config) for s in crop_shards}))
    else:
        add("crops", any(paths["crops"].glob("shard-*.parquet")), False)

    expected_train = train_key(config, crop_shards)
    train = stored_summary(config, "train") or {}
    current = train.get("cache_key") == expected_train
    add("train", (paths["model"] / "model.keras").exists(), current,
        "" if current else "inputs or model/train settings changed")
    evaluate = stored_summary(config, "evaluate") or {}
    current = evaluate.get("cache_key") == evaluate_key(expected_train)
    add("evaluate", (paths["reports"] / "report.md").exists(), current,
        "" if current else "the model changed")
    return result


def list_experiments(out: Path) -> list[dict]:
    """One summary per ``OUT/experiments/<name>/``: its recipe (from its config.yaml),
    the scored metrics, training time and state (evaluated / trained / training
    unfinished / not trained)."""
    import yaml

    rows = []
    for folder in sorted(Path(out, "experiments").glob("*")):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        config_file = folder / "config.yaml"
        cfg = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
        train = _json(folder / "stages" / "train.json")
        evaluate = _json(folder / "stages" / "evaluate.json")
        scored = evaluate.get("scored_split", "")
        trained = (folder / "model" / "model.keras").exists()
        state = ("evaluated" if evaluate else "trained") if trained else "not trained"
        if any(folder.glob(".training-*")):  # killed, or running now
            state = ("training unfinished" if state == "not trained"
                     else f"{state}; a newer training unfinished")
        metric = {name: evaluate.get(f"{scored}_{name}") for name in (
            "gender_accuracy", "age_band_accuracy", "age_band_within_one")}
        metric = {k: f"{v:.3f}" if isinstance(v, float) else "-" for k, v in metric.items()}
        rows.append({
            "name": folder.name, "backbone": cfg.get("model", {}).get("backbone", "-"),
            "input_size": cfg.get("crops", {}).get("size", "-"),
            "epochs": (f"{train['epochs_run']}/{cfg.get('train', {}).get('epochs', '?')}"
                       if train else "-"),
            "gender": metric["gender_accuracy"], "age_band": metric["age_band_accuracy"],
            "within_one": metric["age_band_within_one"], "scored": scored or "-",
            "training": f"{train['seconds'] / 60:.1f} min" if train else "-", "state": state,
            "model": str(folder / "model"),
        })
    return rows


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
