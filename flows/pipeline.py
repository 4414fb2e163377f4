"""The ``kface-pipeline`` Prefect flow: wiring only; the work lives in ``tasks/``.

Stage outputs (all under ``config.out``; ``stage_paths`` is the one list):
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
from prefect.task_runners import ProcessPoolTaskRunner
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from flows.config import PipelineConfig, dump_config
from models.detector import DetectorConfig
from tasks.crops import CropConfig, crop_shard
from tasks.detect import Shard, detect_shard, plan_shards, remove_stale_shards
from tasks.labels import LabelsError, merge_faces, read_metadata
from tasks.select import select_images
from tasks.split import split_faces
from tasks.storage import (
    file_sha256,
    fingerprint,
    read_cache_key,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from tasks.train import CODE_VERSION as TRAIN_CODE_VERSION

STAGES = ("select", "detect", "merge", "split", "crops", "train", "evaluate")


class MissingInputError(RuntimeError):
    """A requested stage's input file does not exist (its upstream stage has not run)."""


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


def _require(path: Path, stage: str, producer: str) -> None:
    if not path.exists():
        raise MissingInputError(
            f"stage '{stage}' needs {path}, which stage '{producer}' writes: "
            f"run with --stages {producer},{stage} (or without --stages)"
        )


@task(name="select", cache_policy=NO_CACHE)
def select_task(config: PipelineConfig) -> dict:
    """Scan the dataset and write ``manifest.parquet``."""
    logger = get_run_logger()
    start = time.perf_counter()
    table, report = select_images(config.data, config.selection)
    paths = stage_paths(config.out)
    write_parquet_atomic(paths["manifest"], table)
    summary = {
        "stage": "select", "rows_in": report.images, "rows_out": table.num_rows,
        "seconds": round(time.perf_counter() - start, 2), "reused": False,
        "subjects": len(set(table.column("subject_id").to_pylist())),
        **report.as_dict(),
    }
    write_json_atomic(paths["stages"] / "select.json", summary)
    logger.info(
        "select: %d of %d images selected (%d subjects) in %.1fs; %d files not in the "
        "layout%s", table.num_rows, report.images, summary["subjects"], summary["seconds"],
        report.unrecognised,
        f", e.g. {report.unrecognised_examples[:3]}" if report.unrecognised else "",
    )
    if report.excluded_labels:
        logger.warning("select: %d labelled images excluded: %s", report.excluded_labels,
                       report.excluded_label_examples[:5])
    return summary


@task(name="detect-shard", cache_policy=NO_CACHE, retries=1)
def detect_shard_task(root: Path, shard: Shard, detector: DetectorConfig, out_dir: Path,
                      opencv_threads: int):
    """Thin wrapper: detect one shard; a shard already on disk comes back as Cached."""
    return _shard_state(detect_shard(root, shard, detector, out_dir, opencv_threads), shard)


@task(name="crop-shard", cache_policy=NO_CACHE, retries=1)
def crop_shard_task(root: Path, shard: Shard, boxes: list, crops: CropConfig, out_dir: Path,
                    opencv_threads: int):
    """Thin wrapper: crop one shard of faces into the crop cache."""
    return _shard_state(crop_shard(root, shard, boxes, crops, out_dir, opencv_threads), shard)


def _shard_state(summary: dict, shard: Shard):
    if summary["reused"]:
        return Completed(data=summary, name="Cached",
                         message=f"{shard.filename} already complete (cache key matches)")
    return summary


