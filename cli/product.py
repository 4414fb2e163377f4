"""``kface`` commands that run a model: predict (photos, or a batch flow with
--workers), video and webcam, evaluate on a labelled folder, stats (counts) and export.
Each parses its options, calls one function and prints (``cli.terminal``)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli import terminal
from cli.options import (
    FULL_INSTALL,
    AllowOtherModelOpt,
    DaskOpt,
    DetectorKindOpt,
    MirrorOpt,
    ModelOpt,
    ReferenceOpt,
    ShardSizeOpt,
    SummedOpt,
    ThresholdOpt,
    WorkersOpt,
    app,
    check_count_options,
    command,
    load_analyzer,
    model_dir,
    out_option,
)
from cli.terminal import console, fail


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., help="Images and/or folders (searched recursively)."),
    model: Path | None = ModelOpt,
    out: Path = out_option("predictions", "Output folder"),
    csv: bool = typer.Option(False, "--csv", help="Also write predictions.csv."),
    annotated: bool = typer.Option(False, "--annotated", help="Also write annotated images."),
    threshold: float | None = ThresholdOpt,
    detector: str | None = DetectorKindOpt,
    mirror: bool | None = MirrorOpt,
    workers: int = WorkersOpt,
    shard_size: int = ShardSizeOpt,
    batch: int = typer.Option(16, min=1, help="Photos whose faces are classified in one "
                              "network call (1: one call per photo)."),
    threads: int | None = typer.Option(None, min=1, help="Threads that read and detect "
                                       "the next photos while faces are classified "
                                       "(default: the CPU count, at most 4; 1: in turn). "
                                       "Without --workers."),
    merged_json: bool = typer.Option(False, "--json", help="With --workers > 1: also merge "
                                     "the shards into predictions.json."),
    dask_address: str | None = DaskOpt,
) -> None:
    """Detect every face in images/folders and predict gender and age band (and the age
    in years when the model estimates it)."""
    import importlib.util

    from inference.predict import PhotoInputError, check_photos

    flow = workers > 1 or dask_address is not None
    if flow and importlib.util.find_spec("prefect") is None:
        fail("--workers > 1 runs the kface-predict Prefect flow, which needs the full "
             f"install ({FULL_INSTALL}); without --workers the light install "
             "predicts in one process")
    try:  # before the model loads (seconds): one line for a wrong path or no readable photo
        check_photos(paths)
    except PhotoInputError as exc:
        fail(str(exc))
    if flow:  # the workers load the model; checked here up front
        # a bad model folder: one line, no server; its folder and notes said once
        checked = load_analyzer(model, threshold, detector, mirror)
        from flows.predict import run_batch_predict
        from flows.server import ServerStartError

        try:
            s = run_batch_predict(checked.model_dir, paths, out, shard_size, threshold, csv,
                                  annotated, workers, detector, merged_json, dask_address,
                                  mirror)
        except ServerStartError as exc:
            fail(str(exc))
        terminal.print_batch(s, out, [out / n for n, on in (
            ("predictions.json", merged_json), ("predictions.csv", csv)) if on])
        if not s["photos"] or s["photos"] == s["unreadable"]:
            fail("no image found in the given paths" if not s["photos"]
                 else "no input image could be read")
        return
    from core.storage import staged_outputs
    from core.threads import READERS
    from inference.predict import predict_images

    analyzer = load_analyzer(model, threshold, detector, mirror)
    from inference.predict import PREDICT_OUTPUTS

    with staged_outputs(out, PREDICT_OUTPUTS) as stage:  # earlier ones stay unless it works
        entries = predict_images(analyzer, paths, stage, csv, annotated, batch,
                                 threads or READERS)
        if all(e["error"] for e in entries):
            fail(f"none of the {len(entries)} image(s) could be read, e.g. "
                 f"{entries[0]['path']}: {entries[0]['error']}")
    terminal.print_faces(entries, paths)
    terminal.report_left_out(entries, out)
    read = sum(not e["error"] for e in entries)
    faces = sum(len(e["faces"]) for e in entries)
    console.print(f"{terminal.plural(read, 'image')} read, {terminal.plural(faces, 'face')}"
                  f" -> {out / 'predictions.json'}")


@app.command()
def video(
    source: str = typer.Argument(..., help="Video file, or a camera index such as 0."),
    model: Path | None = ModelOpt,
    out: Path = out_option("video", "Output folder"),
    stats: bool = typer.Option(False, "--stats", help="People per age band x gender, "
                               "per-minute timeline CSV and bar chart."),
    max_frames: int | None = typer.Option(None, help="Stop after this many frames."),
    threshold: float | None = ThresholdOpt,
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
    summed: bool = SummedOpt,
    allow_other_model: bool = AllowOtherModelOpt,
    mirror: bool | None = MirrorOpt,
) -> None:
    """Annotate a video (or camera) with tracked, smoothed predictions; one line per
    visitor in tracks.jsonl (seconds in view, averaged probabilities and age). A camera
    runs until Ctrl-C, which ends it and writes what it counted."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from core.storage import staged_outputs
    from inference.stats import StatsError, check_reference_for_model
    from inference.video import VIDEO_OUTPUTS, VideoError, analyze_video, check_video

    if (reference is not None or summed) and not stats:
        fail(f"{'--reference' if reference else '--summed'} chooses how --stats counts: "
             "add --stats")
    check_count_options(reference, summed)
    try:  # before the model loads: a missing file or one that is no video is one line,
        check_video(source)  # and a bad reference before minutes of video, not after
        analyzer = load_analyzer(model, threshold, detector, mirror)
        check_reference_for_model(reference, analyzer.provenance()["model"]["id"],
                                  allow_other_model)
    except (VideoError, StatsError) as exc:
        fail(str(exc))
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as bar, staged_outputs(out, VIDEO_OUTPUTS) as stage:
        frames = bar.add_task("frames", total=None)
        try:
            summary = analyze_video(
                analyzer, source, stage, stats, max_frames, min_seconds, gap_seconds,
                return_seconds, lambda done, total: bar.update(frames, completed=done,
                                                               total=total),
                reference=reference, allow_other_model=allow_other_model, summed=summed)
        except (VideoError, StatsError) as exc:
            bar.stop()
            fail(str(exc))
    console.print(f"{summary['frames']} frames, {summary['tracks']} tracks, "
                  f"{summary['visitors']} visitors (in view >= {min_seconds} s) -> {out}")
    if stats:
        terminal.print_counts(summary["counts"])


