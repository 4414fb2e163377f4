"""The stage table: the one place that says what each stage of the pipeline is.

Each row of ``STAGE_TABLE`` names a stage, the function that does its work (in
``tasks/``), the run-folder outputs it reads and the one it writes, the config sections it
may see, its code version, and whether it belongs to the run's data or to an experiment.
Everything else is derived from the table: the run order, ``--stages`` checks, the pre-run
input checks (``flows.preflight``), the reuse decision the flow makes before it starts any
worker (``flows.pipeline``), ``kface status`` (``pipeline_status`` below), the deployments'
stage lists and ``docs/stages.md``.

A stage's functions receive a ``StageConfig``: the run folder and only the config
sections its row declares (reading another one is an error naming this file). Adding a
stage: write its work in ``tasks/``, its ``key``/``run`` functions here, and add its row.
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

from core.labels import AGES
from core.sharding import Shard
from core.storage import read_cache_key, replace_folder, write_bytes_atomic, write_parquet_atomic
from flows import cache
from flows.config import PipelineConfig, dump_config
from flows.run_folder import RunFolder
from models.detector import LANDMARK_KINDS, gives_landmarks
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
class ShardPlan:
    """A sharded stage's plan: its shards and, per shard, the stored summary of a file
    complete for the shard's key (None: the shard needs work)."""

    shards: list[Shard]
    stored: list[dict | None]
    extra: Any = None  # what the stage's calls need besides the shard (the crop plan)

    @property
    def todo(self) -> list[Shard]:
        return [s for s, done in zip(self.shards, self.stored, strict=True) if done is None]


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
    stale_detail: str = "inputs or settings changed"
    # single-output stages: the expected key, where the stored one is, and the work
    key: Callable[[StageConfig], str] | None = None
    key_in: Literal["output", "summary"] = "output"  # Parquet metadata or stages/<name>.json
    run: Callable[[StageConfig, str], dict] | None = None
    # sharded stages: the plan, one shard's call (function, arguments), the summary's
    # additions once all shards are done
    plan: Callable[[StageConfig], ShardPlan] | None = None
    shard_call: Callable[[StageConfig, ShardPlan, Shard], tuple[Callable, tuple]] | None = None
    finish: Callable[[StageConfig, ShardPlan, dict], None] | None = None

    @property
    def sharded(self) -> bool:
        return self.plan is not None

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
        output = folder.output(self.writes)
        if not output.exists():
            return None
        if self.key_in == "output":
            return read_cache_key(output)
        return self.stored_summary(folder).get("cache_key")


