"""The ``kface-pipeline`` Prefect flow: wiring only. What the stages are lives in their
rows (``flows/stages/``, one module each, on ``flows.machinery``), where their outputs
live in ``core.run_folder``, the work in ``tasks/``.

Every stage goes through one of two wrappers: ``stage_task`` (one output: compare the
stored key with the expected one, reuse or compute, record) and ``run_sharded_stage``
(read every shard's key first, start workers only for the shards that need work). Each
``stages/<stage>.json`` is the stage summary: rows in/out, seconds, what was reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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

from core.sharding import ShardPlan, batch_shards, shard_runner, tidy_shards
from core.storage import folder_lock, write_bytes_atomic, write_json_atomic
from flows.config import PipelineConfig, RecordingsConfig, dump_config
from flows.machinery import (
    BaseStage,
    MissingInputError,
    ShardedStage,
    StageConfig,
    pipeline_named,
    work_seconds,
)
from flows.preflight import check_inputs_current, check_stage_names, missing_input
from flows.stages import STAGE, STAGES, TRAINING

__all__ = ["STAGES", "MissingInputError", "kface_pipeline", "kface_recordings"]


def _require_inputs(config: PipelineConfig, stage: str) -> None:
    problem = missing_input(config, stage)
    if problem:
        raise MissingInputError(problem)


def _row(name: str, pipeline: str) -> ShardedStage:
    import flows.recordings  # noqa: F401  (its table: the pipelines are looked up by name)

    return pipeline_named(pipeline).stage[name]


def _record(stage: BaseStage, c: StageConfig, summary: dict) -> dict:
    """Write ``stages/<stage>.json`` and the stage's summary table artifact."""
    write_json_atomic(stage.summary_file(c.folder), summary)
    create_table_artifact(
        key=f"{stage.name}-summary",
        table=[{"stage": stage.name, "rows_in": summary["rows_in"],
                "rows_out": summary["rows_out"], "seconds": summary["seconds"],
                "cached": summary["reused"]}],
        description=f"{stage.name}: rows in/out, time, cached or not",
    )
    return summary


@task(name="stage", cache_policy=NO_CACHE)
def stage_task(name: str, config: PipelineConfig):
    """One single-output stage: reuse its output when it holds the expected key, else
    compute it (the stage's ``run``) and record the summary."""
    stage = STAGE[name]
    _require_inputs(config, name)
    c = StageConfig(config, stage)
    key = stage.key(c)
    base = {"base_key": stage.base_key(c)} if stage.partial_settings else {}
    stored = stage.stored_summary(c.folder)
    work = work_seconds(stored)  # (``seconds`` is this run's: kface experiments' time)
    if stage.stored_key(c.folder) == key:
        summary = {**(stored or {"rows_in": 0, "rows_out": 0}), "stage": name,
                   "reused": True, "seconds": 0.0, "cache_key": key, "work_seconds": work,
                   **base}
        _record(stage, c, summary)
        get_run_logger().info("%s: cached, its inputs, settings and code are unchanged "
                              "(%d rows)", name, summary["rows_out"])
        return Completed(data=summary, name="Cached", message=f"{name} is up to date")
    start = time.perf_counter()
    if stage.runs_partly(c):  # only its partial settings changed: the work is kept
        summary = {**stored, "stage": name, **stage.partial_run(c, key)}
    else:
        summary = {"stage": name, **stage.run(c, key)}
        work = None
    seconds = round(time.perf_counter() - start, 2)
    summary.update(seconds=seconds, work_seconds=seconds if work is None else work,
                   reused=False, cache_key=key, **base)
    return _record(stage, c, summary)


@task(name="shards", cache_policy=NO_CACHE, retries=1)
def shards_task(calls: list[tuple[Callable, tuple]]) -> list[dict]:
    """Thin wrapper: one batch of a sharded stage's shard calls, in a worker."""
    return [work(*args) for work, args in calls]


@flow(name="shards")
def shards_flow(name: str, config: PipelineConfig | RecordingsConfig,
                pipeline: str = TRAINING.name) -> dict:
    """The shards of one stage that need work, one task per batch, in worker processes
    (the run's task runner); the others are only read."""
    stage = _row(name, pipeline)
    c = StageConfig(config, stage)
    return _shard_summary(stage, c, stage.plan(c))