def _run_shards(stage: str, out_dir: Path, shards: list[Shard], submit) -> dict:
    """Submit one task per shard, show progress (terminal + Prefect artifact), drop stale
    shard files, and return the stage summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.glob(".shard-*.tmp"):  # left by a killed run; never a final file
        tmp.unlink(missing_ok=True)
    start = time.perf_counter()
    progress_id = create_progress_artifact(0.0, key=f"{stage}-progress",
                                           description=f"{stage}: shards done (%)")
    futures = [submit(shard) for shard in shards]
    results = []
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        tid = bar.add_task(f"{stage} shards", total=len(futures))
        for future in as_completed(futures):
            results.append(future.result())
            bar.advance(tid)
            update_progress_artifact(progress_id, 100.0 * len(results) / len(futures))
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
        "stale_shards_removed": removed, "status_counts": counts,
    }
    create_table_artifact(
        key=f"{stage}-status-counts",
        table=[{"status": k, "rows": v} for k, v in sorted(counts.items())],
        description=f"{stage}: rows by status ({len(shards)} shards, {reused} reused)",
    )
    get_run_logger().info("%s: %d rows in %d shards (%d computed, %d reused) in %.1fs: %s",
                          stage, summary["rows_out"], len(shards), len(shards) - reused,
                          reused, summary["seconds"], counts)
    return summary


@flow(name="detect")
def detect_flow(config: PipelineConfig) -> dict:
    """Detect faces in every manifest image, one task run per shard, in worker processes."""
    paths = stage_paths(config.out)
    _require(paths["manifest"], "detect", "select")
    manifest = pq.read_table(paths["manifest"], columns=["path", "file_size", "mtime_ns"])
    shards = plan_shards(manifest, config.sharding.shard_size)
    summary = _run_shards("detect", paths["detections"], shards, lambda shard: (
        detect_shard_task.submit(config.data.root, shard, config.detector,
                                 paths["detections"], config.sharding.opencv_threads)))
    summary["workers"] = config.sharding.workers
    write_json_atomic(paths["stages"] / "detect.json", summary)
    return summary


@flow(name="crops")
def crops_flow(config: PipelineConfig) -> dict:
    """Cut every labelled face once into the crop cache, one task run per shard."""
    paths = stage_paths(config.out)
    _require(paths["faces"], "crops", "merge")
    table = pq.read_table(paths["faces"])
    faces = table.to_pandas()
    boxes = dict(zip(faces.path, faces[["left", "top", "right", "bottom"]].to_numpy().tolist(),
                     strict=True))
    shards = plan_shards(table, config.sharding.shard_size)
    summary = _run_shards("crops", paths["crops"], shards, lambda shard: (
        crop_shard_task.submit(config.data.root, shard, [boxes[p] for p in shard.paths],
                               config.crops, paths["crops"], config.sharding.opencv_threads)))
    summary["workers"] = config.sharding.workers
    write_json_atomic(paths["stages"] / "crops.json", summary)
    return summary


@task(name="merge", cache_policy=NO_CACHE)
def merge_task(config: PipelineConfig) -> dict:
    """Join ok detections with the subject labels into ``faces.parquet``."""
    paths = stage_paths(config.out)
    _require(paths["manifest"], "merge", "select")
    _require(paths["detections"], "merge", "detect")
    start = time.perf_counter()
    manifest = pq.read_table(paths["manifest"]).to_pandas()
    detections = pads.dataset(paths["detections"], format="parquet").to_table().to_pandas()
    labels = None
    if config.data.layout == "kface":
        if config.data.metadata is None:
            raise LabelsError("the merge stage needs the K-Face metadata CSV: --metadata FILE "
                              "(data.metadata)")
        labels = read_metadata(config.data.metadata)
    table, report = merge_faces(manifest, detections, labels)
    write_parquet_atomic(paths["faces"], table)
    summary = {"stage": "merge", "rows_in": len(detections), "rows_out": table.num_rows,
               "seconds": round(time.perf_counter() - start, 2), "reused": False, **report}
    write_json_atomic(paths["stages"] / "merge.json", summary)
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
def split_task(config: PipelineConfig) -> dict:
    """Assign faces to train/val into ``split.parquet``."""
    paths = stage_paths(config.out)
    _require(paths["faces"], "split", "merge")
    start = time.perf_counter()
    faces = pq.read_table(paths["faces"]).to_pandas()
    table, report = split_faces(faces, config.split)
    write_parquet_atomic(paths["split"], pa.Table.from_pandas(table, preserve_index=False))
    summary = {"stage": "split", "rows_in": len(faces), "rows_out": len(table),
               "seconds": round(time.perf_counter() - start, 2), "reused": False, **report}
    write_json_atomic(paths["stages"] / "split.json", summary)
    logger = get_run_logger()
    logger.info("split (%s): %s rows, subjects %s", config.split.strategy, report["rows"],
                report["subjects"])
    if report.get("warning"):
        logger.warning("split: %s", report["warning"])
    return summary


def _train_key(config: PipelineConfig) -> str:
    paths = stage_paths(config.out)
    crop_keys = [read_cache_key(p) for p in sorted(paths["crops"].glob("shard-*.parquet"))]
    return fingerprint(crop_keys, file_sha256(paths["faces"]), file_sha256(paths["split"]),
                       config.crops.model_dump(), config.model.model_dump(),
                       config.train.model_dump(), TRAIN_CODE_VERSION)


def _cached_summary(stages_dir: Path, stage: str, key: str) -> dict | None:
    path = stages_dir / f"{stage}.json"
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("cache_key") == key:
            return summary
    return None


@task(name="train", cache_policy=NO_CACHE)
def train_task(config: PipelineConfig):
    """Train the classifier from the crop cache; skipped when its inputs are unchanged."""
    paths = stage_paths(config.out)
    for need, producer in (("crops", "crops"), ("split", "split"), ("faces", "merge")):
        _require(paths[need], "train", producer)
    from tasks.train import load_examples, train_model

    key = _train_key(config)
    model_dir = paths["model"]
    if (model_dir / "model.keras").exists() and (
            cached := _cached_summary(paths["stages"], "train", key)):
        return Completed(data=cached, name="Cached", message="model is up to date")
    marker = model_dir / ".train_key"
    if model_dir.exists() and (not marker.exists() or marker.read_text() != key):
        shutil.rmtree(model_dir)  # a different training's leftovers: never resume those
    model_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)
    start = time.perf_counter()
    examples = load_examples(paths["crops"], paths["faces"], paths["split"])
    crop_spec = {"margin": config.detector.margin, "margin_mode": config.detector.margin_mode}
    result = train_model(examples, config.crops.size, config.model, config.train, model_dir,
                         paths["logs"], crop_spec)
    summary = {"stage": "train",
               "rows_in": result["train_examples"] + result["val_examples"],
               "rows_out": result["train_examples"],
               "seconds": round(time.perf_counter() - start, 2), "reused": False,
               "cache_key": key, **result}
    write_json_atomic(paths["stages"] / "train.json", summary)
    get_run_logger().info("train: %d epochs in %.0fs; best epoch %d: val gender %.3f, "
                          "val age band %.3f", result["epochs_run"], summary["seconds"],
                          result["best_epoch"], result["val_gender_accuracy"],
                          result["val_age_band_accuracy"])
    return summary


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: PipelineConfig):
    """Evaluate the model on the validation split and write ``reports/``."""
    from models.classifier import load_classifier
    from tasks.evaluate import CODE_VERSION as EVAL_CODE_VERSION
    from tasks.evaluate import compute_metrics, predict_frame, write_report
    from tasks.train import load_examples, load_history

    paths = stage_paths(config.out)
    _require(paths["model"] / "model.keras", "evaluate", "train")
    train_summary = json.loads((paths["stages"] / "train.json").read_text())
    key = fingerprint(train_summary.get("cache_key"), EVAL_CODE_VERSION)
    if (paths["reports"] / "report.md").exists() and (
            cached := _cached_summary(paths["stages"], "evaluate", key)):
        return Completed(data=cached, name="Cached", message="report is up to date")
    start = time.perf_counter()
    val = load_examples(paths["crops"], paths["faces"], paths["split"])["val"]
    model = load_classifier(paths["model"] / "model.keras")
    probs = predict_frame(model, val, config.crops.size)
    metrics = compute_metrics(val, probs)
    stages = paths["stages"]
    report_path = write_report(metrics, load_history(paths["model"]),
                               json.loads((stages / "split.json").read_text()),
                               json.loads((stages / "merge.json").read_text()),
                               paths["reports"])
    summary = {"stage": "evaluate", "rows_in": len(val), "rows_out": len(val),
               "seconds": round(time.perf_counter() - start, 2), "reused": False,
               "cache_key": key, "report": str(report_path),
               "val_gender_accuracy": metrics["gender"]["accuracy"],
               "val_age_band_accuracy": metrics["age_band"]["accuracy"],
               "val_age_band_within_one": metrics["age_band"]["accuracy_within_one_band"]}
    write_json_atomic(stages / "evaluate.json", summary)
    create_markdown_artifact(key="kface-report", markdown=report_path.read_text(),
                             description="Evaluation report")
    create_table_artifact(key="kface-metrics", table=[
        {"head": h, "accuracy": metrics[h]["accuracy"], "macro_f1": metrics[h]["macro_f1"]}
        for h in ("gender", "age_band")], description="Validation metrics")
    get_run_logger().info("evaluate: val gender %.3f, age band %.3f (within one band %.3f); "
                          "report %s", summary["val_gender_accuracy"],
                          summary["val_age_band_accuracy"],
                          summary["val_age_band_within_one"], report_path)
    return summary


@flow(name="kface-pipeline")
def kface_pipeline(config: PipelineConfig, stages: list[str] | None = None) -> dict:
    """Run the requested stages (default: all) in order; returns each stage's summary."""
    stages = list(stages or STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    paths = stage_paths(config.out)
    write_bytes_atomic(paths["config"], dump_config(config).encode())
    summaries: dict[str, dict] = {}
    if "select" in stages:
        summaries["select"] = select_task(config)
    runner = ProcessPoolTaskRunner(max_workers=config.sharding.workers)
    if "detect" in stages:
        summaries["detect"] = detect_flow.with_options(task_runner=runner)(config)
    if "merge" in stages:
        summaries["merge"] = merge_task(config)
    if "split" in stages:
        summaries["split"] = split_task(config)
    if "crops" in stages:
        summaries["crops"] = crops_flow.with_options(task_runner=runner.duplicate())(config)
    if "train" in stages:
        summaries["train"] = _unwrap(train_task(config))
    if "evaluate" in stages:
        summaries["evaluate"] = _unwrap(evaluate_task(config))
    create_markdown_artifact(
        key="kface-pipeline-summary",
        markdown=_summary_markdown(summaries),
        description="Stage summaries of this run",
    )
    return summaries


def _unwrap(value):
    """A task called inline returns the State it chose (e.g. Cached) as is: take its data."""
    return value.result() if isinstance(value, State) else value


def _summary_markdown(summaries: dict[str, dict]) -> str:
    lines = ["| stage | rows in | rows out | seconds | reused |", "|---|---|---|---|---|"]
    for name, s in summaries.items():
        reused = s.get("shards_reused", s.get("reused"))
        lines.append(f"| {name} | {s['rows_in']} | {s['rows_out']} | {s['seconds']} | {reused} |")
    return "\n".join(lines)
