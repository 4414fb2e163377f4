"""The deployments ``kface serve`` registers and serves (``prefect.yaml`` has the same ones
for a work pool): what the Prefect UI's Run button and schedules start.

* ``kface-pipeline/full``: every stage (optional ``--full-cron``).
* ``kface-pipeline/reprocess``: the data stages (the stage table's) by default, for a nightly
  re-scan that picks up new or changed photos; cached stages and shards are skipped, so
  an unchanged dataset costs one scan (optional ``--cron``).
* ``kface-predict/batch``: sharded inference over folders with the run's model.
* ``kface-recordings/nightly`` (with ``kface serve --recordings FOLDER``): the
  recordings folder counted into the visitors store every night (``--recordings-cron``,
  default 03:00); only new or changed videos are counted.

Each carries the config it was served with as its default parameters (paths made
absolute, so a run does not depend on the serving process's working directory); the UI
shows the config as a form and lets a run override any field.
"""

from __future__ import annotations

from pathlib import Path

from flows.config import PipelineConfig, RecordingsConfig
from flows.stages import DATA_STAGES, STAGES

SHUTDOWN_GRACE_S = 10  # after SIGTERM, the most a served process takes to exit


def absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """The config with ``out``, ``data.root``, ``data.metadata``, ``data.labels`` and
    the labelled folders' roots and labels resolved against the current directory."""
    def resolved(section, keys):
        return section.model_copy(update={k: Path(v).resolve() for k in keys
                                          if (v := getattr(section, k)) is not None})

    data = resolved(cfg.data, ("root", "metadata", "labels")).model_copy(update={
        "folders": [resolved(f, ("root", "labels")) for f in cfg.data.folders]})
    return cfg.model_copy(update={"out": Path(cfg.out).resolve(), "data": data})


def serve_deployments(deployments: list) -> None:
    """Serve the deployments until Ctrl-C or SIGTERM, as ``prefect.serve`` does, pausing
    their schedules on the way out; except that SIGTERM ends the process within
    ``SHUTDOWN_GRACE_S`` even when the Prefect server is gone (the pause goes through its
    API, whose client would retry for minutes)."""
    import asyncio
    import os
    import threading

    from prefect.runner import Runner

    class BoundedShutdown(Runner):
        def handle_sigterm(self, *args, **kwargs):
            timer = threading.Timer(SHUTDOWN_GRACE_S, os._exit, (0,))
            timer.daemon = True
            timer.start()
            super().handle_sigterm(*args, **kwargs)

    runner = BoundedShutdown(pause_on_shutdown=True)
    for deployment in deployments:
        runner.add_deployment(deployment)
    print("serving " + ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
          + ": start runs from the Prefect UI or by schedule; Ctrl-C or SIGTERM stops")
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass


NIGHTLY = "0 3 * * *"  # the recordings' default schedule: 03:00 every day


def build_deployments(cfg: PipelineConfig, cron: str | None = None,
                      full_cron: str | None = None,
                      reprocess_stages: list[str] | None = None,
                      recordings: RecordingsConfig | None = None,
                      recordings_cron: str = NIGHTLY) -> list:
    """The RunnerDeployments for ``prefect.serve`` (module entrypoints: they load from any
    working directory where this package is installed)."""
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import kface_pipeline, kface_recordings
    from flows.predict import kface_predict

    cfg = absolute_paths(cfg)
    params = cfg.model_dump(mode="json")
    module = EntrypointType.MODULE_PATH
    nightly = [] if recordings is None else [kface_recordings.to_deployment(
        name="nightly", parameters={"config": recordings.model_copy(update={
            "out": Path(recordings.out).resolve()}).model_dump(mode="json")},
        cron=recordings_cron, description="Count the recordings folder's new or changed "
        "videos into the visitors store.", tags=["kface"], entrypoint_type=module,
        concurrency_limit=1)]
    return [
        kface_pipeline.to_deployment(
            name="full", parameters={"config": params, "stages": None}, cron=full_cron,
            description=f"All stages: {' -> '.join(STAGES)}; unchanged stages are skipped.",
            tags=["kface"],
            entrypoint_type=module, concurrency_limit=1),
        kface_pipeline.to_deployment(
            name="reprocess", parameters={"config": params,
                                          "stages": reprocess_stages or DATA_STAGES},
            cron=cron, description="Re-scan the dataset and process new or changed photos "
            "(unchanged shards are reused).", tags=["kface"], entrypoint_type=module,
            concurrency_limit=1),
        kface_predict.to_deployment(
            name="batch", parameters={"model": str(cfg.folder.model),
                                      "inputs": [],
                                      "out": str(cfg.out / "predictions"),
                                      "workers": cfg.sharding.workers},
            description="Detect faces and predict gender + age band for image folders.",
            tags=["kface"], entrypoint_type=module),
        *nightly,
    ]
