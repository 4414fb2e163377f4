"""The stage table: the one place that says what each stage of the pipeline is.

Each row of ``STAGE_TABLE`` names a stage, the function that does its work (in
``tasks/``), the run-folder outputs it reads and the one it writes, the config sections it
may see, the settings its key reads, its code version, its input check, and whether it
belongs to the run's data or to an experiment. Everything else is derived from the table:
the run order, ``--stages`` checks, the pre-run input checks (``flows.preflight``), each
stage's cache key (``Stage.key``), the reuse decision the flow makes before it starts any
worker (``flows.pipeline``), ``kface status`` (``pipeline_status`` below), the
deployments' stage lists and ``docs/stages.md``.

A stage's functions receive a ``StageConfig``: the run folder, only the config sections
its row declares, and the outputs (with their producers' summaries) of the stages its
row says it reads (anything else is an error naming this file). Adding a stage: its work
in ``tasks/``, its ``run`` function (or shard plan) and its row here; ``register_stage``
adds one from outside (a plugin, a test).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from core.labelled import DatasetError
from core.labels import AGES
from core.run_folder import RunFolder
from core.sharding import Shard, ShardPlan
from core.storage import (
    content_digest,
    file_sha256,
    fingerprint,
    read_cache_key,
    readers_digest,
    readers_table_digest,
    replace_folder,
    store_readers_digest,
    table_digest,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from flows import cache
from flows.config import PipelineConfig, dump_config
from models.calibration import model_calibration
from models.classifier import WeightsError
from models.detector import LANDMARK_KINDS, DetectorError, gives_landmarks
from models.mobilefacenet import MobileFaceNetError
from models.scoring import write_report
from tasks import crops, detect, evaluate, labels, select, split, train


class MissingInputError(RuntimeError):
    """A requested stage's input does not exist (its upstream stage has not run)."""


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(TaskRunContext.get() or FlowRunContext.get())


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside a flow run (the UI shows the lines), else this module's
    (a stage called directly, as its tests do)."""
    if not _in_run():
        return logging.getLogger(__name__)
    from prefect import get_run_logger

    return get_run_logger()


@dataclass(frozen=True)
class Stage:
    """One row of the stage table (see the module docstring)."""

    name: str
    work: Callable  # the function in tasks/ that does the work
    reads: tuple[str, ...]  # run-folder outputs (``RunFolder.output`` names) it reads
    writes: str  # the output it writes
    sections: tuple[str, ...]  # the config sections it sees
    code_version: str
    scope: Literal["data", "experiment"]
    # what its key reads besides its inputs: a section ('split'; its ``key_settings()``
    # where it has one) or one setting ('data.layout'; a file's by the file's sha256)
    key_settings: tuple[str, ...] = ()
    stale_detail: str = "inputs or settings changed"
    check: Callable[[StageConfig], None] | None = None  # its inputs, before a run starts
    # what its check (and its work, on bad input) raises that is the user's to fix: said
    # in one line (``flows.preflight``), never a traceback
    errors: tuple[type[Exception], ...] = ()
    # single-output stages: what it reads from outside the run folder (a digest), where
    # its stored key is (Parquet metadata or stages/<name>.json), and the work
    source: Callable[[StageConfig], str] | None = None
    key_in: Literal["output", "summary"] = "output"
    run: Callable[[StageConfig, str], dict] | None = None
    # columns of its output that the stages reading it do not key on (the manifest's
    # mtimes: a photo's content is its sha256), and, when the output is stale, whether a
    # run now would change only those (a detail for status: its readers stay current)
    readers_leave_out: tuple[str, ...] = ()
    same_for_readers: Callable[[StageConfig], str | None] | None = None
    # settings a run applies to the output it has without redoing the work (the train
    # stage's calibration: refitted on the kept network in seconds): the stored summary
    # keeps the key without them (``base_key``), and when that is the current one a run
    # calls ``partial_run`` instead of ``run``
    partial_settings: tuple[str, ...] = ()
    partial_run: Callable[[StageConfig, str], dict] | None = None
    # what ``partial_run`` needs of the output beyond its existence (else a full run)
    partial_needs: Callable[[RunFolder], bool] | None = None
    partial_detail: str = "applies them to its output without redoing the work"
    # sharded stages: the planned shards, the plan (with each shard's stored summary),
    # one shard's call (function, arguments), the summary's additions once all shards are
    # done, and its failed rows by status and reason (``kface status``)
    shards: Callable[[StageConfig], list[Shard]] | None = None
    plan: Callable[[StageConfig], ShardPlan] | None = None
    shard_call: Callable[[StageConfig, ShardPlan, Shard], tuple[Callable, tuple]] | None = None
    finish: Callable[[StageConfig, ShardPlan, dict], None] | None = None
    problems: Callable[[StageConfig], dict[str, dict[str, int]]] | None = None

    @property
    def sharded(self) -> bool:
        return self.plan is not None

    def output(self, folder: RunFolder) -> Path:
        """Its output's path: the run folder's name for it, else ``<writes>.parquet`` in
        the run folder (data stages) or the experiment's folder."""
        if hasattr(RunFolder, self.writes):
            return folder.output(self.writes)
        where = folder.out if self.scope == "data" else folder.experiment_dir
        return where / f"{self.writes}.parquet"

    def key(self, c: StageConfig, leave_out: tuple[str, ...] = ()) -> str:
        """A single-output stage's cache key: the digests of the outputs it reads, the
        settings its row names (but the ``section.field`` settings of ``leave_out``),
        what it reads from outside the run folder, and its code version (never a path: a
        moved dataset or run folder keeps its keys)."""
        def setting(name: str) -> Any:
            value = c.key_setting(name)
            left = {s.partition(".")[2] for s in leave_out if s.partition(".")[0] == name}
            return ({k: v for k, v in value.items() if k not in left}
                    if left and isinstance(value, dict) else value)

        return fingerprint(*(c.read_digest(name) for name in self.reads),
                           *(setting(name) for name in self.key_settings),
                           *([self.source(c)] if self.source else []), self.code_version)

    def base_key(self, c: StageConfig) -> str | None:
        """The key without the ``partial_settings`` (None for a stage without them)."""
        return self.key(c, self.partial_settings) if self.partial_settings else None

    def runs_partly(self, c: StageConfig) -> bool:
        """Whether a run would only apply changed ``partial_settings`` to the output it
        has (its stored base key is the current one)."""
        return (self.partial_run is not None and self.output(c.folder).exists()
                and (self.partial_needs is None or self.partial_needs(c.folder))
                and self.stored_summary(c.folder).get("base_key") == self.base_key(c))

    def summary_file(self, folder: RunFolder) -> Path:
        """``stages/<name>.json``: the run folder's for data stages, the experiment's for
        train and evaluate."""
        where = folder.stages if self.scope == "data" else folder.experiment_stages
        return where / f"{self.name}.json"

    def stored_summary(self, folder: RunFolder) -> dict:
        path = self.summary_file(folder)
        return json.loads(path.read_text()) if path.exists() else {}

    def stored_key(self, folder: RunFolder) -> str | None:
        """The key the stage's output holds (None when there is none)."""
        output = self.output(folder)
        if not output.exists():
            return None
        if self.key_in == "output":
            return read_cache_key(output)
        return self.stored_summary(folder).get("cache_key")