class StageConfig:
    """What one stage sees: its run folder, the config sections its row declares (another
    section is an AttributeError), and a memo for what its key computed and its work
    reuses (the scan, a plan)."""

    def __init__(self, config: PipelineConfig, stage: Stage, writing: bool = True):
        self.stage = stage.name
        self.folder = config.folder
        self.writing = writing  # False for kface status, which only reads
        self.memo: dict[str, Any] = {}
        self._config = config  # for recipe_yaml only
        for name in stage.sections:
            setattr(self, name, getattr(config, name))

    def __getattr__(self, name: str):  # called only for attributes that are not set
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"stage '{self.stage}' reads the config section '{name}', which "
                             "its row in flows/stages.py does not declare")

    def recipe_yaml(self) -> str:
        """The whole config as YAML: the recipe an experiment's model was trained with."""
        return dump_config(self._config)

    def memo_get(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self.memo:
            self.memo[name] = compute()
        return self.memo[name]


# ------------------------------------------------------------------------------ select

def _scan(c: StageConfig):
    """The selected photos with their sha256 (read only where the stat cache has no
    entry of that size and mtime: ``core.content``)."""
    return c.memo_get("scan", lambda: select.select_images(
        c.data, c.selection, c.folder.file_hashes, save_hashes=c.writing))


def _select_key(c: StageConfig) -> str:
    table, _ = _scan(c)
    return cache.select_key(c, table)


def _select_run(c: StageConfig, key: str) -> dict:
    table, report = _scan(c)
    write_parquet_atomic(c.folder.manifest, table, key)
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
    return c.memo_get("detect_shards", lambda: cache.detect_shards(c))


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
    shards = _detect_shards(c)
    chips = {name: g["landmarks"] for name, g in _chip_geometry(c).items()}
    stored = [detect.stored_shard(c.folder.detections / s.filename,
                                  detect.shard_cache_key(s, c.detector, chips),
                                  detect.shard_cache_key(s, c.detector, chips, by_stat=True),
                                  adopt=c.writing)
              for s in shards]
    return ShardPlan(shards, stored, chips)


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

def _merge_key(c: StageConfig) -> str:
    return cache.merge_key(c, _detect_shards(c))


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
    metadata = None
    if c.data.layout == "kface":
        if c.data.metadata is None:
            raise labels.LabelsError("the merge stage needs the K-Face metadata CSV: "
                                     "--metadata FILE (data.metadata)")
        metadata = labels.read_metadata(c.data.metadata)
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
    return {"rows_in": len(detections), "rows_out": table.num_rows, **report}


# ------------------------------------------------------------------------------- split

def _split_run(c: StageConfig, key: str) -> dict:
    faces = pq.read_table(c.folder.faces).to_pandas()
    if faces.empty:
        raise split.SplitError(_no_faces_message(c.folder))
    table, report = split.split_faces(faces, c.split)
    write_parquet_atomic(c.folder.split, pa.Table.from_pandas(table, preserve_index=False),
                         key)
    logger = _log()
    logger.info("split (%s): %s rows, subjects %s", c.split.strategy, report["rows"],
                report["subjects"])
    if report.get("warning"):
        logger.warning("split: %s", report["warning"])
    return {"rows_in": len(faces), "rows_out": len(table), **report}


def _no_faces_message(folder: RunFolder) -> str:
    """Why no face reached the split, from the detect and merge summaries' counts."""
    detect_summary = STAGE["detect"].stored_summary(folder)
    merge_summary = STAGE["merge"].stored_summary(folder)
    counts = detect_summary.get("status_counts", {})
    problems = "; ".join(f"{reason} {n}"
                         for by_reason in detect_summary.get("errors", {}).values()
                         for reason, n in sorted(by_reason.items()))
    return (f"no faces to split: of {detect_summary.get('rows_in', 0)} photos, detection "
            f"found a face in {counts.get('ok', 0)}, none in {counts.get('no_face', 0)}, and "
            f"{counts.get('error', 0) + counts.get('unreadable', 0)} could not be used"
            + (f" ({problems}; examples in {STAGE['detect'].summary_file(folder)})"
               if problems else "")
            + f"; {merge_summary.get('faces', 0)} of the faces have labels"
            + (" (check that the labels' subject IDs match the photos)"
               if counts.get("ok") and not merge_summary.get("faces") else ""))


# ------------------------------------------------------------------------------- crops

def _crop_plan(c: StageConfig) -> cache.CropPlan:
    return c.memo_get("crop_plan", lambda: cache.crop_plan(c))


def _crops_plan(c: StageConfig) -> ShardPlan:
    plan = _crop_plan(c)
    keys = [plan.shard_key(s, c) for s in plan.shards]
    stored = [crops.stored_shard(c.folder.crops / s.filename, k, c.crops,
                                 plan.shard_faces(s)[1])
              for s, k in zip(plan.shards, keys, strict=True)]
    return ShardPlan(plan.shards, stored, plan)


def _crops_call(c: StageConfig, plan: ShardPlan, shard: Shard):
    boxes, landmarks = plan.extra.shard_faces(shard)
    return crops.crop_shard, (c.data.image_roots(), shard, boxes, c.crops, c.folder.crops,
                              c.sharding.opencv_threads, landmarks, c.detector.margin)


def _crops_finish(c: StageConfig, plan: ShardPlan, summary: dict) -> None:
    unaligned = summary["status_counts"].get("unaligned", 0)
    if unaligned:
        _log().warning(
            "crops: %d faces have no landmarks (detector.kind %s finds none): cut as box "
            "crops; set detector.kind to one with landmarks (%s) to align them", unaligned,
            c.detector.kind, ", ".join(LANDMARK_KINDS))


# ------------------------------------------------------------------------------- train

def _train_key(c: StageConfig) -> str:
    return cache.train_key(c, _crop_plan(c).shards)


def _train_run(c: StageConfig, key: str) -> dict:
    from tasks.crop_stream import load_index

    folder = c.folder
    # train beside the current model; it is replaced only once the new one is complete,
    # and a killed training of the same settings resumes from its own folder
    work = folder.experiment_dir / f".training-{key[:16]}"
    for other in folder.experiment_dir.glob(".training-*"):
        if other != work:
            shutil.rmtree(other)  # an unfinished training of other settings
    work.mkdir(parents=True, exist_ok=True)
    index = load_index(cache.crop_files(c, _crop_plan(c).shards), folder.faces, folder.split)
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


# ---------------------------------------------------------------------------- evaluate

def _evaluate_key(c: StageConfig) -> str:
    return cache.evaluate_key(STAGE["train"].stored_summary(c.folder).get("cache_key"))


def _evaluate_run(c: StageConfig, key: str) -> dict:
    from models.classifier import load_classifier
    from tasks.crop_stream import load_index

    folder = c.folder
    index = load_index(cache.crop_files(c), folder.faces, folder.split)
    model = load_classifier(folder.model_file)
    model_labels = json.loads((folder.model / "labels.json").read_text())
    metrics = evaluate.evaluation_metrics(model, index, c.crops.size,
                                          synthetic_labels=labels_are_synthetic(c.data),
                                          temperature=model_labels.get("temperature"),
                                          ages=tuple(model_labels.get("ages", AGES)),
                                          age_line=model_labels.get("age_calibration"))
    report_path = evaluate.write_report(metrics, train.load_history(folder.model),
                                        STAGE["split"].stored_summary(folder),
                                        STAGE["merge"].stored_summary(folder), folder.reports)
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

STAGE_TABLE: tuple[Stage, ...] = (
    Stage("select", select.select_images, reads=(), writes="manifest",
          sections=("data", "selection"), code_version=select.CODE_VERSION, scope="data",
          stale_detail="the dataset or selection changed", key=_select_key, run=_select_run),
    Stage("detect", detect.detect_shard, reads=("manifest",), writes="detections",
          sections=("data", "detector", "sharding"), code_version=detect.CODE_VERSION,
          scope="data", plan=_detect_plan, shard_call=_detect_call, finish=_detect_finish),
    Stage("merge", labels.merge_faces, reads=("manifest", "detections"), writes="faces",
          sections=("data",), code_version=labels.CODE_VERSION, scope="data",
          key=_merge_key, run=_merge_run),
    Stage("split", split.split_faces, reads=("faces",), writes="split", sections=("split",),
          code_version=split.CODE_VERSION, scope="data", key=cache.split_key, run=_split_run),
    Stage("crops", crops.crop_shard, reads=("faces",), writes="crops",
          sections=("data", "detector", "crops", "sharding"),
          code_version=crops.CODE_VERSION, scope="data", plan=_crops_plan,
          shard_call=_crops_call, finish=_crops_finish),
    Stage("train", train.train_model, reads=("crops", "faces", "split"), writes="model",
          sections=("data", "detector", "crops", "model", "train"),
          code_version=train.CODE_VERSION, scope="experiment",
          stale_detail="inputs or model/train settings changed", key=_train_key,
          key_in="summary", run=_train_run),
    Stage("evaluate", evaluate.evaluation_metrics,
          reads=("model", "crops", "faces", "split"), writes="reports",
          sections=("data", "crops"), code_version=evaluate.CODE_VERSION,
          scope="experiment", stale_detail="the model changed", key=_evaluate_key,
          key_in="summary", run=_evaluate_run),
)

STAGE: dict[str, Stage] = {s.name: s for s in STAGE_TABLE}
STAGES: tuple[str, ...] = tuple(STAGE)  # the run order
DATA_STAGES: list[str] = [s.name for s in STAGE_TABLE if s.scope == "data"]
PRODUCER: dict[str, str] = {s.writes: s.name for s in STAGE_TABLE}


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
        where = folder.output(stage.writes).as_posix()
        if stage.sharded:
            where += "/shard-*.parquet"
        graph.append(f"    s_{stage.name}[{stage.name}] --> o_{stage.writes}[(\"{where}\")]")
    rows = ["| stage | work | reads | writes | config sections | code version | scope "
            "| shards |", "|---|---|---|---|---|---|---|---|"]
    for s in STAGE_TABLE:
        work = f"`{s.work.__module__}.{s.work.__name__}`"
        rows.append(f"| {s.name} | {work} | {', '.join(s.reads) or '(the dataset)'} "
                    f"| {s.writes} | {', '.join(s.sections)} | {s.code_version} | {s.scope} "
                    f"| {'yes' if s.sharded else 'no'} |")
    return "\n".join([*graph, "```", "", *rows]) + "\n"


# ------------------------------------------------------------------------------ status

@dataclass
class StageStatus:
    """One stage's state for a config: done / cached / stale / missing (see
    ``pipeline_status``)."""

    stage: str
    state: str
    detail: str
    errors: dict[str, dict[str, int]] | None = None  # detect: ``detection_errors``

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
    * ``stale``: an output exists but its inputs, config or code changed (or an upstream
      stage is stale or missing); the run recomputes it (sharded stages: only the shards
      that changed).
    * ``done``: up to date, computed by the last run that ran the stage.
    * ``cached``: up to date, and the last run reused it instead of recomputing.

    The select stage re-scans the dataset (the scan is cheap: ~200k paths/s), so new or
    changed photos show as ``stale``.
    """
    result: list[StageStatus] = []
    upstream_ok = True
    for stage in STAGE_TABLE:
        c = StageConfig(config, stage, writing=False)
        output = c.folder.output(stage.writes)
        errors = None
        if stage.sharded:
            exists = any(output.glob("shard-*.parquet"))
            current, detail = False, ""
            if upstream_ok:
                plan = stage.plan(c)
                current, detail = not plan.todo, shard_detail(plan, output)
            if stage.name == "detect":
                errors = cache.detection_errors(c.folder, _detect_shards(c))
                unreadable = sum(errors.get("unreadable", {}).values())
                if upstream_ok and unreadable:
                    detail += f", {unreadable} photo(s) could not be read last time (retried)"
        else:
            exists = output.exists()
            current = exists and upstream_ok and stage.stored_key(c.folder) == stage.key(c)
            detail = "" if current else stage.stale_detail
        if not exists:
            state, detail = "missing", "not run yet"
        elif not upstream_ok:
            state, detail = "stale", "an upstream stage is stale or missing"
        elif not current:
            state = "stale"
        else:
            state = "cached" if stage.stored_summary(c.folder).get("reused") else "done"
        upstream_ok = upstream_ok and state in ("done", "cached")
        result.append(StageStatus(stage.name, state, detail, errors))
    return result
