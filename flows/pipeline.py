"""The ``kface-pipeline`` Prefect flow: wiring only; the work lives in ``tasks/``.

Stage outputs (all under ``config.out``; ``flows.cache.stage_paths`` is the one list):
select -> ``manifest.parquet``; detect -> ``detections/shard-*.parquet``; merge ->
``faces.parquet``; split -> ``split.parquet``; crops -> ``crops/shard-*.parquet``;
train -> ``model/`` (+ ``logs/`` for TensorBoard); evaluate -> ``reports/``. Each
``stages/<stage>.json`` is the stage summary: rows in/out, seconds, what was reused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Completed, State
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from core.sharding import Shard, ShardingConfig, batch_shards, shard_runner
from core.storage import (
    folder_lock,
    read_cache_key,
    remove_temporaries,
    replace_folder,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from flows.cache import (
    crop_files,
    crop_plan,
    detect_shards,
    detection_errors,
    evaluate_key,
    merge_key,
    select_key,
    split_key,
    stage_paths,
    stored_summary,
    summary_path,
    train_key,
)
from flows.config import PipelineConfig, dump_config
from flows.preflight import STAGES, check_inputs_current, check_stage_names, missing_input
from models.detector import DetectorConfig
from tasks.crops import CropConfig, crop_shard
from tasks.detect import DETECTIONS_SCHEMA, detect_shard, remove_stale_shards
from tasks.labels import LabelsError, merge_faces, read_metadata
from tasks.select import select_images
from tasks.split import SplitError, split_faces


class MissingInputError(RuntimeError):
    """A requested stage's input file does not exist (its upstream stage has not run)."""


def _require_inputs(config: PipelineConfig, stage: str) -> None:
    problem = missing_input(config, stage)
    if problem:
        raise MissingInputError(problem)


def _record(config: PipelineConfig, summary: dict) -> dict:
    """Write ``stages/<stage>.json`` and the stage's summary table artifact."""
    stage = summary["stage"]
    write_json_atomic(summary_path(config, stage), summary)
    create_table_artifact(
        key=f"{stage}-summary",
        table=[{"stage": stage, "rows_in": summary["rows_in"], "rows_out": summary["rows_out"],
                "seconds": summary["seconds"], "cached": summary["reused"]}],
        description=f"{stage}: rows in/out, time, cached or not",
    )
    return summary


def _reused(config: PipelineConfig, stage: str, key: str, message: str) -> State:
    """The Cached state of a stage whose output already holds ``key``; logs one line."""
    summary = {**(stored_summary(config, stage) or {"stage": stage, "rows_in": 0,
                                                      "rows_out": 0}),
               "reused": True, "seconds": 0.0, "cache_key": key}
    _record(config, summary)
    get_run_logger().info("%s: cached, %s (%d rows)", stage, message, summary["rows_out"])
    return Completed(data=summary, name="Cached", message=message)


@task(name="select", cache_policy=NO_CACHE)
def select_task(config: PipelineConfig):
    """Scan the dataset and write ``manifest.parquet`` (kept as is when the scan found the
    same photos with the same sizes and mtimes)."""
    logger = get_run_logger()
    start = time.perf_counter()
    table, report = select_images(config.data, config.selection)
    paths = stage_paths(config.out, config.experiment)
    key = select_key(config, table)
    if read_cache_key(paths["manifest"]) == key:
        return _reused(config, "select", key, "the dataset and selection are unchanged")
    write_parquet_atomic(paths["manifest"], table, key)
    summary = {
        "stage": "select", "rows_in": report.images, "rows_out": table.num_rows,
        "seconds": round(time.perf_counter() - start, 2), "reused": False, "cache_key": key,
        "subjects": len(set(table.column("subject_id").to_pylist())),
        **report.as_dict(),
    }
    _record(config, summary)
    scanned = ("of the photos in the selected accessory, light and expression folders, "
               "the others not read; cameras chosen by file name"
               if config.data.layout == "kface" else "of the labelled photos")
    logger.info(
        "select: %d of %d images selected (%d subjects; %s) in %.1fs; %d files not in "
        "the layout%s", table.num_rows, report.images, summary["subjects"], scanned,
        summary["seconds"], report.unrecognised,
        f", e.g. {report.unrecognised_examples[:3]}" if report.unrecognised else "",
    )
    if report.excluded_labels:
        logger.warning("select: %d labelled images excluded: %s", report.excluded_labels,
                       report.excluded_label_examples[:5])
    return summary