class StageConfig:
    """What one stage sees: its run folder, the config sections its row declares, the
    outputs its row reads (``read_digest``, ``upstream_summary``), and a memo for what its
    key computed and its work reuses (the scan, a plan), shared with the stages it reads
    from. Anything undeclared is an AttributeError naming this file."""

    def __init__(self, config: PipelineConfig, stage: Stage, writing: bool = True,
                 memo: dict[str, Any] | None = None):
        self.stage = stage.name
        self.folder = config.folder
        self.writing = writing  # False for kface status, which only reads
        self.memo: dict[str, Any] = {} if memo is None else memo
        self._config = config  # for recipe_yaml and the stages this one reads
        self._reads = stage.reads
        for name in stage.sections:
            setattr(self, name, getattr(config, name))

    def __getattr__(self, name: str):  # called only for attributes that are not set
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"stage '{self.stage}' reads the config section '{name}', which "
                             "its row in flows/stages.py does not declare")

    def upstream(self, output: str) -> tuple[Stage, StageConfig]:
        """The row and the view of the stage that writes ``output``, one this stage's row
        reads (the memo shared)."""
        if output not in self._reads:
            raise AttributeError(f"stage '{self.stage}' reads the output '{output}', which "
                                 "its row in flows/stages.py does not declare")
        producer = STAGE[PRODUCER[output]]
        return producer, StageConfig(self._config, producer, self.writing, self.memo)

    def read_digest(self, output: str) -> Any:
        """What ``output`` holds, as this stage's key sees it: a sharded output's planned
        shard keys, a Parquet file's content digest, else its stage's stored key."""
        producer, c = self.upstream(output)
        path = producer.output(self.folder)

        def digest() -> Any:
            if producer.sharded:
                return [read_cache_key(path / s.filename) for s in producer.shards(c)]
            if producer.key_in == "output":
                return (self.readers_digest(producer) if producer.readers_leave_out
                        else content_digest(path))
            return producer.stored_summary(self.folder).get("cache_key")

        # once per view (a stage's key and its base key read the same; its work writes
        # only its own output)
        return self.memo_get(f"digest:{output}", digest)

    def upstream_summary(self, output: str) -> dict:
        """The stored summary of the stage that writes ``output`` (one this stage reads)."""
        producer, _ = self.upstream(output)
        return producer.stored_summary(self.folder)

    def key_setting(self, name: str) -> Any:
        """A setting as keys see it: a section's ``key_settings()`` (else all of it), one
        field's value, a file's sha256 (None when unset or missing), never its path."""
        section, _, field = name.partition(".")
        settings = getattr(self, section)
        if not field:
            return (settings.key_settings() if hasattr(settings, "key_settings")
                    else settings.model_dump(mode="json"))
        value = getattr(settings, field)
        if isinstance(value, Path):
            return file_sha256(value) if value.is_file() else None
        return value

    def recipe_yaml(self) -> str:
        """The whole config as YAML: the recipe an experiment's model was trained with."""
        return dump_config(self._config)

    def readers_digest(self, stage: Stage) -> str | None:
        """``stage``'s output as the stages reading it key on: without its
        ``readers_leave_out`` columns (once per view: ~2 s for a K-Face manifest of a kface
        before 2026-12-04, which has it unstored)."""
        return self.memo_get(f"readers:{stage.writes}", lambda: readers_digest(
            stage.output(self.folder), stage.readers_leave_out))

    def memo_get(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self.memo:
            self.memo[name] = compute()
        return self.memo[name]


# ------------------------------------------------------------------ the plans' index

def _plan_inputs(c: StageConfig) -> str:
    """What a sharded stage's plan (its shards and their keys) is made of: the digests
    of the outputs its row reads, its sections as keys see them (not ``sharding``: it
    changes no file) and its code version."""
    stage = STAGE[c.stage]
    return fingerprint(stage.name, stage.code_version,
                       *(c.read_digest(name) for name in stage.reads),
                       *(c.key_setting(name) for name in stage.sections if name != "sharding"))


def _plan_index(c: StageConfig) -> Path:
    return STAGE[c.stage].summary_file(c.folder).with_suffix(".plan.json")


def _indexed_plan(c: StageConfig) -> tuple[list[Shard], list[str]] | None:
    """``kface status`` only: the shards (by name; status reads their files, never the
    photos) and keys the last run planned (``stages/<stage>.plan.json``), when what the
    plan is made of is the same now; None otherwise and in a run, which plans (K-Face
    size: about 8 s for the crop keys of 583,200 faces, a read of this file instead)."""
    if c.writing:
        return None

    def read() -> tuple[list[Shard], list[str]] | None:
        try:
            index = json.loads(_plan_index(c).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(index, dict) or index.get("inputs") != _plan_inputs(c):
            return None
        return ([Shard(name, (), ()) for name, _ in index["shards"]],
                [key for _, key in index["shards"]])

    return c.memo_get(f"{c.stage}_index", read)


def _record_plan(c: StageConfig, shards: list[Shard], keys: list[str]) -> None:
    """A run keeps its plan's shard names and keys for ``kface status``."""
    if not c.writing:
        return
    index = {"inputs": _plan_inputs(c),
             "shards": [[s.name, k] for s, k in zip(shards, keys, strict=True)]}
    path = _plan_index(c)
    try:
        if json.loads(path.read_text()) == index:
            return
    except (OSError, ValueError):
        pass
    write_json_atomic(path, index)


# ------------------------------------------------------------------------------ select

def _scan(c: StageConfig):
    """The selected photos with their sha256 (read only where the stat cache has no
    entry of that size and mtime: ``core.content``)."""
    return c.memo_get("scan", lambda: select.select_images(
        c.data, c.selection, c.folder.file_hashes, save_hashes=c.writing))


def _select_source(c: StageConfig) -> str:
    """The scan's result (paths below the root, sizes, content, labels), not where the
    root or the labels file is. A K-Face tree whose walk sees the names the manifest's
    scan saw, each photo with the manifest's size and mtime, gives the manifest's digest
    without parsing and hashing (``select.manifest_is_current``: 583,200 photos in ~3 s
    instead of ~15 s)."""
    stage = STAGE[c.stage]
    stored = stage.stored_summary(c.folder)
    if select.manifest_is_current(c.data, c.selection, c.folder.manifest,
                                  stored.get("listing_digest")):
        if c.writing:  # a manifest of a kface before 2026-12-04: store its readers' digest
            store_readers_digest(c.folder.manifest, stage.readers_leave_out)
        return content_digest(c.folder.manifest)
    table, report = _scan(c)
    digest = table_digest(table)
    if (c.writing and stored and report.listing_digest != stored.get("listing_digest")
            and digest == content_digest(c.folder.manifest)):
        # the manifest is current but its summary lacks this walk's names (a run folder
        # of a kface before 2026-12, or a copied tree): record them for the next time
        write_json_atomic(stage.summary_file(c.folder),
                          {**stored, "listing_digest": report.listing_digest})
    return digest


def _select_same_for_readers(c: StageConfig) -> str | None:
    """When the scan differs from the manifest in the photos' mtimes only (a copied or
    touched tree), what status says; else None."""
    stage = STAGE[c.stage]
    table, _ = _scan(c)
    if readers_table_digest(table, stage.readers_leave_out) != c.readers_digest(stage):
        return None
    return ("what the stages after it read is unchanged (the photos, their content and "
            "labels; file times may differ, as in a copied tree): the run rewrites the "
            "manifest and recomputes nothing after it")


def _select_check(c: StageConfig) -> None:
    select.check_dataset(c.data)


def _select_run(c: StageConfig, key: str) -> dict:
    table, report = _scan(c)
    write_parquet_atomic(c.folder.manifest, table, key,
                         readers_leave_out=STAGE[c.stage].readers_leave_out)
    summary = {"rows_in": report.images, "rows_out": table.num_rows,
               "subjects": len(set(table.column("subject_id").to_pylist())),
               **report.as_dict()}
    scanned = ("of the photos in the selected accessory, light and expression folders, "
               "the others not read; cameras chosen by file name"
               if c.data.layout == "kface" else "of the labelled photos")
    logger = _log()
    logger.info("select: %d of %d images selected (%d subjects; %s); %d files not in the "
                "layout%s; %d photos read for their content hash (new, changed or copied; "
                "the others by their size and mtime)", table.num_rows, report.images,
                summary["subjects"], scanned, report.unrecognised,
                f", e.g. {report.unrecognised_examples[:3]}" if report.unrecognised else "",
                report.files_hashed)
    if report.excluded_labels:
        logger.warning("select: %d labelled images excluded: %s", report.excluded_labels,
                       report.excluded_label_examples[:5])
    return summary


# ------------------------------------------------------------------------------ detect

def _detect_shards(c: StageConfig) -> list[Shard]:
    indexed = _indexed_plan(c)
    if indexed is not None:
        return indexed[0]
    return c.memo_get("detect_shards", lambda: cache.detect_shards(c))


def _detect_check(c: StageConfig) -> None:
    from models.detector import resolve_weights, weights_sha256

    resolve_weights(c.detector)
    weights_sha256(c.detector)


def _detect_problems(c: StageConfig) -> dict[str, dict[str, int]]:
    """Failed rows by status and reason, read from the shards whose stored summary has
    errors or that need work (a shard with rows to retry needs work)."""
    plan = _detect_plan(c)
    suspect = [s for s, done in zip(plan.shards, plan.stored, strict=True)
               if done is None or done.status_counts.get("error")]
    return cache.detection_errors(c.folder, suspect)


def _chip_geometry(c: StageConfig) -> dict[str, dict]:
    """Per folder of face chips: its five landmarks (given, or measured on its chips),
    and how they were found."""
    def measure() -> dict[str, dict]:
        geometry = {}
        for folder in c.data.chip_folders():
            if folder.chip_landmarks is not None:
                geometry[folder.name] = {"landmarks": [list(p) for p in folder.chip_landmarks],
                                         "measured": False}
                continue
            paths = sorted(p for s in _detect_shards(c) for p in s.paths
                           if p.startswith(f"{folder.name}/"))
            if not paths:
                continue
            points, found, tried = detect.measure_chip_landmarks(c.data.image_roots(), paths)
            geometry[folder.name] = {"landmarks": points, "measured": True,
                                     "chips_with_a_face": found, "chips_tried": tried}
        return geometry

    return c.memo_get("chip_geometry", measure)


def _detect_plan(c: StageConfig) -> ShardPlan:
    def plan() -> ShardPlan:
        indexed = _indexed_plan(c)
        if indexed is not None:
            shards, keys = indexed
            return ShardPlan(shards, [
                detect.stored_shard(c.folder.detections / s.filename, k)
                for s, k in zip(shards, keys, strict=True)])
        shards = _detect_shards(c)
        chips = {name: g["landmarks"] for name, g in _chip_geometry(c).items()}
        keys = [detect.shard_cache_key(s, c.detector, chips) for s in shards]
        _record_plan(c, shards, keys)
        stored = [detect.stored_shard(
            c.folder.detections / s.filename, k,
            lambda s=s: detect.shard_cache_key(s, c.detector, chips, by_stat=True),
            adopt=c.writing) for s, k in zip(shards, keys, strict=True)]
        return ShardPlan(shards, stored, chips)

    return c.memo_get("detect_plan", plan)


def _detect_call(c: StageConfig, plan: ShardPlan, shard: Shard):
    return detect.detect_shard, (c.data.image_roots(), shard, c.detector,
                                 c.folder.detections, c.sharding.opencv_threads, plan.extra)


def _detect_finish(c: StageConfig, plan: ShardPlan, summary: dict) -> None:
    geometry = _chip_geometry(c)
    if geometry:  # how each chips folder's faces were placed (docs/training.md)
        summary["chip_geometry"] = geometry
        for name, g in geometry.items():
            _log().info("detect: chips folder %s: landmarks %s (fractions of the chip; %s)",
                        name, g["landmarks"], "measured on {chips_with_a_face} of {chips_tried} "
                        "chips".format(**g) if g["measured"] else "given")
    counts = summary["status_counts"]
    if not counts.get("error", 0) + counts.get("unreadable", 0):
        return
    examples: dict[str, list[str]] = {}
    errors = cache.detection_errors(c.folder, plan.shards, examples)
    summary.update(errors=errors, error_examples=examples)
    for status, by_reason in sorted(errors.items()):  # why, per kind, with example paths
        _log().warning(
            "detect: %d photo(s) %s: %s", sum(by_reason.values()),
            "could not be used (not a usable image)" if status == "error" else
            "could not be read this time (the next run retries them)",
            "; ".join(f"{reason} {n} (e.g. {', '.join(examples[reason])})"
                      for reason, n in sorted(by_reason.items())))


# ------------------------------------------------------------------------------- merge

def _merge_check(c: StageConfig) -> None:
    """The K-Face metadata CSV, parsed whole (400 rows: about a second)."""
    if c.data.layout == "kface":
        if c.data.metadata is None:
            raise labels.LabelsError("the merge stage needs the K-Face metadata CSV: "
                                     "--metadata FILE (data.metadata)")
        labels.read_metadata(c.data.metadata)


def _merge_run(c: StageConfig, key: str) -> dict:
    shards, folder = _detect_shards(c), c.folder
    manifest = pq.read_table(folder.manifest).to_pandas()
    missing = [s.filename for s in shards if not (folder.detections / s.filename).exists()]
    if missing:  # (a --stages merge run after subjects were added)
        raise MissingInputError(
            f"merge: {len(missing)} planned detection shard(s) not on disk (e.g. "
            f"{folder.detections / missing[0]}): run with --stages detect,merge")
    # only the planned shards: files of an earlier plan are never merged
    detections = pads.dataset([str(folder.detections / s.filename) for s in shards],
                              schema=detect.DETECTIONS_SCHEMA, format="parquet"
                              ).to_table().to_pandas()
    _merge_check(c)
    metadata = labels.read_metadata(c.data.metadata) if c.data.layout == "kface" else None
    table, report = labels.merge_faces(manifest, detections, metadata)
    write_parquet_atomic(folder.faces, table, key)
    logger = _log()
    logger.info("merge: %d faces of %d subjects from %d detections; per class %s",
                table.num_rows, report["subjects"], len(detections),
                report["joint_class_counts"])
    if report.get("subjects_without_labels"):
        logger.warning("merge: %d subjects have images but no metadata row (excluded): %s",
                       report["subjects_without_labels"],
                       report["subjects_without_labels_list"][:10])
    failed = detections[detections.status.isin(["error", "unreadable"])]
    return {"rows_in": len(detections), "rows_out": table.num_rows, **report,
            "detection_status_counts": detections.status.value_counts().to_dict(),
            "detection_errors": {status: rows.reason.fillna("unknown").value_counts().to_dict()
                                 for status, rows in failed.groupby("status")}}


# ------------------------------------------------------------------------------- split

def _split_run(c: StageConfig, key: str) -> dict:
    faces = pq.read_table(c.folder.faces).to_pandas()
    if faces.empty:
        raise split.SplitError(_no_faces_message(c))
    table, report = split.split_faces(faces, c.split)
    write_parquet_atomic(c.folder.split, pa.Table.from_pandas(table, preserve_index=False),
                         key)
    logger = _log()
    logger.info("split (%s): %s rows, subjects %s", c.split.strategy, report["rows"],
                report["subjects"])
    if report.get("warning"):
        logger.warning("split: %s", report["warning"])
    return {"rows_in": len(faces), "rows_out": len(table), **report}


def _no_faces_message(c: StageConfig) -> str:
    """Why no face reached the split, from the merge summary's counts of detections."""
    merge_summary = c.upstream_summary("faces")
    counts = merge_summary.get("detection_status_counts", {})
    problems = "; ".join(f"{reason} {n}"
                         for by_reason in merge_summary.get("detection_errors", {}).values()
                         for reason, n in sorted(by_reason.items()))
    return (f"no faces to split: of {merge_summary.get('rows_in', 0)} photos, detection "
            f"found a face in {counts.get('ok', 0)}, none in {counts.get('no_face', 0)}, and "
            f"{counts.get('error', 0) + counts.get('unreadable', 0)} could not be used"
            + (f" ({problems}; examples in {c.folder.stages})" if problems else "")
            + f"; {merge_summary.get('faces', 0)} of the faces have labels"
            + (" (check that the labels' subject IDs match the photos)"
               if counts.get("ok") and not merge_summary.get("faces") else ""))


# ------------------------------------------------------------------------------- crops

def _crop_plan(c: StageConfig) -> cache.CropPlan:
    return c.memo_get("crop_plan", lambda: cache.crop_plan(c))


def _crop_index(c: StageConfig):
    """The crop shards and their index of faces by split (``crop_stream.load_index``),
    as train and evaluate read them."""
    from tasks.crop_stream import load_index

    return load_index(cache.crop_files(c, _crop_plan(c).shards), c.folder.faces,
                      c.folder.split)


def _crop_shards(c: StageConfig) -> list[Shard]:
    indexed = _indexed_plan(c)
    return _crop_plan(c).shards if indexed is None else indexed[0]


def _crops_plan(c: StageConfig) -> ShardPlan:
    indexed = _indexed_plan(c)
    if indexed is not None:
        shards, keys = indexed
        plan = None
    else:
        plan = _crop_plan(c)
        shards, keys = plan.shards, [plan.shard_key(s, c) for s in plan.shards]
        _record_plan(c, shards, keys)
    stored = [crops.stored_shard(c.folder.crops / s.filename, k)
              for s, k in zip(shards, keys, strict=True)]
    return ShardPlan(shards, stored, plan)


def _crops_call(c: StageConfig, plan: ShardPlan, shard: Shard):
    boxes, landmarks = plan.extra.shard_faces(shard)
    return crops.crop_shard, (c.data.image_roots(), shard, boxes, c.crops, c.folder.crops,
                              c.sharding.opencv_threads, landmarks, c.detector.margin)


def _crops_finish(c: StageConfig, plan: ShardPlan, summary: dict) -> None:
    if not c.crops.align:
        return
    unaligned = plan.extra.unaligned()  # faces without landmarks: box crops
    summary["status_counts"]["unaligned"] = unaligned
    if unaligned:
        _log().warning(
            "crops: %d faces have no landmarks (detector.kind %s finds none): cut as box "
            "crops; set detector.kind to one with landmarks (%s) to align them", unaligned,
            c.detector.kind, ", ".join(LANDMARK_KINDS))


# ------------------------------------------------------------------------------- train

def _train_check(c: StageConfig) -> None:
    from models.classifier import check_weights

    check_weights(c.model)


def _train_run(c: StageConfig, key: str) -> dict:
    folder = c.folder
    # train beside the current model; it is replaced only once the new one is complete,
    # and a killed training of the same settings resumes from its own folder
    work = folder.experiment_dir / f".training-{key[:16]}"
    for other in folder.experiment_dir.glob(".training-*"):
        if other != work:
            shutil.rmtree(other)  # an unfinished training of other settings
    work.mkdir(parents=True, exist_ok=True)
    index = _crop_index(c)
    crop_spec = {"margin": c.detector.margin, "margin_mode": c.detector.margin_mode,
                 "detector": c.detector.kind,
                 "align": c.crops.align and gives_landmarks(c.detector.kind)}
    result = train.train_model(index, c.crops.size, c.model, c.train, work, folder.logs,
                               crop_spec)
    write_bytes_atomic(folder.experiment_config, c.recipe_yaml().encode())
    replace_folder(work, folder.model)
    _log().info("train: %d epochs; best epoch %d: val gender %.3f, val age band %.3f",
                result["epochs_run"], result["best_epoch"], result["val_gender_accuracy"],
                result["val_age_band_accuracy"])
    return {"rows_in": result["train_examples"] + result["val_examples"],
            "rows_out": result["train_examples"], **result}


def _train_recalibrate(c: StageConfig, key: str) -> dict:
    """Only the calibration settings changed: refit the calibration of the trained
    network on the validation people, rewrite labels.json (the network, its history and
    any export stay)."""
    folder = c.folder
    index = _crop_index(c)
    labels = json.loads((folder.model / "labels.json").read_text())
    calibration = train.write_calibrated_labels(folder.model, labels, index, c.crops.size,
                                                c.train)
    write_bytes_atomic(folder.experiment_config, c.recipe_yaml().encode())
    band = calibration["age_band"]
    _log().info("train: the calibration settings changed: refitted on %d validation faces "
                "of the trained network (age band ECE %.3f -> %.3f%s), no training",
                band["examples"], band["ece_before"], band["ece_after"],
                ", a bias per band" if "bias" in band else "")
    return {"recalibrated": {"age_band_ece": band["ece_after"],
                             "examples": band["examples"],
                             "folder": c.train.calibration_folder,
                             "bias": c.train.calibration_bias}}


# ---------------------------------------------------------------------------- evaluate

def _evaluate_run(c: StageConfig, key: str) -> dict:
    from models.classifier import load_classifier

    folder = c.folder
    index = _crop_index(c)
    model = load_classifier(folder.model_file)
    model_labels = json.loads((folder.model / "labels.json").read_text())
    metrics = evaluate.evaluation_metrics(model, index, c.crops.size,
                                          synthetic_labels=labels_are_synthetic(c.data),
                                          calibration=model_calibration(model_labels),
                                          ages=tuple(model_labels.get("ages", AGES)),
                                          age_line=model_labels.get("age_calibration"))
    report_path = write_report(metrics, train.load_history(folder.model),
                               c.upstream_summary("split"), c.upstream_summary("faces"),
                               folder.reports)
    scored = metrics["scored_split"]
    if _in_run():  # the report in the Prefect UI
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_markdown_artifact(key="kface-report", markdown=report_path.read_text(),
                                 description="Evaluation report")
        create_table_artifact(key="kface-metrics", table=[
            {"head": h, "split": scored, "accuracy": metrics[h]["accuracy"],
             "ci95": metrics[h]["ci95"]["accuracy"], "macro_f1": metrics[h]["macro_f1"],
             "majority_baseline": metrics[h]["baselines"]["majority_class"]["accuracy"]}
            for h in ("gender", "age_band")], description=f"Metrics on the {scored} split")
    logger = _log()
    for warning in metrics["warnings"]:
        logger.warning("evaluate: %s", warning)
    g, a = metrics["gender"], metrics["age_band"]
    logger.info("evaluate (%s, %d subjects): gender %.3f [%.3f-%.3f], age band %.3f "
                "[%.3f-%.3f] (majority class %.3f), within one band %.3f; report %s", scored,
                metrics["subjects"], g["accuracy"], *g["ci95"]["accuracy"], a["accuracy"],
                *a["ci95"]["accuracy"], a["baselines"]["majority_class"]["accuracy"],
                a["accuracy_within_one_band"], report_path)
    return {"rows_in": metrics["examples"], "rows_out": metrics["examples"],
            "report": str(report_path), "scored_split": scored,
            f"{scored}_gender_accuracy": g["accuracy"],
            f"{scored}_age_band_accuracy": a["accuracy"],
            f"{scored}_age_band_within_one": a["accuracy_within_one_band"],
            "warnings": metrics["warnings"]}


def labels_are_synthetic(data: select.DataConfig) -> bool:
    """Whether the sample generator marked this dataset's labels as made up."""
    from tasks.sample_data import SYNTHETIC_MARKER

    folders = {Path(data.root)}
    for label_file in (data.metadata, data.labels):
        if label_file:
            folders.add(Path(label_file).parent)
    return any((folder / SYNTHETIC_MARKER).exists() for folder in folders)


# ---------------------------------------------------------------------------- the table

STAGE_TABLE: list[Stage] = [
    Stage("select", select.select_images, reads=(), writes="manifest",
          sections=("data", "selection"), code_version=select.CODE_VERSION, scope="data",
          key_settings=("data.layout", "data.resolution", "selection"),
          stale_detail="the dataset or selection changed", check=_select_check,
          errors=(DatasetError,),
          source=_select_source, run=_select_run, readers_leave_out=("mtime_ns",),
          same_for_readers=_select_same_for_readers),
    Stage("detect", detect.detect_shard, reads=("manifest",), writes="detections",
          sections=("data", "detector", "sharding"), code_version=detect.CODE_VERSION,
          scope="data", check=_detect_check, errors=(DetectorError,),
          shards=_detect_shards, plan=_detect_plan,
          shard_call=_detect_call, finish=_detect_finish, problems=_detect_problems),
    Stage("merge", labels.merge_faces, reads=("manifest", "detections"), writes="faces",
          sections=("data",), code_version=labels.CODE_VERSION, scope="data",
          key_settings=("data.metadata",), check=_merge_check,
          errors=(labels.LabelsError,), run=_merge_run),
    Stage("split", split.split_faces, reads=("faces",), writes="split", sections=("split",),
          code_version=split.CODE_VERSION, scope="data", key_settings=("split",),
          run=_split_run),
    Stage("crops", crops.crop_shard, reads=("faces",), writes="crops",
          sections=("data", "detector", "crops", "sharding"),
          code_version=crops.CODE_VERSION, scope="data", shards=_crop_shards,
          plan=_crops_plan, shard_call=_crops_call, finish=_crops_finish),
    Stage("train", train.train_model, reads=("crops", "faces", "split"), writes="model",
          sections=("data", "detector", "crops", "model", "train"),
          code_version=train.CODE_VERSION, scope="experiment",
          key_settings=("crops", "model", "train"),
          stale_detail="inputs or model/train settings changed", check=_train_check,
          errors=(WeightsError, MobileFaceNetError),
          key_in="summary", run=_train_run,
          partial_settings=tuple(f"train.{k}" for k in train.CALIBRATION_SETTINGS),
          partial_run=_train_recalibrate,
          # (a labels.json removed by hand: train anew)
          partial_needs=lambda folder: (folder.model / "labels.json").is_file(),
          partial_detail="refits the calibration on the trained network (seconds) instead "
                         "of training anew"),
    Stage("evaluate", evaluate.evaluation_metrics,
          reads=("model", "crops", "faces", "split"), writes="reports",
          sections=("data", "crops"), code_version=evaluate.CODE_VERSION,
          scope="experiment", stale_detail="the model or the test people changed",
          key_in="summary", run=_evaluate_run),
]


def input_errors() -> tuple[type[Exception], ...]:
    """Every row's ``errors``: what is said in one line wherever a stage runs or is
    checked."""
    return tuple({e: None for s in STAGE_TABLE for e in s.errors})


STAGE: dict[str, Stage] = {}
STAGES: list[str] = []  # the run order
DATA_STAGES: list[str] = []
PRODUCER: dict[str, str] = {}  # output -> the stage that writes it


def _derive() -> None:
    """The lookups, from the table (updated in place: importers keep their references)."""
    STAGE.clear()
    STAGE.update((s.name, s) for s in STAGE_TABLE)
    STAGES[:] = [s.name for s in STAGE_TABLE]
    DATA_STAGES[:] = [s.name for s in STAGE_TABLE if s.scope == "data"]
    PRODUCER.clear()
    PRODUCER.update((s.writes, s.name) for s in STAGE_TABLE)


def register_stage(stage: Stage) -> None:
    """Add a row at the end of the run order (a stage from a plugin, or a test's); its
    inputs must be written by rows before it."""
    if stage.name in STAGE or stage.writes in PRODUCER:
        raise ValueError(f"stage {stage.name!r} or its output {stage.writes!r} exists")
    unknown = [name for name in stage.reads if name not in PRODUCER]
    if unknown:
        raise ValueError(f"stage {stage.name!r} reads {unknown}, which no stage writes")
    STAGE_TABLE.append(stage)
    _derive()


def unregister_stage(name: str) -> None:
    STAGE_TABLE[:] = [s for s in STAGE_TABLE if s.name != name]
    _derive()


_derive()


def output_path(folder: RunFolder, output: str) -> Path:
    """Where the output ``output`` of a run folder is."""
    return STAGE[PRODUCER[output]].output(folder)


def stage_inputs(stage: str) -> tuple[tuple[str, str], ...]:
    """``(output, the stage that writes it)`` for each output ``stage`` reads."""
    return tuple((name, PRODUCER[name]) for name in STAGE[stage].reads)


def stage_table_markdown() -> str:
    """The stage table as Markdown: a Mermaid graph of what flows where, and one row per
    stage (``docs/stages.md`` holds this text; a test keeps them equal)."""
    folder = RunFolder(Path("OUT"), "NAME")
    graph = ["```mermaid", "flowchart LR"]
    for stage in STAGE_TABLE:
        for name in stage.reads:
            graph.append(f"    o_{name} --> s_{stage.name}")
        where = stage.output(folder).as_posix()
        if stage.sharded:
            where += "/shard-*.parquet"
        graph.append(f"    s_{stage.name}[{stage.name}] --> o_{stage.writes}[(\"{where}\")]")
    rows = ["| stage | work | reads | writes | config sections | key settings | code version "
            "| scope | shards |", "|---|---|---|---|---|---|---|---|---|"]
    for s in STAGE_TABLE:
        work = f"`{s.work.__module__}.{s.work.__name__}`"
        keyed = [*s.key_settings, *(["(the scan)"] if s.source else [])]
        if s.sharded:
            keyed = ["(per shard: its task's)"]
        if s.partial_settings:
            keyed.append(f"(applied without redoing the work: {', '.join(s.partial_settings)})")
        rows.append(f"| {s.name} | {work} | {', '.join(s.reads) or '(the dataset)'} "
                    f"| {s.writes} | {', '.join(s.sections)} | {', '.join(keyed) or '-'} "
                    f"| {s.code_version} | {s.scope} | {'yes' if s.sharded else 'no'} |")
    return "\n".join([*graph, "```", "", *rows]) + "\n"


# ------------------------------------------------------------------------------ status

@dataclass
class StageStatus:
    """One stage's state for a config: done / cached / stale / missing (see
    ``pipeline_status``)."""

    stage: str
    state: str
    detail: str
    errors: dict[str, dict[str, int]] | None = None  # failed rows (the row's ``problems``)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "state": self.state, "detail": self.detail,
                "errors": self.errors}


def shard_detail(plan: ShardPlan, folder: Path) -> str:
    """``"k/n shards current"`` and the files no plan contains (dropped by the next run)."""
    detail = f"{len(plan.shards) - len(plan.todo)}/{len(plan.shards)} shards current"
    planned = {s.filename for s in plan.shards}
    extra = sum(p.name not in planned for p in Path(folder).glob("shard-*.parquet"))
    if extra:  # never read (merge and crops read the planned files)
        detail += f", {extra} shard files no longer planned"
    return detail


def pipeline_status(config: PipelineConfig) -> list[StageStatus]:
    """Per stage, what the next run with ``config`` would do, read from the run folder
    with the same keys and plans the run uses.

    * ``missing``: no output yet; the run computes it.
    * ``stale``: an output exists but its inputs, config or code changed (or a stage it
      reads from is stale or missing); the run recomputes it (sharded stages: only the shards
      that changed).
    * ``done``: up to date, computed by the last run that ran the stage.
    * ``cached``: up to date, and the last run reused it instead of recomputing.

    The select stage walks the dataset and stats every selected photo, so new, removed,
    renamed or changed photos show as ``stale``; it parses and hashes only when the walk
    or the stats differ from the manifest's scan. The sharded stages take their shards'
    keys from the plans the last run recorded while what a plan is made of is unchanged,
    and read every shard file's key. K-Face size (583,200 photos): about 4 s.
    """
    result: list[StageStatus] = []
    current_outputs: set[str] = set()
    memo: dict[str, Any] = {}  # one view of the run folder: a plan is made once
    for stage in STAGE_TABLE:
        upstream_ok = all(name in current_outputs for name in stage.reads)
        c = StageConfig(config, stage, writing=False, memo=memo)
        output = stage.output(c.folder)
        errors = stage.problems(c) if stage.problems else None
        if stage.sharded:
            exists = any(output.glob("shard-*.parquet"))
            current, detail = False, ""
            if upstream_ok:
                plan = stage.plan(c)
                current, detail = not plan.todo, shard_detail(plan, output)
            unreadable = sum((errors or {}).get("unreadable", {}).values())
            if upstream_ok and unreadable:
                detail += f", {unreadable} photo(s) could not be read last time (retried)"
        else:
            exists = output.exists()
            current = exists and upstream_ok and stage.stored_key(c.folder) == stage.key(c)
            detail = "" if current else stage.stale_detail
            same = (exists and upstream_ok and not current and stage.same_for_readers
                    and stage.same_for_readers(c))
            if same:  # stale, but what its readers key on is unchanged: judge them alone
                current_outputs.add(stage.writes)
                detail = same
            elif exists and upstream_ok and not current and stage.runs_partly(c):
                detail = (f"only settings among {', '.join(stage.partial_settings)} "
                          f"changed: the run {stage.partial_detail}")
        if not exists:
            state, detail = "missing", "not run yet"
        elif not upstream_ok:
            state, detail = "stale", "a stage it reads from is stale or missing"
        elif not current:
            state = "stale"
        else:
            state = "cached" if stage.stored_summary(c.folder).get("reused") else "done"
        if state in ("done", "cached"):
            current_outputs.add(stage.writes)
        result.append(StageStatus(stage.name, state, detail, errors))
    return result


def work_seconds(summary: dict) -> float | None:
    """What computing a single-output stage's output took, kept while the output is
    reused or only its partial settings are applied: ``work_seconds``, or ``seconds`` in
    a summary written before it was kept (2026-12-05)."""
    return summary.get("work_seconds", summary.get("seconds"))


def list_experiments(out: Path) -> list[dict]:
    """One summary per ``OUT/experiments/<name>/``: its recipe (from its config.yaml),
    the scored metrics, training time and state (evaluated / trained / training
    unfinished / not trained)."""
    import yaml

    rows = []
    for name in RunFolder(out).experiment_names():
        folder = RunFolder(out, name)
        config_file = folder.experiment_config
        cfg = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
        trained_summary = STAGE["train"].stored_summary(folder)
        scored_summary = STAGE["evaluate"].stored_summary(folder)
        scored = scored_summary.get("scored_split", "")
        trained = folder.model_file.exists()
        state = ("evaluated" if scored_summary else "trained") if trained else "not trained"
        if any(folder.experiment_dir.glob(".training-*")):  # killed, or running now
            state = ("training unfinished" if state == "not trained"
                     else f"{state}; a newer training unfinished")
        metric = {name: scored_summary.get(f"{scored}_{name}") for name in (
            "gender_accuracy", "age_band_accuracy", "age_band_within_one")}
        metric = {k: f"{v:.3f}" if isinstance(v, float) else "-" for k, v in metric.items()}
        # (a run that only refitted the calibration keeps the training's time)
        trained_seconds = work_seconds(trained_summary)
        rows.append({
            "name": name,
            "backbone": cfg.get("model", {}).get("backbone", "-"),
            "input_size": cfg.get("crops", {}).get("size", "-"),
            "epochs": (f"{trained_summary['epochs_run']}/"
                       f"{cfg.get('train', {}).get('epochs', '?')}" if trained_summary else "-"),
            "gender": metric["gender_accuracy"], "age_band": metric["age_band_accuracy"],
            "within_one": metric["age_band_within_one"], "scored": scored or "-",
            "training": (f"{trained_seconds / 60:.1f} min" if trained_summary else "-"),
            "state": state,
            "model": str(folder.model),
        })
    return rows
