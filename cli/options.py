"""The ``kface`` command line's shared parts: the typer app, command registration (a
light install marks and refuses what it cannot run), the options several commands share
(declared once, one meaning each), the pipeline's config flags, the usual help
placeholders, and the argument handling several commands share (the model, the
detector, the run folder)."""

from __future__ import annotations

import functools
import importlib.util
import inspect
from pathlib import Path
from typing import Any

import typer

from cli.terminal import fail, say
from core.sharding import ShardingConfig
from models.detectors import KIND

app = typer.Typer(help="K-Face age-band + gender pipeline (Prefect).", no_args_is_help=True,
                  rich_markup_mode=None, pretty_exceptions_enable=False)

# what the commands beyond the light inference install (requirements-inference.txt) import
PIPELINE = ("prefect", "pandas", "pyarrow", "yaml")
RUNS = Path("artifacts")  # where the README's commands and the demo put run folders


# what a light install's user runs for the full one (kface is installed from its
# repository or a wheel built from it: no package index serves it)
FULL_INSTALL = ("pip install -e . in the kface repository, or its wheel "
                "(docs/operations.md)")


def command(name: str | None = None, needs: tuple[str, ...] = ()):
    """Register a command. Where a module it ``needs`` is not installed (the light
    inference install), its help says so and running it is one line naming the install
    it needs, instead of a traceback."""
    def register(function):
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if not missing:
            return app.command(name)(function)

        @functools.wraps(function)
        def refuse(*args, **kwargs):
            fail(f"kface {name or function.__name__} needs the full install ({', '.join(missing)}"
                 f" not installed here, as in the light inference install): {FULL_INSTALL}")

        return app.command(name, help="[needs the full install] "
                                      + (inspect.getdoc(function) or ""))(refuse)

    return register


def set_environment(verbose: bool, debug: bool) -> None:
    """``kface --verbose/--debug``: what this process and its workers (which inherit the
    environment; Prefect is not imported yet) show."""
    import os

    if verbose:
        os.environ["KFACE_VERBOSE"] = "1"  # read by models.runtime, here and in workers
    else:
        from flows.logs import LOGGING_CONFIG

        os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(LOGGING_CONFIG))
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # camera probing warnings
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own lines (quiet)
    if debug:
        os.environ["KFACE_DEBUG"] = "1"
    # the stage modules' own warnings (a long CPU training, a split too small to
    # stratify) go to the terminal and the Prefect UI with the run's logs
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,inference,models")


# ---------------------------------------------------------------- the shared options

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file.", exists=False)
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE",
                      help="Override any config key: --set detector.confidence=0.8")
ModelOpt = typer.Option(None, "--model", "-m", help="Trained model folder (labels.json + "
                        "model.keras or model.onnx), or its experiment or run folder. "
                        "Default: the model shipped with kface (docs/model.md).")
ThresholdOpt = typer.Option(
    None, "--threshold", help="Face detection threshold (default: the detector's, "
    + ", ".join(f"{k.inference_confidence} for {k.name}" for k in KIND.values())
    + " when running a model; docs/detection.md: why).")
DetectorKindOpt = typer.Option(
    None, "--detector", help=f"Face detector: {' or '.join(KIND)} (default: the one the "
    "model was trained on, recorded in its labels.json).")
MirrorOpt = typer.Option(
    None, "--mirror/--no-mirror", help="Average each face's answers with its mirror "
    "image's (twice the classifier's work). Default: as the model says (labels.json "
    "'mirror', else its recipe's flip_average); the shipped model answers without it "
    "(docs/model.md: the same scores on held-out people at twice the speed).")
AllowOtherModelOpt = typer.Option(
    False, "--allow-other-model", help="Use a --reference made with another model than "
    "the one counting (refused by default: the correction assumes the same model).")
ReferenceOpt = typer.Option(
    None, "--reference", help="soft_confusion.json of kface evaluate on labelled people "
    "like the shop's: counts corrected for a shop whose age mix differs from the training "
    "data's (see docs: which estimator). Default: for visitors of the shipped model, its "
    "own reference (docs/model.md); for another model, none.")
SummedOpt = typer.Option(
    False, "--summed", help="Count by the summed calibrated probabilities, without the "
    "shipped model's reference: right only for a shop whose age mix is the training "
    "data's.")