def run_sharded_stage(name: str, config: PipelineConfig | RecordingsConfig,
                      pipeline: str = TRAINING.name) -> dict:
    """A sharded stage (of the pipeline called ``pipeline``): read every shard's stored
    key first; only when some shard needs work are workers started (``shards_flow``),
    and only for those shards. An unchanged rerun costs what ``kface status`` costs."""
    stage = _row(name, pipeline)
    if stage.reads:
        _require_inputs(config, name)
    c = StageConfig(config, stage)
    plan = stage.plan(c)
    if not plan.todo:
        summary = _shard_summary(stage, c, plan)
    else:
        runner = shard_runner(config.sharding)
        summary = shards_flow.with_options(name=name, flow_run_name=f"{name}-shards",
                                           task_runner=runner)(name, config, pipeline)
    return _record(stage, c, summary)


def _shard_summary(stage: ShardedStage, c: StageConfig, plan: ShardPlan) -> dict:
    """Compute the plan's todo shards (on the task runner of the flow it runs in), show
    progress (terminal + Prefect artifact), drop shard files no longer planned, and return
    the stage summary."""
    out_dir = stage.output(c.folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = tidy_shards(out_dir, plan.shards)  # what a killed run left, old shards
    start = time.perf_counter()
    results = [s for s in plan.stored if s is not None]
    todo = plan.todo
    futures = []
    if todo:
        progress_id = create_progress_artifact(0.0, key=f"{stage.name}-progress",
                                               description=f"{stage.name}: shards done (%)")
        task = shards_task.with_options(name=f"{stage.name}-shards")
        futures = [task.submit([stage.shard_call(c, plan, s) for s in batch])
                   for batch in batch_shards(todo, c.sharding.shard_size)]
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn()) as bar:
            tid = bar.add_task(f"{stage.name} shards", total=len(plan.shards),
                               completed=len(results))
            for future in as_completed(futures):
                batch = future.result()
                results.extend(batch)
                bar.advance(tid, len(batch))
                update_progress_artifact(progress_id,
                                         100.0 * len(results) / max(1, len(plan.shards)))
    counts: dict[str, int] = {}
    for r in results:
        for status, n in r.status_counts.items():
            counts[status] = counts.get(status, 0) + n
    shards = plan.shards
    reused = sum(r.reused for r in results)
    summary = {
        "stage": stage.name, "rows_in": sum(len(s.paths) for s in shards),
        "rows_out": sum(r.rows for r in results),
        "seconds": round(time.perf_counter() - start, 2),
        "shards": len(shards), "shards_reused": reused, "shards_computed": len(shards) - reused,
        "tasks": len(futures), "stale_shards_removed": removed, "status_counts": counts,
        "rows_retried": sum(r.retried for r in results),
        "reused": reused == len(shards),
        "ran_on": sorted({r.ran_on for r in results if not r.reused}),
        "workers": c.sharding.workers, "dask_address": c.sharding.dask_address,
    }
    create_table_artifact(
        key=f"{stage.name}-status-counts",
        table=[{"status": k, "rows": v} for k, v in sorted(counts.items())],
        description=f"{stage.name}: rows by status ({len(shards)} shards, {reused} reused)",
    )
    logger = get_run_logger()
    if summary["reused"]:
        logger.info("%s: cached, all %d shards are up to date (%d rows: %s)", stage.name,
                    len(shards), summary["rows_out"], counts)
    else:
        logger.info("%s: %d rows in %d shards (%d computed, %d reused) in %.1fs: %s",
                    stage.name, summary["rows_out"], len(shards), len(shards) - reused,
                    reused, summary["seconds"], counts)
    if stage.finish:
        stage.finish(c, plan, summary)
    return summary


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


@flow(name="kface-recordings")
def kface_recordings(config: RecordingsConfig) -> dict:
    """Count the videos of a recordings folder into the visitors store (the recordings
    pipeline, ``flows/recordings/``): only new or changed videos are counted."""
    from prefect.runtime import flow_run

    from flows.recordings import RECORDINGS

    with folder_lock(config.out, f"flow run {flow_run.get_name()}"):
        write_bytes_atomic(config.folder.config, dump_config(config).encode())
        return {name: run_sharded_stage(name, config, RECORDINGS.name)
                for name in RECORDINGS.order}


def _run_stages(config: PipelineConfig, stages: list[str]) -> dict[str, dict]:
    write_bytes_atomic(config.folder.config, dump_config(config).encode())
    summaries = {}
    for name in STAGES:
        if name not in stages:
            continue
        if STAGE[name].sharded:
            summaries[name] = run_sharded_stage(name, config)
        else:
            summaries[name] = _unwrap(stage_task.with_options(name=name)(name, config))
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
