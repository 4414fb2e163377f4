"""``kface`` command line (typer + rich)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from models.detectors import KIND

app = typer.Typer(help="K-Face age-band + gender pipeline (Prefect).", no_args_is_help=True,
                  rich_markup_mode=None,
                  pretty_exceptions_enable=False)
# markup off: paths, values and install hints ("kface-pipeline[onnx]", "models[old]/m")
# print as they are; styles go through ``_say``'s Text. soft_wrap: never break a line.
console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def _stdout() -> Console:
    """The console for results on stdout (tables): a pipe or file gets whole lines."""
    return Console(soft_wrap=True, markup=False, highlight=False,
                   width=None if sys.stdout.isatty() else 200)


# what the commands beyond the light inference install (requirements-inference.txt) import
PIPELINE = ("prefect", "pandas", "pyarrow", "yaml")


def command(name: str | None = None, needs: tuple[str, ...] = ()):
    """Register a command. Where a module it ``needs`` is not installed (the light
    inference install), its help says so and running it is one line naming the install
    it needs, instead of a traceback."""
    import functools
    import importlib.util
    import inspect

    def register(function):
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if not missing:
            return app.command(name)(function)

        @functools.wraps(function)
        def refuse(*args, **kwargs):
            _fail(f"kface {name or function.__name__} needs the full install ({', '.join(missing)}"
                  " not installed here, as in the light inference install): pip install "
                  "kface-pipeline (docs/operations.md)")

        return app.command(name, help="[needs the full install] "
                                      + (inspect.getdoc(function) or ""))(refuse)

    return register


def _say(label: str, style: str, message: str) -> None:
    """``label message`` on stderr, the label styled, the message verbatim."""
    from rich.text import Text

    console.print(Text.assemble((label, style), " ", message))

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file.", exists=False)
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE",
                      help="Override any config key: --set detector.confidence=0.8")

# The config flags that run, status and serve share, declared once: (flag's parameter
# name, type, help, the config key it sets). ``config_flags`` adds them to a command.
CONFIG_FLAGS: tuple[tuple[str, Any, str, str | None], ...] = (
    ("config", Path | None, ConfigOpt.help, None),
    ("data_root", Path | None, "Dataset root (data.root).", "data.root"),
    ("out", Path | None, "Run folder for all outputs (out).", "out"),
    ("layout", str | None, "kface or labelled (data.layout).", "data.layout"),
    ("metadata", Path | None, "K-Face metadata CSV (data.metadata).", "data.metadata"),
    ("labels", Path | None, "Labels CSV, labelled layout (data.labels).", "data.labels"),
    ("workers", int | None, "Worker processes (sharding.workers).", "sharding.workers"),
    ("shard_size", int | None, "Images per shard (sharding.shard_size).",
     "sharding.shard_size"),
    ("threshold", float | None, "Face score (detector.confidence).", "detector.confidence"),
    ("dask_address", str | None, "Run detect/crops tasks on this Dask cluster, e.g. "
     "tcp://host:8786 (sharding.dask_address).", "sharding.dask_address"),
    ("experiment", str | None, "Train and report into OUT/experiments/NAME/, reusing OUT's "
     "prepared data (experiment; default 'default').", "experiment"),
    ("set_", list[str] | None, SetOpt.help, None),
)


class ConfigFlags(dict):
    """The values of ``CONFIG_FLAGS`` one command received (a dict by parameter name)."""

    def load(self):
        """The PipelineConfig: the YAML file (or the defaults), then the flags, then
        ``--set``; one line and exit 2 when it is invalid."""
        from flows.config import ConfigError, load_config

        flags = dict(self)
        if flags.get("labels") is not None and flags.get("layout") is None:
            flags["layout"] = "labelled"
        pairs = {key: flags.get(name) for name, _, _, key in CONFIG_FLAGS if key}
        try:
            return load_config(flags.get("config"), _overrides(pairs, flags.get("set_")))
        except ConfigError as exc:
            _fail(str(exc))


def config_flags(command):
    """Give ``command`` the shared config flags: they come first in its ``--help`` and
    reach it as one ``flags: ConfigFlags`` argument."""
    import functools
    import inspect

    def option(name: str, help_text: str):
        return {"config": ConfigOpt, "set_": SetOpt}.get(name) or typer.Option(
            None, help=help_text)

    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                default=option(name, help_text), annotation=kind)
              for name, kind, help_text, _ in CONFIG_FLAGS]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.name != "flags"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        flags = ConfigFlags({name: kwargs.pop(name) for name, *_ in CONFIG_FLAGS})
        return command(flags=flags, **kwargs)

    wrapper.__signature__ = inspect.Signature([*shared, *own])
    wrapper.__annotations__ = {p.name: p.annotation for p in [*shared, *own]}
    return wrapper


def _overrides(pairs: dict[str, Any], sets: list[str] | None) -> dict[str, Any]:
    from flows.config import parse_assignment

    out = {k: v for k, v in pairs.items() if v is not None}
    for text in sets or []:
        key, value = parse_assignment(text)
        out[key] = value
    return out


def _fail(message: str, code: int = 2) -> None:
    _say("error:", "bold red", message)
    raise typer.Exit(code)


@app.callback()
def options(
    verbose: bool = typer.Option(False, "--verbose", help="Show TensorFlow's start-up "
                                 "notices (CUDA, oneDNN), Prefect's routine lines (finished "
                                 "states, run links) and OpenCV's warnings."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of errors that "
                               "are otherwise one line."),
) -> None:
    """K-Face age-band + gender pipeline (Prefect)."""
    if verbose:
        os.environ["KFACE_VERBOSE"] = "1"  # read by models.runtime, here and in workers
    else:  # (inherited by the worker processes; Prefect is not imported yet)
        from flows.logs import LOGGING_CONFIG

        os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(LOGGING_CONFIG))
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # camera probing warnings
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own lines (quiet)
    if debug:
        os.environ["KFACE_DEBUG"] = "1"
    # the stage modules' own warnings (a long CPU training, a split too small to
    # stratify) go to the terminal and the Prefect UI with the run's logs
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,models")


def _debug() -> bool:
    return os.environ.get("KFACE_DEBUG") == "1"


def _quiet_user_errors(types: tuple[type[BaseException], ...]) -> None:
    from flows.logs import quiet_user_errors

    if not _debug():
        quiet_user_errors(types)


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
        _fail(str(exc))

    import importlib

    from prefect.settings import get_current_settings

    from flows.server import prefect_api
    from models.detector import DetectorError
    from tasks.select import DatasetError

    temporary = not get_current_settings().api.url
    user_errors = (DatasetError, DetectorError, ValueError, RuntimeError)
    _quiet_user_errors(user_errors)
    try:  # the flow's imports (TensorFlow aside) overlap the temporary server's start
        with prefect_api(warm_up=lambda: importlib.import_module("flows.pipeline")) as url:
            console.print(_api_line(url, temporary))
            from flows.pipeline import kface_pipeline

            # (checked above, before the server: the flow need not scan again)
            summaries = kface_pipeline(config=cfg, stages=stage_list, allow_stale=True)
    except user_errors as exc:
        if _debug():
            raise
        _fail(str(exc))
    for name, s in summaries.items():
        how = "cached" if s.get("reused") else f"{s['seconds']}s"
        _say(f"{name}:", "green", f"{s['rows_out']} rows ({how})")
    console.print(f"outputs in {cfg.out}")
    if "evaluate" in summaries:
        console.print(f"Report: {summaries['evaluate']['report']}")


RUNS = Path("artifacts")  # where the README's commands and the demo put run folders


def _latest_run_folder() -> Path:
    """The run folder a command without --out or -c means: the most recently run one under
    ``artifacts/`` (each run writes its config.yaml there), said on the terminal."""
    runs = sorted((f.parent for f in RUNS.glob("*/config.yaml") if (f.parent / "stages").is_dir()),
                  key=lambda folder: (folder / "config.yaml").stat().st_mtime)
    if not runs:
        _fail(f"no run folder under {RUNS}/ yet: give --out OUT (or -c CONFIG)")
    _say("note:", "yellow", f"run folder {runs[-1]} (the most recent under {RUNS}/; "
                  "--out chooses another)")
    return runs[-1]


def _api_line(url: str, temporary: bool) -> str:
    if not temporary:
        return f"Prefect API: {url}"
    return (f"Prefect API: {url} (a temporary server for this run; the run folder keeps "
            "everything, and 'kface server' gives a lasting UI)")


@command("status", needs=PIPELINE)
@config_flags
def status(
    flags: ConfigFlags,
    as_json: bool = typer.Option(False, "--json", help="Print the stages as JSON (stage, "
                                 "state, detail, errors) instead of the table."),
) -> None:
    """Per stage, what 'kface run' with the same options would do: done / cached (up to
    date), stale (inputs, settings or code changed: recomputed) or missing (not run yet)."""
    from rich.table import Table
    from rich.text import Text

    from flows.stages import pipeline_status
    from tasks.select import DatasetError

    if flags["config"] is None and flags["out"] is None:
        flags["out"] = _latest_run_folder()
    if flags["config"] is None and not Path(flags["out"]).is_dir():
        _fail(f"--out {flags['out']} is not a run folder (no such folder): give the --out "
              "of a kface run, or -c its config")
    if flags["config"] is None:  # the run folder's (or the experiment's) own
        out, experiment = flags["out"], flags["experiment"]
        saved = [out / "experiments" / experiment / "config.yaml"] if experiment else []
        flags["config"] = next((f for f in [*saved, out / "config.yaml"] if f.is_file()), None)
    cfg = flags.load()
    try:
        rows = pipeline_status(cfg)
    except DatasetError as exc:
        _fail(str(exc))
    if as_json:
        import json

        sys.stdout.write(json.dumps({"out": str(cfg.out), "experiment": cfg.experiment,
                                     "stages": [row.as_dict() for row in rows]}, indent=2)
                         + "\n")
        return
    colour = {"done": "green", "cached": "green", "stale": "yellow", "missing": "red"}
    table = Table(title=f"kface status: {cfg.out}", caption=(
        "done: up to date, computed by the last run; cached: up to date, the last run "
        "reused it; stale: 'kface run' recomputes it (input, setting or code changed); "
        "missing: never run"))
    for col in ("stage", "state", "detail"):
        table.add_column(col)
    for row in rows:
        table.add_row(row.stage, Text(row.state, style=colour[row.state]), row.detail)
    out_console = _stdout()
    out_console.print(table)
    errors = next(row.errors for row in rows if row.stage == "detect") or {}
    for state, by_reason in sorted(errors.items()):
        what = ("final errors (the file is not a usable image)" if state == "error" else
                "unreadable (a passing read error: the next run retries them)")
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items()))
        out_console.print(f"detect {what}: {counts}")


@command("server", needs=("prefect",))
def server(
    port: int = typer.Option(4200, help="Port on 127.0.0.1."),
    host: str = typer.Option("127.0.0.1", help="Interface; keep 127.0.0.1 unless other "
                             "machines must reach it (then put it behind auth)."),
) -> None:
    """Start a local Prefect server (UI + API, SQLite in PREFECT_HOME) in the foreground.
    Then, in another shell: export PREFECT_API_URL=http://127.0.0.1:4200/api and use
    'kface serve' / 'kface run'. Stop it with Ctrl-C."""
    import os

    # host/port as settings, not flags: the UI derives the API address it calls from them
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_UI_API_URL", None)
    env.pop("PREFECT_API_URL", None)
    console.print(f"Prefect UI: http://{host}:{port}  API: "
                  f"export PREFECT_API_URL=http://{host}:{port}/api")
    os.execve(sys.executable, [sys.executable, "-m", "prefect", "server", "start"], env)


@command("serve", needs=PIPELINE)
@config_flags
def serve(
    flags: ConfigFlags,
    cron: str | None = typer.Option(
        None, help="Schedule for kface-pipeline/reprocess, e.g. '0 2 * * *' (02:00 daily)."),
    full_cron: str | None = typer.Option(None, help="Schedule for kface-pipeline/full."),
    reprocess_stages: str | None = typer.Option(
        None, help="Stages of the reprocess deployment (default: the data stages, select "
        "to crops)."),
) -> None:
    """Register the deployments kface-pipeline/full, kface-pipeline/reprocess and
    kface-predict/batch with this config as their default parameters, and serve them:
    runs started from the Prefect UI (or by schedule) execute here. Needs a Prefect server
    (kface server, then export PREFECT_API_URL=...). Stop with Ctrl-C or SIGTERM."""
    from prefect.settings import get_current_settings

    from flows.deploy import build_deployments, serve_deployments
    from flows.preflight import InputError, parse_stages

    cfg = flags.load()
    try:
        reprocess = parse_stages(reprocess_stages)  # None: the data stages
    except InputError as exc:
        _fail(str(exc).replace("--stages", "--reprocess-stages", 1))
    if not get_current_settings().api.url:
        _fail("kface serve needs a Prefect server that the UI also talks to: start one with "
              "'kface server' and export PREFECT_API_URL=http://127.0.0.1:4200/api")

    deployments = build_deployments(cfg, cron, full_cron, reprocess)
    serve_deployments(deployments)


@command("experiments", needs=("pyarrow", "yaml"))
def experiments_cmd(
    out: Path | None = typer.Option(
        None, help="Run folder (out). Default: the most recent run folder under artifacts/."),
) -> None:
    """One row per experiment of a run folder: recipe, metrics, training time, state."""
    from rich.table import Table

    from flows.cache import list_experiments

    out = out or _latest_run_folder()
    rows = list_experiments(out)
    if not rows:
        _fail(f"{out}/experiments/ holds no experiment yet: kface run --out {out} "
              "[--experiment NAME] trains one")
    table = Table(title=f"kface experiments: {out}", caption=(
        "scored: the split the report's numbers are on (test: held-out people); "
        "model: OUT/experiments/NAME/model"))
    for col in ("experiment", "backbone", "input", "epochs", "gender", "age band",
                "within one", "scored", "training", "state"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[k]) for k in ("name", "backbone", "input_size", "epochs",
                                             "gender", "age_band", "within_one", "scored",
                                             "training", "state")))
    # a pipe or file gets the whole table on one line per experiment (no 80-column wrap)
    _stdout().print(table)


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
        write_public_faces,
    )

    if (out / "KFace_metadata.csv").exists():  # written last: the tree is complete
        console.print(f"{out} already holds a sample tree; reusing it")
        return
    if faces is None:
        try:
            faces = write_public_faces(out / "public-faces", subjects, seed)
        except SampleDataError as exc:
            _fail(str(exc))
        _say("note:", "yellow", "no --faces folder: using scikit-image's astronaut photo; "
             "the labels are SYNTHETIC (metrics mean nothing)")
    elif not (faces / "labels.csv").is_file():
        _fail(f"{faces}/labels.csv not found: --faces must be a labelled face folder")
    table = build_kface_tree(faces, out, subjects, SAMPLE_SPEC, seed=seed)
    console.print(f"wrote {len(table) * 2 * 3 * 3} photos of {len(table)} subjects under "
                  f"{out}/High_Resolution and {out}/KFace_metadata.csv; the default "
                  f"selection keeps {len(table) * 2 * 2 * 2} of them (light L10 and camera "
                  "C1 are outside K-Face's usual selection, written to show that they are "
                  "left out)")


ModelOpt = typer.Option(None, "--model", "-m", help="Trained model folder (labels.json + "
                        "model.keras or model.onnx), or its experiment or run folder. "
                        "Default: the model shipped with kface (docs/model.md).")
KINDS = tuple(KIND)
DETECTOR_THRESHOLDS = ", ".join(f"{k.inference_confidence} for {k.name}" for k in KIND.values())
ConfOpt = typer.Option(None, "--threshold", help="Face detection threshold for inference "
                       f"(default {DETECTOR_THRESHOLDS}; docs/detection.md: why).")


DetectorKindOpt = typer.Option(
    None, "--detector", help=f"Face detector: {' or '.join(KINDS)} (default: the one the "
    "model was trained on, recorded in its labels.json).")

AllowOtherModelOpt = typer.Option(
    False, "--allow-other-model", help="Use a --reference made with another model than "
    "the one counting (refused by default: the correction assumes the same model).")

ReferenceOpt = typer.Option(
    None, "--reference", help="soft_confusion.json of kface evaluate on labelled people "
    "like the shop's: counts corrected for a shop whose age mix differs from the training "
    "data's (see docs: which estimator)")


def _analyzer(model: Path | None, threshold: float | None, detector: str | None = None):
    from models.analyzer import FaceAnalyzer, ModelFolderError

    _check_detector_kind(detector)
    try:
        analyzer = FaceAnalyzer(model, confidence=threshold, detector_kind=detector)
    except ModelFolderError as exc:
        _fail(str(exc))
    for note in analyzer.notes:
        _say("note:", "yellow", note)
    return analyzer


def _model_dir(model: Path | None) -> Path:
    """The model folder ``--model`` means (a run, experiment or model folder, or its
    model.keras), said when it is not the path itself; one error line otherwise."""
    from models.analyzer import ModelFolderError, resolve_model_dir

    try:
        model, note = resolve_model_dir(model)
    except ModelFolderError as exc:
        _fail(str(exc))
    if note:
        _say("note:", "yellow", note)
    return model


def _check_detector_kind(detector: str | None) -> None:
    from typing import get_args

    from models.detector import DetectorConfig

    kinds = get_args(DetectorConfig.model_fields["kind"].annotation)
    if detector is not None and detector not in kinds:
        _fail(f"--detector {detector!r}: expected {' or '.join(kinds)}")


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., help="Images and/or folders (searched recursively)."),
    model: Path | None = ModelOpt,
    out: Path = typer.Option(Path("artifacts/predictions"), help="Output folder."),
    csv: bool = typer.Option(False, "--csv", help="Also write predictions.csv."),
    annotated: bool = typer.Option(False, "--annotated", help="Also write annotated images."),
    threshold: float | None = ConfOpt,
    detector: str | None = DetectorKindOpt,
    workers: int = typer.Option(1, help="Worker processes; > 1 runs the kface-predict "
                                "Prefect flow: Parquet shards under OUT/shards, resumable."),
    shard_size: int = typer.Option(200, help="Images per shard with --workers > 1."),
    batch: int = typer.Option(16, min=1, help="Photos whose faces are classified in one "
                              "network call (1: one call per photo)."),
    threads: int | None = typer.Option(None, min=1, help="Threads that read and detect "
                                       "the next photos while faces are classified "
                                       "(default: the CPU count, at most 4; 1: in turn). "
                                       "Without --workers."),
    merged_json: bool = typer.Option(False, "--json", help="With --workers > 1: also merge "
                                     "the shards into predictions.json."),
    dask_address: str | None = typer.Option(None, help="With --workers > 1: run the shards "
                                            "on this Dask cluster, e.g. tcp://host:8786."),
) -> None:
    """Detect every face in images/folders and predict gender and age band (and the age
    in years when the model estimates it)."""
    import importlib.util

    from tasks.predict import PhotoInputError, check_photos

    flow = workers > 1 or dask_address is not None
    if flow and importlib.util.find_spec("prefect") is None:
        _fail("--workers > 1 runs the kface-predict Prefect flow, which needs the full "
              "install (pip install kface-pipeline); without --workers the light install "
              "predicts in one process")
    try:  # before the model loads (seconds): one line for a wrong path or no readable photo
        check_photos(paths)
    except PhotoInputError as exc:
        _fail(str(exc))
    if flow:  # the workers load the model; checked here up front
        _check_detector_kind(detector)
        _analyzer(model, threshold, detector)  # a bad model folder: one line, no server
        _predict_flow(_model_dir(model), paths, out, shard_size, threshold, csv, annotated,
                      workers, detector, merged_json, dask_address)
        return
    from core.storage import staged_outputs
    from core.threads import READERS
    from tasks.predict import predict_images

    analyzer = _analyzer(model, threshold, detector)
    with staged_outputs(out) as stage:  # earlier outputs stay unless this run succeeds
        entries = predict_images(analyzer, paths, stage, csv, annotated, batch,
                                 threads or READERS)
        if all(e["error"] for e in entries):
            _fail(f"none of the {len(entries)} image(s) could be read, e.g. "
                  f"{entries[0]['path']}: {entries[0]['error']}")
    _print_faces(entries, paths)
    _report_left_out(entries, out)
    read = sum(not e["error"] for e in entries)
    faces = sum(len(e["faces"]) for e in entries)
    console.print(f"{_plural(read, 'image')} read, {_plural(faces, 'face')} -> "
                  f"{out / 'predictions.json'}")


def _report_left_out(entries: list[dict], out: Path, examples: int = 3) -> None:
    """How many photos had no face or could not be read, with a few examples (all are in
    predictions.json, with their error)."""
    for what, chosen in (("could not be read", [e for e in entries if e["error"]]),
                         ("have no face", [e for e in entries
                                           if not e["error"] and not e["faces"]])):
        if chosen:
            shown = "; ".join(e["path"] + (f" ({e['error']})" if e["error"] else "")
                              for e in chosen[:examples])
            _say("note:", "yellow", f"{_plural(len(chosen), 'image')} {what}, e.g. {shown}"
                 f" (all listed in {out / 'predictions.json'})")


def _predict_flow(model: Path, paths: list[Path], out: Path, shard_size: int,
                  threshold: float | None, csv: bool, annotated: bool, workers: int,
                  detector: str | None, merged_json: bool, dask_address: str | None) -> None:
    from flows.predict import kface_predict
    from flows.server import ServerStartError, prefect_api

    try:
        with prefect_api():
            s = kface_predict(model, paths, out, shard_size, threshold, csv, annotated,
                              workers, detector, merged_json, dask_address)
    except ServerStartError as exc:
        _fail(str(exc))
    merged = [out / n for n, on in (("predictions.json", merged_json),
                                    ("predictions.csv", csv)) if on]
    console.print(f"{_plural(s['photos'], 'image')}, {_plural(s['faces'], 'face')}, "
                  f"{s['unreadable']} unreadable; {_plural(s['shards'], 'shard')} "
                  f"({s['shards_reused']} reused) in {out / 'shards'}"
                  + (f"; merged {', '.join(map(str, merged))}" if merged else ""))
    if not s["photos"]:
        _fail("no image found in the given paths")
    if s["photos"] == s["unreadable"]:
        _fail("no input image could be read")


def _print_faces(entries: list[dict], inputs: list[Path], limit: int = 20) -> None:
    """The answer on the terminal: one row per face (the first ``limit``), each photo
    named relative to the folder the inputs share."""
    from rich.table import Table

    from tasks.predict import display_paths

    shown = dict(zip((e["path"] for e in entries),
                     display_paths(inputs, [e["path"] for e in entries]), strict=True))
    rows = [(e["path"], i, f) for e in entries for i, f in enumerate(e["faces"], 1)]
    if not rows:
        return
    ages = any(f.get("age") is not None for _, _, f in rows)
    table = Table("image", "face", "gender", "age band", *(["age"] if ages else []),
                  "box (left, top, right, bottom)")
    for path, i, f in rows[:limit]:
        table.add_row(shown[path], str(i),
                      f"{f['gender']} {f['gender_probs'][f['gender']]:.0%}",
                      f"{f['age_band']} {f['age_band_probs'][f['age_band']]:.0%}",
                      *([f"{f['age']:.0f}" if f.get("age") is not None else ""] if ages
                        else []),
                      ", ".join(map(str, f["box"])))
    _stdout().print(table)
    if len(rows) > limit:
        console.print(f"... and {len(rows) - limit} more faces in predictions.json")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@app.command()
def video(
    source: str = typer.Argument(..., help="Video file, or a camera index such as 0."),
    model: Path | None = ModelOpt,
    out: Path = typer.Option(Path("artifacts/video"), help="Output folder."),
    stats: bool = typer.Option(False, "--stats", help="People per age band x gender, "
                               "per-minute timeline CSV and bar chart."),
    max_frames: int | None = typer.Option(None, help="Stop after this many frames."),
    threshold: float | None = ConfOpt,
    detector: str | None = DetectorKindOpt,
    min_seconds: float = typer.Option(0.5, min=0, help="A visitor must be in view this "
                                      "long to be counted (glimpses and false detections "
                                      "are not)."),
    gap_seconds: float = typer.Option(1.0, min=0, help="A face unseen for up to this long "
                                      "(turned away, hidden) stays the same track."),
    return_seconds: float = typer.Option(
        10.0, min=0, help="A person who leaves the view and is back within this long, "
        "looking alike, stays the same visitor (0: every return is a new visitor)."),
    reference: Path | None = ReferenceOpt,
    allow_other_model: bool = AllowOtherModelOpt,
) -> None:
    """Annotate a video (or camera) with tracked, smoothed predictions; one line per
    visitor in tracks.jsonl (seconds in view, averaged probabilities and age). A camera
    runs until Ctrl-C, which ends it and writes what it counted."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from core.labels import AGE_BANDS, GENDERS
    from core.storage import staged_outputs
    from tasks.stats import StatsError, check_reference_model, load_reference
    from tasks.video import VideoError, analyze_video, check_video

    try:  # before the model loads: a missing file or one that is no video is one line
        check_video(source)
    except VideoError as exc:
        _fail(str(exc))
    if reference is not None and not stats:
        _fail("--reference corrects the counts of --stats: add --stats")
    ref = None
    if reference is not None:
        try:  # before minutes of video, not after
            ref, _ = load_reference(reference, {"gender": list(GENDERS),
                                                "age_band": list(AGE_BANDS)})
        except StatsError as exc:
            _fail(str(exc))
    analyzer = _analyzer(model, threshold, detector)
    if ref is not None:
        try:
            check_reference_model(ref, analyzer.provenance()["model"]["id"], reference,
                                  allow_other_model)
        except StatsError as exc:
            _fail(str(exc))
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as bar, staged_outputs(out) as stage:
        frames = bar.add_task("frames", total=None)
        try:
            summary = analyze_video(
                analyzer, source, stage, stats, max_frames, min_seconds, gap_seconds,
                return_seconds, lambda done, total: bar.update(frames, completed=done,
                                                               total=total),
                reference=reference, allow_other_model=allow_other_model)
        except (VideoError, StatsError) as exc:
            bar.stop()
            _fail(str(exc))
    console.print(f"{summary['frames']} frames, {summary['tracks']} tracks, "
                  f"{summary['visitors']} visitors (in view >= {min_seconds} s) -> {out}")
    if stats:
        _print_counts(summary["counts"])


