"""``kface`` commands of a shop's day: ``count`` (the counting service over cameras into
the visitors store), ``recordings`` (a folder of recorded videos counted into it, a
Prefect flow), ``counts`` (a day's, week's or weeks' counts per period from the
store) and ``dashboard`` (the web page of those counts). They run in the light install."""

from __future__ import annotations

import json
import os
import sys
from datetime import date
from pathlib import Path

import typer

from cli.options import (
    PIPELINE,
    DetectorKindOpt,
    MirrorOpt,
    ModelOpt,
    ThresholdOpt,
    WorkersOpt,
    app,
    command,
    load_analyzer,
)
from cli.terminal import console, fail

StoreOpt = typer.Option(None, "--store", help="Visitors store: an SQLite file or a "
                        "postgresql://USER:${PASSWORD_VAR}@HOST/DB URL (parts in ${...} are "
                        "read from the environment). Default: $KFACE_STORE_URL, else "
                        "visitors.db.")
ShopReferenceOpt = typer.Option(None, "--reference", help="The shop's own "
                                "soft_confusion.json (kface evaluate) to correct the counts "
                                "with; default: the shipped model's own for its visitors.")
TzOpt = typer.Option(None, "--tz", help="The shop's time zone (IANA name, e.g. Asia/Seoul); "
                     "default: this machine's.")


def _open_store(store: str | None):
    from inference.store import Store, StoreError

    try:
        return Store(store)
    except StoreError as exc:
        fail(str(exc))


@app.command()
def count(
    sources: list[str] = typer.Argument(None, help="Cameras: an index (0), an rtsp:// or "
                                        "http:// URL, or a video file standing in for a "
                                        "camera (read at its own frame rate); NAME=SOURCE "
                                        "names one (default names cam1, cam2, ...)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML file: cameras: "
                                       "{NAME: {source: ..., detect_fps: 10}}, store, "
                                       "retention_days, ... (docs/inference.md)."),
    store: str | None = StoreOpt,
    seconds: float | None = typer.Option(None, "--for", min=0, help="Stop after this many "
                                         "seconds (default: run until SIGTERM or Ctrl-C, or "
                                         "until every file source has ended)."),
    detect_fps: float | None = typer.Option(None, min=0.1, help="Frames analysed per "
                                            "second, per camera (default 10)."),
    retention_days: float | None = typer.Option(None, min=0.01, help="Delete visitors "
                                                "older than this (default 365)."),
    model: Path | None = ModelOpt,
    threshold: float | None = ThresholdOpt,
    detector: str | None = DetectorKindOpt,
    mirror: bool | None = MirrorOpt,
) -> None:
    """The counting service: count each camera's visitors into the visitors store as they
    leave, all day; a dropped stream is retried and recorded as downtime. SIGTERM or
    Ctrl-C ends it within seconds, writing every visitor still open."""
    from inference.service import (
        CameraError,
        check_source,
        configure_logging,
        load_count_config,
        run_service,
    )
    from inference.store import Store, StoreError, expand_env

    if not sources and config is None:
        fail("name a camera (kface count 0, kface count rtsp://..., kface count shop.mp4) "
             "or give --config cameras.yaml")
    try:
        cfg = load_count_config(config, sources or [], {
            "store": store, "retention_days": retention_days})
        if detect_fps is not None:
            for camera in cfg.cameras.values():
                camera.detect_fps = detect_fps
        for name, camera in cfg.cameras.items():
            check_source(name, expand_env(camera.source))
        Store(cfg.store).close()  # before the model loads: the store opens, its schema fits
    except (CameraError, StoreError) as exc:
        fail(str(exc))
    analyzer = load_analyzer(model, threshold, detector, mirror)
    configure_logging()
    try:
        summary = run_service(analyzer, cfg, seconds)
    except StoreError as exc:
        fail(str(exc))
    for name, cam in summary["cameras"].items():
        console.print(f"camera {name}: {cam['frames_analysed']} of {cam['frames_read']} "
                      f"frames analysed, {cam['visitors']} visitors, "
                      f"{cam['downtime_seconds']} s down")
    console.print(f"{summary['visitors_written']} visitors written in {summary['seconds']} s "
                  f"-> {summary['store']}")
    if not summary["complete"]:
        fail("the store refused the last writes: see the lines above", code=1)


