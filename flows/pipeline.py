"""The ``kface-pipeline`` Prefect flow: wiring only; the work lives in ``tasks/``.

Stage outputs (all under ``config.out``):
``manifest.parquet`` + ``stages/select.json`` (select), ``detections/shard-*.parquet`` +
``stages/detect.json`` (detect). Each ``stages/<stage>.json`` is the stage summary: rows
in/out, seconds, how much was reused.
"""

from __future__ import annotations

import time
from pathlib import Path

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
from prefect.states import Completed
from prefect.task_runners import ProcessPoolTaskRunner
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from flows.config import PipelineConfig, dump_config
from models.detector import DetectorConfig
from tasks.detect import Shard, detect_shard, plan_shards, remove_stale_shards
from tasks.select import select_images
from tasks.storage import write_bytes_atomic, write_json_atomic, write_parquet_atomic

STAGES = ("select", "detect")


class MissingInputError(RuntimeError):
    """A requested stage's input file does not exist (its upstream stage has not run)."""


def stage_paths(out: Path) -> dict[str, Path]:
    """The one place that says where each stage's output lives in a run folder."""
    out = Path(out)
    return {
        "config": out / "config.yaml",
        "manifest": out / "manifest.parquet",
        "detections": out / "detections",
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
    summary = detect_shard(root, shard, detector, out_dir, opencv_threads)
    if summary["reused"]:
        return Completed(data=summary, name="Cached",
                         message=f"{shard.filename} already complete (cache key matches)")
    return summary


@flow(name="detect")
def detect_flow(config: PipelineConfig) -> dict:
    """Detect faces in every manifest image, one task run per shard, in worker processes."""
    logger = get_run_logger()
    paths = stage_paths(config.out)
    _require(paths["manifest"], "detect", "select")
    start = time.perf_counter()
    manifest = pq.read_table(paths["manifest"], columns=["path", "file_size", "mtime_ns"])
    shards = plan_shards(manifest, config.sharding.shard_size)
    out_dir = paths["detections"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.glob(".shard-*.tmp"):  # left by a killed run; never a final file
        tmp.unlink(missing_ok=True)
    progress_id = create_progress_artifact(0.0, key="detect-progress",
                                           description="Detection shards done (%)")
    futures = [
        detect_shard_task.submit(config.data.root, shard, config.detector, out_dir,
                                 config.sharding.opencv_threads)
        for shard in shards
    ]
    results = []
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        tid = bar.add_task("detect shards", total=len(futures))
        for future in as_completed(futures):
            results.append(future.result())
            bar.advance(tid)
            update_progress_artifact(progress_id, 100.0 * len(results) / len(futures))
    results.sort(key=lambda r: r["shard"])
    removed = remove_stale_shards(out_dir, shards)
    counts: dict[str, int] = {}
    for r in results:
        for status, n in r["status_counts"].items():
            counts[status] = counts.get(status, 0) + n
    reused = sum(r["reused"] for r in results)
    summary = {
        "stage": "detect", "rows_in": manifest.num_rows,
        "rows_out": sum(r["rows"] for r in results),
        "seconds": round(time.perf_counter() - start, 2),
        "shards": len(shards), "shards_reused": reused, "shards_computed": len(shards) - reused,
        "stale_shards_removed": removed, "status_counts": counts,
        "workers": config.sharding.workers,
    }
    write_json_atomic(paths["stages"] / "detect.json", summary)
    create_table_artifact(
        key="detect-status-counts",
        table=[{"status": k, "images": v} for k, v in sorted(counts.items())],
        description=f"Detection results by status ({len(shards)} shards, {reused} reused)",
    )
    logger.info("detect: %d images in %d shards (%d computed, %d reused) in %.1fs: %s",
                summary["rows_out"], len(shards), len(shards) - reused, reused,
                summary["seconds"], counts)
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
    if "detect" in stages:
        runner = ProcessPoolTaskRunner(max_workers=config.sharding.workers)
        summaries["detect"] = detect_flow.with_options(task_runner=runner)(config)
    create_markdown_artifact(
        key="kface-pipeline-summary",
        markdown=_summary_markdown(summaries),
        description="Stage summaries of this run",
    )
    return summaries


def _summary_markdown(summaries: dict[str, dict]) -> str:
    lines = ["| stage | rows in | rows out | seconds | reused |", "|---|---|---|---|---|"]
    for name, s in summaries.items():
        reused = s.get("shards_reused", s.get("reused"))
        lines.append(f"| {name} | {s['rows_in']} | {s['rows_out']} | {s['seconds']} | {reused} |")
    return "\n".join(lines)