@app.command()
def webcam(model: Path | None = ModelOpt, camera: int = typer.Option(0, help="Camera index."),
           threshold: float | None = ConfOpt, detector: str | None = DetectorKindOpt) -> None:
    """Live window with labelled faces (needs a display and OpenCV's GUI build, see the
    README: pip uninstall opencv-python-headless; pip install 'opencv-python<5'). Press q
    to quit."""
    from tasks.video import VideoError, check_display, show_webcam

    try:
        check_display()
        show_webcam(_analyzer(model, threshold, detector), camera)
    except VideoError as exc:
        _fail(str(exc))


@command("evaluate", needs=("pandas",))
def evaluate_cmd(
    model: Path | None = ModelOpt,
    data_root: Path = typer.Option(..., help="Folder of labelled photos (read-only)."),
    labels: Path | None = typer.Option(None, help="Labels CSV: file (relative to "
                                       "--data-root), gender, age or age_band, optionally "
                                       "subject_id. Default: DATA_ROOT/labels.csv."),
    out: Path = typer.Option(Path("artifacts/evaluate"), help="Report folder."),
    threshold: float | None = ConfOpt,
    detector: str | None = DetectorKindOpt,
) -> None:
    """Score a model (or an exported ONNX model) on any labelled photo folder: the same
    report as the pipeline's evaluate stage (intervals by person, baselines, confusion,
    age error, calibration), for people the model never saw."""
    from core.storage import staged_outputs
    from tasks.evaluate_folder import evaluate_folder, write_folder_evaluation
    from tasks.select import DataConfig, DatasetError, check_dataset
    from tasks.stats import REFERENCE_FILE

    data = DataConfig(root=data_root, layout="labelled", labels=labels)
    try:  # before the model loads: the folder and its labels CSV
        check_dataset(data)
    except DatasetError as exc:
        _fail(str(exc))
    analyzer = _analyzer(model, threshold, detector)
    try:
        metrics, confusion = evaluate_folder(analyzer, data)
    except DatasetError as exc:
        _fail(str(exc))
    with staged_outputs(out) as stage:
        write_folder_evaluation(analyzer, metrics, confusion, stage)
    report = out / "report.md"
    for warning in metrics["warnings"]:
        _say("warning:", "yellow", warning)
    from rich.table import Table

    table = Table("head", "accuracy", "95% interval (by person)", "majority class")
    for head in ("gender", "age_band"):
        m = metrics[head]
        lo, hi = m["ci95"]["accuracy"]
        table.add_row(head, f"{m['accuracy']:.3f}", f"{lo:.3f}-{hi:.3f}",
                      f"{m['baselines']['majority_class']['accuracy']:.3f}")
    _stdout().print(table)
    extra = []
    if "age" in metrics:
        extra.append(f"age MAE {metrics['age']['mae_years']:.1f} years")
    if "calibration" in metrics:
        c = metrics["calibration"]["age_band"]
        floor = c.get("ece_floor") or {}
        extra.append(f"age-band ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}"
                     + (f" (a calibrated model shows {floor['mean']:.3f}, up to "
                        f"{floor['p95']:.3f}, on as many faces)"
                        if floor.get("mean") is not None else ""))
    console.print(f"{metrics['examples']} faces of {metrics['subjects']} people"
                  + (f"; {', '.join(extra)}" if extra else "") + f" -> {report}")
    console.print(f"for counts corrected for a shop's mix: kface stats ... --reference "
                  f"{out / REFERENCE_FILE}")