@task(name="detect-shards", cache_policy=NO_CACHE, retries=1)
def detect_shards_task(root: Path, shards: list[Shard], detector: DetectorConfig,
                       out_dir: Path, opencv_threads: int):
    """Thin wrapper: detect a batch of shards; shards already on disk are not redone."""
    return _batch_state([detect_shard(root, shard, detector, out_dir, opencv_threads)
                         for shard in shards])


@task(name="crop-shards", cache_policy=NO_CACHE, retries=1)
def crop_shards_task(root: Path, shards: list[Shard], faces: list[tuple], crops: CropConfig,
                     margin: float, out_dir: Path, opencv_threads: int):
    """Thin wrapper: crop a batch of shards of faces (each shard's boxes and landmarks)
    into the crop cache."""
    return _batch_state([crop_shard(root, shard, boxes, crops, out_dir, opencv_threads,
                                    landmarks, margin)
                         for shard, (boxes, landmarks) in zip(shards, faces, strict=True)])


def _batch_state(summaries: list[dict]):
    """A batch whose every shard was already complete is shown as Cached."""
    if all(s["reused"] for s in summaries):
        return Completed(data=summaries, name="Cached", message=f"{len(summaries)} shard(s) "
                         "already complete (cache keys match)")
    return summaries


def _run_shards(stage: str, out_dir: Path, shards: list[Shard], sharding: ShardingConfig,
                submit) -> dict:
    """Submit one task per batch of shards (``sharding.shard_size`` photos), show progress
    (terminal + Prefect artifact), drop shard files no longer planned, and return the
    stage summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out_dir, ".shard-*.tmp")  # left by a killed run
    start = time.perf_counter()
    progress_id = create_progress_artifact(0.0, key=f"{stage}-progress",
                                           description=f"{stage}: shards done (%)")
    futures = [submit(batch) for batch in batch_shards(shards, sharding.shard_size)]
    results = []
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        tid = bar.add_task(f"{stage} shards", total=len(shards))
        for future in as_completed(futures):
            batch = future.result()
            results.extend(batch)
            bar.advance(tid, len(batch))
            update_progress_artifact(progress_id, 100.0 * len(results) / max(1, len(shards)))
    removed = remove_stale_shards(out_dir, shards)
    counts: dict[str, int] = {}
    for r in results:
        for status, n in r["status_counts"].items():
            counts[status] = counts.get(status, 0) + n
    reused = sum(r["reused"] for r in results)
    summary = {
        "stage": stage, "rows_in": sum(len(s.paths) for s in shards),
        "rows_out": sum(r["rows"] for r in results),
        "seconds": round(time.perf_counter() - start, 2),
        "shards": len(shards), "shards_reused": reused, "shards_computed": len(shards) - reused,
        "tasks": len(futures), "stale_shards_removed": removed, "status_counts": counts,
        "rows_retried": sum(r.get("retried", 0) for r in results),
        "reused": reused == len(shards),
        "ran_on": sorted({r["ran_on"] for r in results if not r["reused"]}),
    }
    create_table_artifact(
        key=f"{stage}-status-counts",
        table=[{"status": k, "rows": v} for k, v in sorted(counts.items())],
        description=f"{stage}: rows by status ({len(shards)} shards, {reused} reused)",
    )
    logger = get_run_logger()
    if summary["reused"]:
        logger.info("%s: cached, all %d shards are up to date (%d rows: %s)", stage,
                    len(shards), summary["rows_out"], counts)
    else:
        logger.info("%s: %d rows in %d shards (%d computed, %d reused) in %.1fs: %s", stage,
                    summary["rows_out"], len(shards), len(shards) - reused, reused,
                    summary["seconds"], counts)
    return summary


@flow(name="detect")
def detect_flow(config: PipelineConfig) -> dict:
    """Detect faces in every manifest image, one task run per shard, in worker processes."""
    paths = stage_paths(config.out, config.experiment)
    _require_inputs(config, "detect")
    shards = detect_shards(config)
    summary = _run_shards("detect", paths["detections"], shards, config.sharding, lambda b: (
        detect_shards_task.submit(config.data.root, b, config.detector, paths["detections"],
                                  config.sharding.opencv_threads)))
    summary.update(workers=config.sharding.workers, dask_address=config.sharding.dask_address)
    failed = summary["status_counts"].get("error", 0) + summary["status_counts"].get(
        "unreadable", 0)
    examples: dict[str, list[str]] = {}
    errors = detection_errors(config, shards, examples) if failed else {}
    if errors:  # why, per kind, with example paths (the counts alone say nothing)
        summary.update(errors=errors, error_examples=examples)
        for status, by_reason in sorted(errors.items()):
            get_run_logger().warning(
                "detect: %d photo(s) %s: %s", sum(by_reason.values()),
                "could not be used (not a usable image)" if status == "error" else
                "could not be read this time (the next run retries them)",
                "; ".join(f"{reason} {n} (e.g. {', '.join(examples[reason])})"
                          for reason, n in sorted(by_reason.items())))
    return _record(config, summary)


@flow(name="crops")
def crops_flow(config: PipelineConfig) -> dict:
    """Cut every labelled face once into the crop cache, one task run per shard."""
    paths = stage_paths(config.out, config.experiment)
    _require_inputs(config, "crops")
    plan = crop_plan(config)
    summary = _run_shards("crops", paths["crops"], plan.shards, config.sharding, lambda b: (
        crop_shards_task.submit(config.data.root, b, [plan.shard_faces(s) for s in b],
                                config.crops, config.detector.margin, paths["crops"],
                                config.sharding.opencv_threads)))
    summary.update(workers=config.sharding.workers, dask_address=config.sharding.dask_address)
    unaligned = summary["status_counts"].get("unaligned", 0)
    if unaligned:
        get_run_logger().warning(
            "crops: %d faces have no landmarks (detector.kind %s finds none): cut as box "
            "crops; set detector.kind: yunet to align them", unaligned, config.detector.kind)
    return _record(config, summary)


@task(name="merge", cache_policy=NO_CACHE)
def merge_task(config: PipelineConfig):
    """Join ok detections with the subject labels into ``faces.parquet``."""
    paths = stage_paths(config.out, config.experiment)
    _require_inputs(config, "merge")
    shards = detect_shards(config)
    key = merge_key(config, shards)
    if read_cache_key(paths["faces"]) == key:
        return _reused(config, "merge", key, "detections and labels are unchanged")
    start = time.perf_counter()
    manifest = pq.read_table(paths["manifest"]).to_pandas()
    missing = [s.filename for s in shards if not (paths["detections"] / s.filename).exists()]
    if missing:  # (a --stages merge run after subjects were added)
        raise MissingInputError(
            f"merge: {len(missing)} planned detection shard(s) not on disk (e.g. "
            f"{paths['detections'] / missing[0]}): run with --stages detect,merge")
    # only the planned shards: files of an earlier plan are never merged
    detections = pads.dataset([str(paths["detections"] / s.filename) for s in shards],
                              schema=DETECTIONS_SCHEMA, format="parquet"
                              ).to_table().to_pandas()
    labels = None
    if config.data.layout == "kface":
        if config.data.metadata is None:
            raise LabelsError("the merge stage needs the K-Face metadata CSV: --metadata FILE "
                              "(data.metadata)")
        labels = read_metadata(config.data.metadata)
    table, report = merge_faces(manifest, detections, labels)
    write_parquet_atomic(paths["faces"], table, key)
    summary = {"stage": "merge", "rows_in": len(detections), "rows_out": table.num_rows,
               "seconds": round(time.perf_counter() - start, 2), "reused": False,
               "cache_key": key, **report}
    _record(config, summary)
    logger = get_run_logger()
    logger.info("merge: %d faces of %d subjects from %d detections; per class %s",
                table.num_rows, report["subjects"], len(detections),
                report["joint_class_counts"])
    if report.get("subjects_without_labels"):
        logger.warning("merge: %d subjects have images but no metadata row (excluded): %s",
                       report["subjects_without_labels"],
                       report["subjects_without_labels_list"][:10])
    return summary


@task(name="split", cache_policy=NO_CACHE)
def split_task(config: PipelineConfig):
    """Assign faces to train/val into ``split.parquet``."""
    paths = stage_paths(config.out, config.experiment)
    _require_inputs(config, "split")
    key = split_key(config)
    if read_cache_key(paths["split"]) == key:
        return _reused(config, "split", key, "faces and split settings are unchanged")
    start = time.perf_counter()
    faces = pq.read_table(paths["faces"]).to_pandas()
    if faces.empty:
        raise SplitError(_no_faces_message(config))
    table, report = split_faces(faces, config.split)
    write_parquet_atomic(paths["split"], pa.Table.from_pandas(table, preserve_index=False), key)
    summary = {"stage": "split", "rows_in": len(faces), "rows_out": len(table),
               "seconds": round(time.perf_counter() - start, 2), "reused": False,
               "cache_key": key, **report}
    _record(config, summary)
    logger = get_run_logger()
    logger.info("split (%s): %s rows, subjects %s", config.split.strategy, report["rows"],
                report["subjects"])
    if report.get("warning"):
        logger.warning("split: %s", report["warning"])
    return summary


def _no_faces_message(config: PipelineConfig) -> str:
    """Why no face reached the split, from the detect and merge summaries' counts."""
    detect = stored_summary(config, "detect") or {}
    merge = stored_summary(config, "merge") or {}
    counts = detect.get("status_counts", {})
    problems = "; ".join(f"{reason} {n}" for by_reason in detect.get("errors", {}).values()
                         for reason, n in sorted(by_reason.items()))
    return (f"no faces to split: of {detect.get('rows_in', 0)} photos, detection found a face "
            f"in {counts.get('ok', 0)}, none in {counts.get('no_face', 0)}, and "
            f"{counts.get('error', 0) + counts.get('unreadable', 0)} could not be used"
            + (f" ({problems}; examples in {summary_path(config, 'detect')})" if problems
               else "")
            + f"; {merge.get('faces', 0)} of the faces have labels"
            + (" (check that the labels' subject IDs match the photos)"
               if counts.get("ok") and not merge.get("faces") else ""))