@app.command()
def webcam(model: Path | None = ModelOpt, camera: int = typer.Option(0, help="Camera index."),
           threshold: float | None = ThresholdOpt,
           detector: str | None = DetectorKindOpt) -> None:
    """Live window with labelled faces (needs a display and OpenCV's GUI build, see the
    README: pip uninstall opencv-python-headless; pip install 'opencv-python<5'). Press q
    to quit."""
    from inference.video import VideoError, check_display, show_webcam

    try:
        check_display()
        show_webcam(load_analyzer(model, threshold, detector), camera)
    except VideoError as exc:
        fail(str(exc))


@command("evaluate", needs=("pandas",))
def evaluate_cmd(
    model: Path | None = ModelOpt,
    data_root: Path = typer.Option(..., help="Folder of labelled photos (read-only)."),
    labels: Path | None = typer.Option(None, help="Labels CSV: file (relative to "
                                       "--data-root), gender, age or age_band, optionally "
                                       "subject_id. Default: DATA_ROOT/labels.csv."),
    out: Path = out_option("evaluate", "Report folder"),
    threshold: float | None = ThresholdOpt,
    detector: str | None = DetectorKindOpt,
    mirror: bool | None = MirrorOpt,
) -> None:
    """Score a model (or an exported ONNX model) on any labelled photo folder: the same
    report as the pipeline's evaluate stage (intervals by person, baselines, confusion,
    age error, calibration), for people the model never saw."""
    from core.labelled import DatasetError, check_root, labels_file, read_labels_file
    from core.storage import staged_outputs
    from inference.evaluate_folder import evaluate_folder, write_folder_evaluation
    from inference.stats import REFERENCE_FILE

    try:  # before the model loads: the folder and its labels CSV
        check_root(data_root)
        read_labels_file(labels_file(data_root, labels))
        analyzer = load_analyzer(model, threshold, detector, mirror)
        metrics, confusion = evaluate_folder(analyzer, data_root, labels)
    except DatasetError as exc:
        fail(str(exc))
    with staged_outputs(out) as stage:
        write_folder_evaluation(analyzer, metrics, confusion, stage)
    terminal.print_evaluation(metrics, out, out / REFERENCE_FILE)


@app.command("stats")
def stats_cmd(
    source: Path = typer.Argument(..., help="predictions.json (kface predict) or "
                                  "tracks.jsonl (kface video)."),
    out: Path = out_option("stats", "Folder for stats.json"),
    reference: Path | None = ReferenceOpt,
    summed: bool = SummedOpt,
    allow_other_model: bool = AllowOtherModelOpt,
) -> None:
    """People per age band, gender and age band x gender, with 95% intervals, from the
    visitors' calibrated probabilities, corrected for the shop's age mix with a
    reference (the shipped model's own for its visitors; see docs: what the interval
    covers)."""
    from core.storage import staged_outputs
    from inference.stats import StatsError, visitor_stats, write_stats_json

    check_count_options(reference, summed)
    try:
        stats = visitor_stats(source, reference, allow_other_model, summed)
    except StatsError as exc:
        fail(str(exc))
    with staged_outputs(out) as stage:
        write_stats_json(stats, stage)
    terminal.print_counts(stats)
    console.print(f"{stats['visitors']} visitors -> {out / 'stats.json'}")


@command("export", needs=("tensorflow",))
def export(
    model: Path | None = ModelOpt,
    format: str = typer.Option("savedmodel", "--format", help="savedmodel, tflite or onnx."),
    out: Path = out_option("export", "Output folder"),
) -> None:
    """Export a trained model: ONNX (a model folder that predict, video and webcam run
    with ONNX Runtime, no TensorFlow; needs the onnx extra), SavedModel or TFLite."""
    from core.storage import staged_outputs
    from models.export import ExportError, check_format, export_model

    try:
        check_format(format)  # before TensorFlow loads (seconds)
        folder = model_dir(model)
        with staged_outputs(out) as stage:
            path = export_model(folder, stage, format)  # type: ignore[arg-type]
    except ExportError as exc:
        fail(str(exc))
    console.print(f"exported {format} -> {out / path.name}")