def _print_counts(stats: dict) -> None:
    """The counts of ``tasks.stats.visitor_stats``: one headline figure per class, the
    estimate with its 95% interval, and a two-line note (the rest is in the docs)."""
    from rich.table import Table

    corrected = "reference" in stats
    table = Table("class", "visitors (estimate)", "95% interval")
    for head in ("age_band", "gender", "joint"):
        for cls, c in stats[head].items():
            table.add_row(cls, f"{c['estimate']:.1f}", f"{c['low']:.1f}-{c['high']:.1f}")
    table.add_row("total", str(stats["visitors"]), "")
    _stdout().print(table)
    for warning in stats["warnings"]:
        _say("warning:", "yellow", warning)
    _say("note:", "yellow", "mix-corrected: the shop's age mix estimated with the reference "
         f"{stats['reference']}" if corrected else "summed calibrated probabilities: right "
         "for a shop whose age mix is the training data's; for another, give --reference")
    console.print("(what the interval covers, and the counts by most likely class kept as "
                  "a diagnostic in stats.json: docs/training.md, 'Counts a shop can trust')")


@app.command("stats")
def stats_cmd(
    source: Path = typer.Argument(..., help="predictions.json (kface predict) or "
                                  "tracks.jsonl (kface video)."),
    out: Path = typer.Option(Path("artifacts/stats"), help="Folder for stats.json."),
    reference: Path | None = ReferenceOpt,
    allow_other_model: bool = AllowOtherModelOpt,
) -> None:
    """People per age band, gender and age band x gender, with 95% intervals, from the
    visitors' calibrated probabilities (see docs: what the interval covers)."""
    from core.storage import staged_outputs
    from tasks.stats import StatsError, visitor_stats, write_stats_json

    try:
        stats = visitor_stats(source, reference, allow_other_model)
    except StatsError as exc:
        _fail(str(exc))
    with staged_outputs(out) as stage:
        write_stats_json(stats, stage)
    path = out / "stats.json"
    _print_counts(stats)
    console.print(f"{stats['visitors']} visitors -> {path}")


