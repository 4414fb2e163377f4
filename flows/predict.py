"""The ``kface-predict`` Prefect flow: batch inference over large folders, sharded like
detection (one task per shard of images, in spawned worker processes that each load the
model once), merged into one ``predictions.json`` in input order."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner

from core.storage import write_json_atomic
from tasks.predict import iter_images, predict_entries, write_predictions


@functools.cache
def _analyzer(model_dir: str, threshold: float | None, detector: str | None = None):
    from models.analyzer import FaceAnalyzer

    return FaceAnalyzer(Path(model_dir), confidence=threshold, detector_kind=detector)


@task(name="predict-shard", cache_policy=NO_CACHE, retries=1)
def predict_shard_task(model_dir: str, threshold: float | None, paths: list[str], index: int,
                       out: Path, annotated: bool, start: int,
                       detector: str | None = None) -> str:
    """Thin wrapper: analyse one shard of images into ``out/shards/shard-NNNNN.json``."""
    import cv2

    cv2.setNumThreads(1)
    entries = predict_entries(_analyzer(model_dir, threshold, detector), paths,
                              out / "annotated" if annotated else None, start)
    shard_file = out / "shards" / f"shard-{index:05d}.json"
    write_json_atomic(shard_file, entries)
    return str(shard_file)


@flow(name="predict-shards")
def predict_shards_flow(model: Path, shards: list[list[str]], out: Path, shard_size: int,
                        threshold: float | None, annotated: bool,
                        detector: str | None = None) -> list[str]:
    """One task run per shard; returns the shard files in order."""
    futures = [predict_shard_task.submit(str(model), threshold, shard, i, Path(out),
                                         annotated, i * shard_size, detector)
               for i, shard in enumerate(shards)]
    return sorted(f.result() for f in as_completed(futures))


@flow(name="kface-predict")
def kface_predict(model: Path, inputs: list[Path], out: Path, shard_size: int = 200,
                  threshold: float | None = None, write_csv: bool = False,
                  annotated: bool = False, workers: int = 2,
                  detector: str | None = None) -> dict:
    """Analyse every image under ``inputs`` with the model in ``model``, ``workers``
    processes each loading the model once."""
    paths = [str(p) for p in iter_images(inputs)]
    shards = [paths[i:i + shard_size] for i in range(0, len(paths), shard_size)]
    runner = ProcessPoolTaskRunner(max_workers=workers)
    files = predict_shards_flow.with_options(task_runner=runner)(
        model, shards, out, shard_size, threshold, annotated, detector)
    entries = [e for f in files for e in json.loads(Path(f).read_text())]
    write_predictions(entries, Path(out), write_csv)
    faces = sum(len(e["faces"]) for e in entries)
    get_run_logger().info("predict: %d images, %d faces, %d unreadable, %d shards",
                          len(entries), faces, sum(bool(e["error"]) for e in entries),
                          len(shards))
    return {"images": len(entries), "faces": faces, "shards": len(shards)}