@app.command()
def counts(
    store: str | None = StoreOpt,
    day: str = typer.Option(None, "--day", help="YYYY-MM-DD (default: today)."),
    period: str = typer.Option("hour", help="hour (the day per hour), day (its week per "
                               "day) or week (eight weeks per week)."),
    camera: str | None = typer.Option(None, help="One camera (default: the whole shop)."),
    reference: Path | None = ShopReferenceOpt,
    tz: str | None = TzOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the JSON the dashboard reads."),
    csv: bool = typer.Option(False, "--csv", help="Print CSV: a row per period."),
) -> None:
    """Visitors per hour, day or week from the visitors store, per age band, gender and
    band x gender with 95% intervals (the estimator of kface stats), and downtime."""
    from inference.shop_counts import CountsError, counts_csv, shop_counts

    try:
        when = date.fromisoformat(day) if day else date.today()
    except ValueError:
        fail(f"--day {day}: give a date as YYYY-MM-DD")
    if reference is not None and not reference.is_file():
        fail(f"--reference {reference} not found: give a soft_confusion.json of kface evaluate")
    opened = _open_store(store)
    try:
        result = shop_counts(opened, when, period, camera, reference, tz)
    except CountsError as exc:
        fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return
    if csv:
        sys.stdout.write(counts_csv(result))
        return
    bands = list(result["total"]["age_band"])
    console.print(f"{result['view']} from {result['day']}"
                  f"{', camera ' + camera if camera else ''} ({result['timezone']} time): "
                  f"{result['store']}")
    heads = [*bands, "men", "women"]
    console.print(f"{period:<11}{'visitors':>8}" + "".join(f"{h:>15}" for h in heads)
                  + f"{'down':>8}")

    def cell(c: dict) -> str:
        return f"{c['estimate']:.1f} ({c['low']:.0f}-{c['high']:.0f})"

    quiet = 0
    for p in result["periods"] + [{**result["total"], "label": "total", "future": False}]:
        down = sum(p["downtime"].values())
        if not p["visitors"] and not down:
            quiet += p["label"] != "total"
            continue
        label = p["label"][11:] if period == "hour" and p["label"] != "total" else p["label"]
        values = [p["age_band"][b] for b in bands] + [p["gender"][g] for g in ("M", "F")]
        console.print(f"{label + (' *' if p['thin'] else ''):<11}{p['visitors']:>8}"
                      + "".join(f"{cell(c):>15}" for c in values)
                      + f"{f'{down:.0f} s' if down else '':>8}")
    if quiet:
        console.print(f"{quiet} {period}s without visitors or downtime left out")
    console.print("* too few visitors to split by age band. Estimates: "
                  f"{result['total'].get('estimator', 'no visitors')}")


@app.command()
def dashboard(
    store: str | None = StoreOpt,
    host: str = typer.Option("127.0.0.1", help="Address to serve on (another than "
                             "127.0.0.1 needs a token)."),
    port: int = typer.Option(8765, min=0, max=65535, help="Port (0: any free one)."),
    token: str | None = typer.Option(None, help="Token the page and API require (default: "
                                     "$KFACE_DASHBOARD_TOKEN; made up and printed when the "
                                     "address is not 127.0.0.1 and none is given)."),
    reference: Path | None = ShopReferenceOpt,
    tz: str | None = TzOpt,
) -> None:
    """A web page of the store's counts: a day per hour or a week per day, by age band x
    gender with intervals, totals, downtime, a camera filter and a CSV download;
    refreshed every 30 s while the day is today. Works offline."""
    import secrets

    from inference.dashboard import is_loopback, serve_dashboard

    opened = _open_store(store)
    token = token or os.environ.get("KFACE_DASHBOARD_TOKEN") or (
        None if is_loopback(host) else secrets.token_urlsafe(16))
    try:
        server = serve_dashboard(opened, host, port, token, reference, tz)
    except OSError as exc:
        fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}")
    bound = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/" + (f"?token={token}" if token else "")
    console.print(f"dashboard of {opened.shown} on {url} (Ctrl-C ends it)")
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        opened.close()