@command("export", needs=("tensorflow",))
def export(
    model: Path | None = ModelOpt,
    format: str = typer.Option("savedmodel", "--format", help="savedmodel, tflite or onnx."),
    out: Path = typer.Option(Path("artifacts/export"), help="Output folder."),
) -> None:
    """Export a trained model: ONNX (a model folder that predict, video and webcam run
    with ONNX Runtime, no TensorFlow; needs the onnx extra), SavedModel or TFLite."""
    from models.export import ExportError, check_format, export_model

    try:
        check_format(format)  # before TensorFlow loads (seconds)
    except ExportError as exc:
        _fail(str(exc))
    from core.storage import staged_outputs

    model = _model_dir(model)
    try:
        with staged_outputs(out) as stage:
            path = export_model(model, stage, format)  # type: ignore[arg-type]
    except ExportError as exc:
        _fail(str(exc))
    console.print(f"exported {format} -> {out / path.name}")


@command("config", needs=("yaml",))
def show_config(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Print the resolved configuration as YAML (defaults + file + overrides)."""
    from flows.config import ConfigError, dump_config, load_config

    try:
        cfg = load_config(config, _overrides({}, set_))
    except ConfigError as exc:
        _fail(str(exc))
    sys.stdout.write(dump_config(cfg))


def usual_metavars(command) -> None:
    """Give every parameter of ``command`` (and its subcommands) that has none the usual
    placeholder: ``PATH``, ``FLOAT``, ``INTEGER``, ``TEXT``; an argument of many values
    its name in capitals (``PATHS...``). Typer would print its type (``<list[Path]>``)."""
    for sub in getattr(command, "commands", {}).values():
        usual_metavars(sub)
    for param in command.params:
        if param.metavar is not None or getattr(param, "is_flag", False):
            continue
        if param.param_type_name == "argument":
            name = param.name.upper() + ("..." if param.nargs != 1 else "")
            param.metavar = name  # (typer 0.29 would show "{paths}..." and its type)
            param._usage_display_name = lambda name=name: name
            param.display_type_rich = lambda ctx: None
        elif param.type_descriptor.is_path:
            param.metavar = "PATH"
        else:
            param.metavar = {"int": "INTEGER", "float": "FLOAT"}.get(param.bare_type(), "TEXT")


def main() -> None:
    """The ``kface`` command (the typer app, with the usual help placeholders)."""
    command = typer.main.get_command(app)
    usual_metavars(command)
    command()


if __name__ == "__main__":
    main()