WorkersOpt = typer.Option(1, help="Worker processes; > 1 runs the kface-predict Prefect "
                          "flow: Parquet shards under OUT/shards, resumable.")
ShardSizeOpt = typer.Option(ShardingConfig.model_fields["shard_size"].default,
                            help="Images per shard with --workers > 1 (as the pipeline's "
                            "sharding.shard_size).")
DaskOpt = typer.Option(None, help="Run the shards on this Dask cluster, e.g. "
                       "tcp://host:8786 (sharding.dask_address).")


def out_option(default: str, what: str):
    """The ``--out`` of a command that writes one folder (``artifacts/<default>``)."""
    return typer.Option(RUNS / default, "--out", help=f"{what} (replaced only when the "
                        "command succeeds).")


# --------------------------------------------------------- the pipeline's config flags

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
    ("threshold", float | None, "Face detection threshold for the training data "
     "(detector.confidence).", "detector.confidence"),
    ("dask_address", str | None, DaskOpt.help, "sharding.dask_address"),
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
            return load_config(flags.get("config"), overrides(pairs, flags.get("set_")))
        except ConfigError as exc:
            fail(str(exc))

    def find_run_folder(self) -> None:
        """Without --config: the run folder (--out, else the latest under ``RUNS``) and
        the config its last run left there (the experiment's, when named)."""
        from core.run_folder import RunFolder

        if self["config"] is not None:
            return
        if self["out"] is None:
            self["out"] = RunFolder.latest(RUNS)
            if self["out"] is None:
                fail(f"no run folder under {RUNS}/ yet: give --out OUT (or -c CONFIG)")
            say("note:", "yellow", f"run folder {self['out']} (the most recent under "
                f"{RUNS}/; --out chooses another)")
        if not Path(self["out"]).is_dir():
            fail(f"--out {self['out']} is not a run folder (no such folder): give the "
                 "--out of a kface run, or -c its config")
        self["config"] = RunFolder(self["out"]).saved_config(self["experiment"])


def config_flags(command):
    """Give ``command`` the shared config flags: they come first in its ``--help`` and
    reach it as one ``flags: ConfigFlags`` argument."""
    def option(name: str, help_text: str):
        return {"config": ConfigOpt, "set_": SetOpt, "dask_address": DaskOpt}.get(
            name) or typer.Option(None, help=help_text)

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


def overrides(pairs: dict[str, Any], sets: list[str] | None) -> dict[str, Any]:
    """The flags that were given, then each ``--set KEY=VALUE``."""
    from flows.config import parse_assignment

    out = {k: v for k, v in pairs.items() if v is not None}
    for text in sets or []:
        key, value = parse_assignment(text)
        out[key] = value
    return out


# ------------------------------------------------------------ shared argument handling

def check_detector_kind(detector: str | None) -> None:
    if detector is not None and detector not in KIND:
        fail(f"--detector {detector!r}: expected {' or '.join(KIND)}")


def check_count_options(reference: Path | None, summed: bool) -> None:
    """``--reference`` and ``--summed`` answer one question (how to count): one line when
    both are given."""
    if reference is not None and summed:
        fail("give --reference (counts corrected with it) or --summed (summed "
             "probabilities), not both")


def load_analyzer(model: Path | None, threshold: float | None, detector: str | None = None,
                  mirror: bool | None = None):
    """The FaceAnalyzer for ``--model``/``--threshold``/``--detector``/``--mirror``, its
    notes said; one error line for a bad model folder or detector."""
    from models.analyzer import FaceAnalyzer, ModelFolderError

    check_detector_kind(detector)
    try:
        analyzer = FaceAnalyzer(model, confidence=threshold, detector_kind=detector,
                                mirror=mirror)
    except ModelFolderError as exc:
        fail(str(exc))
    for note in analyzer.notes:
        say("note:", "yellow", note)
    return analyzer


def model_dir(model: Path | None) -> Path:
    """The model folder ``--model`` means (a run, experiment or model folder, or its
    model.keras), said when it is not the path itself; one error line otherwise."""
    from models.analyzer import ModelFolderError, resolve_model_dir

    try:
        model, note = resolve_model_dir(model)
    except ModelFolderError as exc:
        fail(str(exc))
    if note:
        say("note:", "yellow", note)
    return model


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