def recordings_config(folder: Path, store: str | None, camera: str | None = None,
                      name_pattern: str = "%Y%m%d_%H%M%S", tz: str | None = None,
                      detect_fps: float = 10.0, model: Path | None = None,
                      out: Path = Path("artifacts/recordings"), workers: int = 1):
    """``kface recordings``' (and ``kface serve --recordings``') config; a bad value is
    one line."""
    from pydantic import ValidationError

    from core.sharding import ShardingConfig
    from flows.config import RecordingsConfig
    from inference.recordings import RecordingsSettings

    if store and "://" not in store and "${" not in store:  # (a file: the same for a
        store = str(Path(store).expanduser().resolve())  # served run in another folder)
    try:
        return RecordingsConfig(
            out=out, sharding=ShardingConfig(workers=workers, shard_size=1),
            recordings=RecordingsSettings(root=folder.resolve(), store=store, camera=camera,
                                          name_pattern=name_pattern, timezone=tz,
                                          detect_fps=detect_fps, model=model))
    except ValidationError as exc:
        error = exc.errors()[0]
        fail(f"kface recordings: {error['loc'][-1]}: "
             f"{error['msg'].removeprefix('Value error, ')}")


@command("recordings", needs=PIPELINE)
def recordings(
    folder: Path = typer.Argument(..., help="Folder of recorded videos (every file below "
                                  "it but hidden ones)."),
    store: str | None = StoreOpt,
    camera: str | None = typer.Option(None, help="The camera they are from (default: the "
                                      "folder's name)."),
    name_pattern: str = typer.Option("%Y%m%d_%H%M%S", help="Where a video's start time is "
                                     "in its path below the folder (strftime codes); else "
                                     "its container's creation time, else its mtime."),
    tz: str | None = TzOpt,
    detect_fps: float = typer.Option(10.0, min=0.1, help="Frames analysed per second of "
                                     "video."),
    model: Path | None = ModelOpt,
    out: Path = typer.Option(Path("artifacts/recordings"), "--out", help="Run folder: what "
                             "was counted of each video (reruns count only new or changed "
                             "videos)."),
    workers: int = WorkersOpt,
) -> None:
    """Count a folder of recorded videos into the visitors store (a Prefect flow, one unit
    per video, over worker processes): a rerun counts only new or changed videos, a
    killed run resumes, and a recount replaces a video's visitors, never doubles them."""
    from flows.machinery import StageConfig
    from flows.recordings import RECORDINGS

    cfg = recordings_config(folder, store, camera, name_pattern, tz, detect_fps, model, out,
                            workers)
    errors = RECORDINGS.input_errors()
    try:
        for row in RECORDINGS.rows:
            if row.check:
                row.check(StageConfig(cfg, row, writing=False))
    except errors as exc:
        fail(str(exc))

    import importlib

    from prefect.settings import get_current_settings

    from cli import terminal
    from flows.server import prefect_api

    temporary = not get_current_settings().api.url
    terminal.quiet_user_errors((*errors, ValueError, RuntimeError))
    try:
        with prefect_api(warm_up=lambda: importlib.import_module("flows.pipeline")) as url:
            console.print(terminal.api_line(url, temporary))
            from flows.pipeline import kface_recordings

            summaries = kface_recordings(config=cfg)
    except (*errors, ValueError, RuntimeError) as exc:
        if terminal.debug():
            raise
        fail(str(exc))
    for name, s in summaries.items():
        counts = s["status_counts"]
        console.print(f"{name}: {s['shards']} file(s), {s['shards_computed']} counted now, "
                      f"{s['shards_reused']} unchanged; {counts.get('visitors', 0)} visitors; "
                      f"{counts.get('error', 0)} not a readable video")
    console.print(f"store: {_open_store(store).shown}")
