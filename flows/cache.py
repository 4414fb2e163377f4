"""Each stage's cache key, and the shard plans of the sharded stages.

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
redo. Both use the functions below (through the stage table, ``flows.stages``); nothing
else computes keys for the run folder. Where the outputs live: ``flows.run_folder``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.sharding import Shard, plan_shards
from core.storage import content_digest, file_sha256, fingerprint, read_cache_key, table_digest
from flows.run_folder import RunFolder
from models.classifier import ModelConfig
from models.detector import LANDMARK_COLUMNS
from tasks import evaluate, labels, select, split, train
from tasks.crops import CropConfig, crop_shard_key

# The functions below take ``c``: the run's ``PipelineConfig`` or a stage's
# ``flows.stages.StageConfig`` (the sections that stage declared): anything with
# ``.folder`` (a ``RunFolder``) and the config sections the key reads.
Sections = Any


def _sha(path: Path) -> str | None:
    return file_sha256(path) if path.exists() else None


def _shard_keys(folder: Path, shards: list[Shard]) -> list[str | None]:
    """The stored keys of the planned shard files (files not in the plan are ignored)."""
    return [read_cache_key(Path(folder) / s.filename) for s in shards]


def select_key(c: Sections, manifest: pa.Table) -> str:
    """The scan result (paths below the root, sizes, mtimes, labels) + the settings that
    choose photos; not where the root or the labels file is."""
    return fingerprint(c.data.layout, c.data.resolution, c.selection.model_dump(mode="json"),
                       table_digest(manifest), select.CODE_VERSION)


def merge_key(c: Sections, shards: list[Shard] | None = None) -> str:
    """``shards``: ``detect_shards(c)`` when the caller has it already."""
    metadata = c.data.metadata if c.data.layout == "kface" else None
    if shards is None:
        shards = detect_shards(c)
    return fingerprint(content_digest(c.folder.manifest),
                       _shard_keys(c.folder.detections, shards),
                       _sha(Path(metadata)) if metadata else None, labels.CODE_VERSION)


def split_key(c: Sections) -> str:
    return fingerprint(content_digest(c.folder.faces), c.split.model_dump(mode="json"),
                       split.CODE_VERSION)


# model settings added since models were first trained, with the value that means "off"
MODEL_OFF = {"frozen_until": "none", "init": "none"}


def model_settings(model: ModelConfig) -> dict:
    """The model section with a weights file replaced by its sha256 and a weights folder
    (MobileFaceNet's) by its files' (not their path), without the settings of
    ``MODEL_OFF`` while they are off (models trained before they existed stay current)."""
    settings = model.model_dump(mode="json", exclude={
        k for k, off in MODEL_OFF.items() if getattr(model, k) == off})
    weights = Path(model.weights)
    if model.weights not in ("none", "imagenet") and weights.is_file():
        settings["weights"] = file_sha256(weights)
    elif model.weights not in ("none", "imagenet") and weights.is_dir():
        settings["weights"] = [file_sha256(f) for f in sorted(weights.iterdir())
                               if f.is_file()]
    if model.init != "none":  # the model started from, by its content
        from models.classifier import init_model_file

        settings["init"] = file_sha256(init_model_file(model.init))
    return settings


def crop_settings(crops: CropConfig) -> dict:
    """The crops section as the train key sees it: without ``align`` while it is off, so
    models trained before alignment existed stay current."""
    return crops.model_dump(exclude=None if crops.align else {"align"})


def train_key(c: Sections, crop_shards: list[Shard] | None = None) -> str:
    """``crop_shards``: ``crop_plan(c).shards`` when the caller has it already."""
    if crop_shards is None:
        crop_shards = crop_plan(c).shards
    return fingerprint(_shard_keys(c.folder.crops, crop_shards),
                       content_digest(c.folder.faces), content_digest(c.folder.split),
                       crop_settings(c.crops), model_settings(c.model), train_settings(c.train),
                       train.CODE_VERSION)


# train settings added since models were first trained, with the value that means "off"
TRAIN_OFF = {"ema_momentum": None, "age_mean_weight": 0.0, "feature_cache": True}


def train_settings(cfg: train.TrainConfig) -> dict:
    """The train section without the settings of ``TRAIN_OFF`` while they are off, so
    models trained before they existed stay current."""
    return cfg.model_dump(exclude={k for k, off in TRAIN_OFF.items()
                                   if getattr(cfg, k) == off})


def evaluate_key(train_cache_key: str | None) -> str:
    return fingerprint(train_cache_key, evaluate.CODE_VERSION)


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

    def shard_key(self, shard: Shard, c: Sections) -> str:
        boxes, landmarks = self.shard_faces(shard)
        return crop_shard_key(shard, boxes, c.crops, landmarks, c.detector.margin)


def crop_plan(c: Sections) -> CropPlan:
    """The crop stage's plan, read from ``faces.parquet`` (empty before merge ran); the
    landmarks are read with ``crops.align`` only (box crops and their keys ignore them)."""
    path = c.folder.faces
    if not path.exists():
        return CropPlan([], {}, {})
    # landmarks only where they cut the crops: 10 floats a face are ~4x the boxes' memory
    names = pq.read_schema(path).names
    landmark_columns = [col for col in LANDMARK_COLUMNS if col in names and c.crops.align]
    content = [col for col in ("mtime_ns", "sha256") if col in names]
    table = pq.read_table(path, columns=["path", "subject_id", "file_size", *content,
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
    return CropPlan(plan_shards(table, c.data.layout), boxes, landmarks)


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
