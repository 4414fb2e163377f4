"""``kface`` command line (typer + rich): each command parses its options, calls one
function and prints. Here the commands of the pipeline that makes a model (run, status,
server, serve, experiments, sample-data, config); the commands that run one (predict,
video, webcam, evaluate, stats, export) are in ``cli.product``. The shared options
and the app live in ``cli.options``, what the commands print in ``cli.terminal``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from cli import terminal
from cli.options import (
    PIPELINE,
    ConfigFlags,
    ConfigOpt,
    SetOpt,
    app,
    command,
    config_flags,
    overrides,
    set_environment,
    usual_metavars,
)
from cli.terminal import console, fail, say

__all__ = ["app", "main"]


@app.callback()
def options(
    verbose: bool = typer.Option(False, "--verbose", help="Show TensorFlow's start-up "
                                 "notices (CUDA, oneDNN), Prefect's routine lines (finished "
                                 "states, run links) and OpenCV's warnings."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of errors that "
                               "are otherwise one line."),
) -> None:
    """K-Face age-band + gender pipeline (Prefect)."""
    set_environment(verbose, debug)


@command("run", needs=PIPELINE)
@config_flags
def run(
    flags: ConfigFlags,
    stages: str | None = typer.Option(
        None, help="Comma-separated subset of stages, e.g. select,detect (default: all)."),
    allow_stale: bool = typer.Option(
        False, "--allow-stale", help="With --stages: use inputs that are out of date (by "
        "default such a run is refused, naming the stages to add)."),
) -> None:
    """Run the pipeline (or --stages of it) with one Prefect flow run. Stages whose inputs,
    settings and code are unchanged are skipped (shown as cached)."""
    from flows.preflight import InputError, check_inputs_current, check_run, parse_stages

    cfg = flags.load()
    try:  # before the server starts and before any photo is read
        stage_list = parse_stages(stages)
        check_run(cfg, stage_list)
        if stage_list and not allow_stale:
            check_inputs_current(cfg, stage_list)
    except InputError as exc:
        fail(str(exc))

    import importlib

    from prefect.settings import get_current_settings

    from flows.server import prefect_api
    from flows.stages import input_errors

    temporary = not get_current_settings().api.url
    user_errors = (*input_errors(), ValueError, RuntimeError)  # (the rows' own, first)
    terminal.quiet_user_errors(user_errors)
    try:  # the flow's imports (TensorFlow aside) overlap the temporary server's start
        with prefect_api(warm_up=lambda: importlib.import_module("flows.pipeline")) as url:
            console.print(terminal.api_line(url, temporary))
            from flows.pipeline import kface_pipeline

            # (checked above, before the server: the flow need not scan again)
            summaries = kface_pipeline(config=cfg, stages=stage_list, allow_stale=True)
    except user_errors as exc:
        if terminal.debug():
            raise
        fail(str(exc))
    terminal.print_run(summaries, cfg.out)


@command("status", needs=PIPELINE)
@config_flags
def status(
    flags: ConfigFlags,
    as_json: bool = typer.Option(False, "--json", help="Print the stages as JSON (stage, "
                                 "state, detail, errors) instead of the table."),
) -> None:
    """Per stage, what 'kface run' with the same options would do: done / cached (up to
    date), stale (inputs, settings or code changed: recomputed) or missing (not run yet)."""
    from flows.stages import input_errors, pipeline_status

    flags.find_run_folder()  # without -c: the run folder's own config
    cfg = flags.load()
    try:
        rows = pipeline_status(cfg)
    except input_errors() as exc:
        fail(str(exc))
    if not as_json:
        terminal.print_status(rows, cfg.out)
        return
    import json

    sys.stdout.write(json.dumps({"out": str(cfg.out), "experiment": cfg.experiment,
                                 "stages": [row.as_dict() for row in rows]}, indent=2) + "\n")


@command("server", needs=("prefect",))
def server(
    port: int = typer.Option(4200, help="Port on 127.0.0.1."),
    host: str = typer.Option("127.0.0.1", help="Interface; keep 127.0.0.1 unless other "
                             "machines must reach it (then put it behind auth)."),
) -> None:
    """Start a local Prefect server (UI + API, SQLite in PREFECT_HOME) in the foreground.
    Then, in another shell: export PREFECT_API_URL=http://127.0.0.1:4200/api and use
    'kface serve' / 'kface run'. Stop it with Ctrl-C."""
    from flows.server import server_env

    console.print(f"Prefect UI: http://{host}:{port}  API: "
                  f"export PREFECT_API_URL=http://{host}:{port}/api")
    os.execve(sys.executable, [sys.executable, "-m", "prefect", "server", "start"],
              server_env(host, port))


@command("serve", needs=PIPELINE)
@config_flags
def serve(
    flags: ConfigFlags,
    cron: str | None = typer.Option(
        None, help="Schedule for kface-pipeline/reprocess, e.g. '0 2 * * *' (02:00 daily)."),
    full_cron: str | None = typer.Option(None, help="Schedule for kface-pipeline/full."),
    reprocess_stages: str | None = typer.Option(
        None, help="Stages of the reprocess deployment (default: the data stages)."),
    recordings: Path | None = typer.Option(
        None, help="A recordings folder: also serve kface-recordings/nightly, which counts "
        "its new or changed videos into --recordings-store every night."),
    recordings_store: str | None = typer.Option(
        None, help="The visitors store of --recordings (SQLite file or postgresql:// URL; "
        "default: $KFACE_STORE_URL, else visitors.db)."),
    recordings_cron: str = typer.Option("0 3 * * *", help="Schedule of "
                                        "kface-recordings/nightly."),
    recordings_tz: str | None = typer.Option(None, help="Time zone of the recordings' "
                                             "names (default: this machine's)."),
) -> None:
    """Register the deployments kface-pipeline/full, kface-pipeline/reprocess and
    kface-predict/batch (and with --recordings, kface-recordings/nightly) with this config
    as their default parameters, and serve them:
    runs started from the Prefect UI (or by schedule) execute here. Needs a Prefect server
    (kface server, then export PREFECT_API_URL=...). Stop with Ctrl-C or SIGTERM."""
    from prefect.settings import get_current_settings

    from flows.deploy import build_deployments, serve_deployments
    from flows.preflight import InputError, parse_stages

    cfg = flags.load()
    try:
        reprocess = parse_stages(reprocess_stages)  # None: the data stages
    except InputError as exc:
        fail(str(exc).replace("--stages", "--reprocess-stages", 1))
    if not get_current_settings().api.url:
        fail("kface serve needs a Prefect server that the UI also talks to: start one with "
             "'kface server' and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    nightly = None
    if recordings is not None:
        from cli.shop import recordings_config

        if not recordings.is_dir():
            fail(f"--recordings {recordings}: not a folder: give the folder of videos")
        nightly = recordings_config(recordings, recordings_store, tz=recordings_tz,
                                    out=Path(cfg.out).parent / "recordings",
                                    workers=cfg.sharding.workers)
    serve_deployments(build_deployments(cfg, cron, full_cron, reprocess, nightly,
                                        recordings_cron))


@command("experiments", needs=("pyarrow", "yaml"))
def experiments_cmd(
    out: Path | None = typer.Option(
        None, help="Run folder (out). Default: the most recent run folder under artifacts/."),
) -> None:
    """One row per experiment of a run folder: recipe, metrics, training time, state."""
    from flows.stages.evaluate import list_experiments

    flags = ConfigFlags(config=None, out=out, experiment=None)
    flags.find_run_folder()
    rows = list_experiments(flags["out"])
    if not rows:
        fail(f"{flags['out']}/experiments/ holds no experiment yet: kface run --out "
             f"{flags['out']} [--experiment NAME] trains one")
    terminal.print_experiments(rows, flags["out"])


@command("sample-data", needs=("pandas", "pyarrow"))
def sample_data(
    out: Path = typer.Option(..., help="Where to write the K-Face-layout tree."),
    faces: Path | None = typer.Option(
        None, help="Labelled face folder with labels.csv (e.g. ../shared/data/faces/aaf). "
        "Without it: variants of scikit-image's public-domain astronaut photo with "
        "SYNTHETIC labels (runs the pipeline, learns nothing)."),
    subjects: int = typer.Option(120, help="Number of subjects (one source photo each)."),
    seed: int = typer.Option(0, help="Which photos to draw."),
) -> None:
    """Build a K-Face-layout sample tree (864x576 JPEGs, S001-S002 x L1,L2,L10 x E01 x
    C4,C7,C1) plus a CP949 metadata CSV with Korean headers. Images are synthetic
    compositions of the source photos; the labels are the source photos' labels."""
    from tasks.sample_data import (
        SAMPLE_SPEC,
        SampleDataError,
        build_kface_tree,
        sample_summary,
        write_public_faces,
    )

    if (out / "KFace_metadata.csv").exists():  # written last: the tree is complete
        console.print(f"{out} already holds a sample tree; reusing it")
        return
    if faces is None:
        try:
            faces = write_public_faces(out / "public-faces", subjects, seed)
        except SampleDataError as exc:
            fail(str(exc))
        say("note:", "yellow", "no --faces folder: using scikit-image's astronaut photo; "
            "the labels are SYNTHETIC (metrics mean nothing)")
    elif not (faces / "labels.csv").is_file():
        fail(f"{faces}/labels.csv not found: --faces must be a labelled face folder")
    table = build_kface_tree(faces, out, subjects, SAMPLE_SPEC, seed=seed)
    console.print(sample_summary(SAMPLE_SPEC, len(table), out))


@command("config", needs=("yaml", "pyarrow"))  # (the stages' config sections)
def show_config(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Print the resolved configuration as YAML (defaults + file + overrides)."""
    from flows.config import ConfigError, dump_config, load_config

    try:
        cfg = load_config(config, overrides({}, set_))
    except ConfigError as exc:
        fail(str(exc))
    sys.stdout.write(dump_config(cfg))


def main() -> None:
    """The ``kface`` command (the typer app, with the usual help placeholders)."""
    import cli.product  # noqa: F401  (registers the commands that run a model)
    import cli.shop  # noqa: F401  (count, counts, dashboard)

    command = typer.main.get_command(app)
    usual_metavars(command)
    command()


if __name__ == "__main__":
    main()
