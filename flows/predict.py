"""The ``kface-predict`` Prefect flow: resumable batch inference over large folders (see
``inference.batch_predict``). The flow lists the photos into a plan, decides from the plan and
the shard files which shards need work before any worker starts, and submits only those,
one task each, to spawned worker processes (each loads the model once) or to a Dask
cluster. Its parameters are the user's inputs and settings, never the photo list."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run

from core.sharding import ShardingConfig, ShardResult, shard_runner, tidy_shards
from inference.batch_predict import (
    CODE_VERSION,
    SHARDS,
    merge,
    model_digest,
    plan_batch,
    predict_shard,
)


@functools.cache
def _analyzer(model_dir: str, threshold: float | None, detector: str | None = None,
              mirror: bool | None = None):
    from models.analyzer import FaceAnalyzer

    return FaceAnalyzer(Path(model_dir), confidence=threshold, detector_kind=detector,
                        mirror=mirror)


@task(name="predict-shard", cache_policy=NO_CACHE, retries=1)
def predict_shard_task(model_dir: str, threshold: float | None, detector: str | None,
                       out: str, index: int, annotated: bool,
                       mirror: bool | None = None) -> ShardResult:
    """Thin wrapper: analyse shard ``index`` of the plan in ``out``."""
    import cv2

    cv2.setNumThreads(1)
    return predict_shard(_analyzer(model_dir, threshold, detector, mirror), Path(out),
                         index, annotated)


@flow(name="predict-shards")
def predict_shards_flow(model: str, out: str, todo_from: str, threshold: float | None,
                        detector: str | None, annotated: bool,
                        mirror: bool | None = None) -> list[ShardResult]:
    """One task run per shard listed in the file ``todo_from``."""
    todo = json.loads(Path(todo_from).read_text())
    futures = [predict_shard_task.submit(model, threshold, detector, out, index, annotated,
                                         mirror) for index in todo]
    return [f.result() for f in as_completed(futures)]


@flow(name="kface-predict")
def kface_predict(model: Path, inputs: list[Path], out: Path,
                  shard_size: int = ShardingConfig.model_fields["shard_size"].default,
                  threshold: float | None = None, write_csv: bool = False,
                  annotated: bool = False, workers: int = 2, detector: str | None = None,
                  write_json: bool = False, dask_address: str | None = None,
                  mirror: bool | None = None) -> dict:
    """Analyse every image under ``inputs`` with the model folder ``model`` into Parquet
    shards under ``out/shards`` (finished shards are kept and reused);
    ``predictions.json``/``.csv`` merged with ``write_json``/``write_csv``."""
    from core.storage import write_json_atomic
    from models.analyzer import DEFAULT_MODEL, model_detector, provenance, resolve_model_dir
    from models.backends import answers_mirror, model_file

    logger = get_run_logger()
    out = Path(out)
    model_dir, _ = resolve_model_dir(Path(model))
    settings = {"threshold": threshold, "detector": detector, "annotated": annotated}
    if mirror is not None:  # (asked for: the keys of runs that did not ask stay)
        settings["mirror"] = mirror
    plan = plan_batch(inputs, out, shard_size, model_digest(model_dir), settings)
    stale = tidy_shards(out / SHARDS, plan.shards)  # what a killed run left, old shards
    todo = [int(s.name) for s in plan.todo]
    done = len(plan.shards) - len(todo)
    logger.info("predict: %d photos in %d shards, %d already done, %d to compute%s",
                sum(len(s.paths) for s in plan.shards), len(plan.shards), done, len(todo),
                f", {len(stale)} stale shard files removed" if stale else "")
    if todo:
        todo_file = out / SHARDS / ".todo.json"  # a reference, not a parameter
        write_json_atomic(todo_file, todo)
        runner = shard_runner(ShardingConfig(workers=workers, dask_address=dask_address))
        predict_shards_flow.with_options(task_runner=runner)(
            str(model_dir), str(out), str(todo_file), threshold, detector, annotated, mirror)
        todo_file.unlink(missing_ok=True)
    labels = json.loads((model_dir / "labels.json").read_text())
    network = model_file(model_dir, model_dir == DEFAULT_MODEL)
    made_by = provenance(model_dir, labels, network,
                         model_detector(labels, threshold, detector_kind=detector))
    made_by["model"]["mirror"] = answers_mirror(labels, network, mirror)
    counts = merge(out, labels, plan.shards, write_json, write_csv, made_by)
    parameters = len(json.dumps(flow_run.parameters, default=str))
    logger.info("predict: %d photos, %d faces, %d unreadable (%s)", counts["photos"],
                counts["faces"], counts["unreadable"], CODE_VERSION)
    return {**counts, "shards": len(plan.shards), "shards_reused": done,
            "shards_computed": len(todo), "parameter_bytes": parameters}


def run_batch_predict(model: Path, inputs: list[Path], out: Path, shard_size: int,
                      threshold: float | None, write_csv: bool, annotated: bool,
                      workers: int, detector: str | None, write_json: bool,
                      dask_address: str | None, mirror: bool | None = None) -> dict:
    """``kface predict --workers N``: the flow on this process's Prefect API (a temporary
    server when none is configured)."""
    from flows.server import prefect_api

    with prefect_api():
        return kface_predict(model, inputs, out, shard_size, threshold, write_csv, annotated,
                             workers, detector, write_json, dask_address, mirror)