@task(name="train", cache_policy=NO_CACHE)
def train_task(config: PipelineConfig):
    """Train the classifier from the crop cache; skipped when its inputs are unchanged."""
    paths = stage_paths(config.out, config.experiment)
    _require_inputs(config, "train")
    from tasks.crop_stream import load_index
    from tasks.train import train_model

    crop_shards = crop_plan(config).shards
    key = train_key(config, crop_shards)
    model_dir = paths["model"]
    if (model_dir / "model.keras").exists() and (
            (stored_summary(config, "train") or {}).get("cache_key") == key):
        return _reused(config, "train", key, "the model is up to date")
    # train beside the current model; it is replaced only once the new one is complete,
    # and a killed training of the same settings resumes from its own folder
    work = paths["experiment"] / f".training-{key[:16]}"
    for other in paths["experiment"].glob(".training-*"):
        if other != work:
            shutil.rmtree(other)  # an unfinished training of other settings
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    crops = load_index(crop_files(config, crop_shards), paths["faces"], paths["split"])
    crop_spec = {"margin": config.detector.margin, "margin_mode": config.detector.margin_mode,
                 "detector": config.detector.kind,
                 "align": config.crops.align and config.detector.kind == "yunet"}
    result = train_model(crops, config.crops.size, config.model, config.train, work,
                         paths["logs"], crop_spec)
    write_bytes_atomic(paths["experiment_config"], dump_config(config).encode())
    replace_folder(work, model_dir)
    summary = {"stage": "train",
               "rows_in": result["train_examples"] + result["val_examples"],
               "rows_out": result["train_examples"],
               "seconds": round(time.perf_counter() - start, 2), "reused": False,
               "cache_key": key, **result}
    _record(config, summary)
    get_run_logger().info("train: %d epochs in %.0fs; best epoch %d: val gender %.3f, "
                          "val age band %.3f", result["epochs_run"], summary["seconds"],
                          result["best_epoch"], result["val_gender_accuracy"],
                          result["val_age_band_accuracy"])
    return summary


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: PipelineConfig):
    """Score the model on the test split (validation apart) and write ``reports/``."""
    from models.classifier import load_classifier
    from tasks.crop_stream import load_index
    from tasks.evaluate import evaluation_metrics, write_report
    from tasks.train import load_history

    paths = stage_paths(config.out, config.experiment)
    _require_inputs(config, "evaluate")
    key = evaluate_key((stored_summary(config, "train") or {}).get("cache_key"))
    if (paths["reports"] / "report.md").exists() and (
            (stored_summary(config, "evaluate") or {}).get("cache_key") == key):
        return _reused(config, "evaluate", key, "the report is up to date")
    start = time.perf_counter()
    crops = load_index(crop_files(config), paths["faces"], paths["split"])
    model = load_classifier(paths["model"] / "model.keras")
    labels = json.loads((paths["model"] / "labels.json").read_text())
    metrics = evaluation_metrics(model, crops, config.crops.size,
                                 synthetic_labels=labels_are_synthetic(config),
                                 temperature=labels.get("temperature"))
    stages = paths["stages"]
    report_path = write_report(metrics, load_history(paths["model"]),
                               json.loads((stages / "split.json").read_text()),
                               json.loads((stages / "merge.json").read_text()),
                               paths["reports"])
    scored = metrics["scored_split"]
    summary = {"stage": "evaluate", "rows_in": metrics["examples"],
               "rows_out": metrics["examples"],
               "seconds": round(time.perf_counter() - start, 2), "reused": False,
               "cache_key": key, "report": str(report_path), "scored_split": scored,
               f"{scored}_gender_accuracy": metrics["gender"]["accuracy"],
               f"{scored}_age_band_accuracy": metrics["age_band"]["accuracy"],
               f"{scored}_age_band_within_one": metrics["age_band"]["accuracy_within_one_band"],
               "warnings": metrics["warnings"]}
    _record(config, summary)
    create_markdown_artifact(key="kface-report", markdown=report_path.read_text(),
                             description="Evaluation report")
    create_table_artifact(key="kface-metrics", table=[
        {"head": h, "split": scored, "accuracy": metrics[h]["accuracy"],
         "ci95": metrics[h]["ci95"]["accuracy"], "macro_f1": metrics[h]["macro_f1"],
         "majority_baseline": metrics[h]["baselines"]["majority_class"]["accuracy"]}
        for h in ("gender", "age_band")], description=f"Metrics on the {scored} split")
    logger = get_run_logger()
    for warning in metrics["warnings"]:
        logger.warning("evaluate: %s", warning)
    g, a = metrics["gender"], metrics["age_band"]
    logger.info("evaluate (%s, %d subjects): gender %.3f [%.3f-%.3f], age band %.3f "
                "[%.3f-%.3f] (majority class %.3f), within one band %.3f; report %s", scored,
                metrics["subjects"], g["accuracy"], *g["ci95"]["accuracy"], a["accuracy"],
                *a["ci95"]["accuracy"], a["baselines"]["majority_class"]["accuracy"],
                a["accuracy_within_one_band"], report_path)
    return summary


def labels_are_synthetic(config: PipelineConfig) -> bool:
    """Whether the sample generator marked this dataset's labels as made up."""
    from tasks.sample_data import SYNTHETIC_MARKER

    folders = {Path(config.data.root)}
    for label_file in (config.data.metadata, config.data.labels):
        if label_file:
            folders.add(Path(label_file).parent)
    return any((folder / SYNTHETIC_MARKER).exists() for folder in folders)


@flow(name="kface-pipeline")
def kface_pipeline(config: PipelineConfig, stages: list[str] | None = None,
                   allow_stale: bool = False) -> dict:
    """Run the requested stages (default: all) in order; returns each stage's summary.
    A subset of stages whose inputs are stale is refused unless ``allow_stale``."""
    stages = check_stage_names(stages or list(STAGES))
    from prefect.runtime import flow_run

    with folder_lock(config.out, f"flow run {flow_run.get_name()}"):
        if not allow_stale:
            check_inputs_current(config, stages)
        summaries = _run_stages(config, stages)
    create_markdown_artifact(
        key="kface-pipeline-summary",
        markdown=_summary_markdown(summaries),
        description="Stage summaries of this run",
    )
    return summaries


def _run_stages(config: PipelineConfig, stages: list[str]) -> dict[str, dict]:
    write_bytes_atomic(stage_paths(config.out)["config"], dump_config(config).encode())

    def sharded(subflow):
        return lambda: subflow.with_options(task_runner=shard_runner(config.sharding))(config)

    run = {"select": lambda: _unwrap(select_task(config)), "detect": sharded(detect_flow),
           "merge": lambda: _unwrap(merge_task(config)),
           "split": lambda: _unwrap(split_task(config)), "crops": sharded(crops_flow),
           "train": lambda: _unwrap(train_task(config)),
           "evaluate": lambda: _unwrap(evaluate_task(config))}
    return {stage: run[stage]() for stage in STAGES if stage in stages}


def _unwrap(value):
    """A task called inline returns the State it chose (e.g. Cached) as is: take its data."""
    return value.result() if isinstance(value, State) else value


def _summary_markdown(summaries: dict[str, dict]) -> str:
    lines = ["| stage | rows in | rows out | seconds | reused |", "|---|---|---|---|---|"]
    for name, s in summaries.items():
        reused = s.get("shards_reused", s.get("reused"))
        lines.append(f"| {name} | {s['rows_in']} | {s['rows_out']} | {s['seconds']} | {reused} |")
    return "\n".join(lines)
