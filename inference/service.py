"""``kface count``: the counting service. It reads one or more cameras at once (a camera
index, an RTSP or HTTP stream URL, or a video file read at its own frame rate as a
stand-in for a camera), analyses each at ``detect_fps`` frames a second, follows faces
into visitors (``inference.video.FaceTracks``: the same tracker, re-joining and
glimpse rule as ``kface video``) and writes each visitor to the store
(``inference.store``) as soon as nothing can change it any more: once their return
window (``return_seconds``) has passed.

Each camera has a reader thread that keeps only its newest frame, so a slow analysis
drops frames (counted) instead of falling behind the live picture; one analysis loop
takes the due frame of each camera in turn (one model, one detector). A stream that
drops, stalls (no frame for ``stall_seconds``: OpenCV's FFmpeg read timeout) or cannot be
opened is retried with a doubling wait (``retry_seconds`` up to ``retry_max_seconds``),
logged as one line when it goes and one when it is back, and the gap is written to the
store as the camera's downtime. A store that refuses a write (a database restarting, a
full disk) keeps the rows in memory (up to ``MAX_PENDING``) and retries each second.

What a kill loses: a visitor is written once their return window has passed, so a
SIGKILL loses the visitors in view and those who left within the last
``return_seconds + gap_seconds`` (11 s by default); nothing written is lost, and every
row's ``visitor_key`` (camera, service run, track) is unique, so nothing is written
twice. SIGTERM or Ctrl-C ends the service within seconds: every open visitor is closed
and written first.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, field_validator

from inference.store import Store, StoreError, expand_env, redact, short_error, visitor_row
from inference.video import (
    GAP_SECONDS,
    MIN_SECONDS,
    RETURN_SECONDS,
    FaceTracks,
    Visitor,
    is_camera,
    visitor_record,
)

log = logging.getLogger("kface.count")
MAX_PENDING = 100_000  # store rows held in memory while the store refuses writes
RETENTION_EVERY = 3600.0  # seconds between retention sweeps
BEAT_EVERY = 30.0  # seconds between heartbeats (the store's sign that the service runs)
# a service gone for longer than this (since its last heartbeat) is recorded as downtime
# when it starts again: what a stopped or killed service did not see
OFF_AFTER = 2 * BEAT_EVERY
OFF_REASON = "kface count was not running"


class CameraConfig(BaseModel):
    """One camera: a ``source`` (camera index, rtsp:// or http(s):// URL, or a video
    file standing in for a camera; ``${NAME}`` parts are read from the environment)."""

    source: str
    detect_fps: float = Field(10.0, gt=0, description="Frames analysed per second.")
    loop: bool = Field(False, description="A video file: start it again at its end (a "
                       "camera that never ends, for trials and benchmarks).")
    enabled: bool = True


class CountConfig(BaseModel):
    """``kface count``'s settings (a YAML file with a ``cameras:`` map, as Frigate's)."""

    cameras: dict[str, CameraConfig]
    store: str | None = Field(None, description="SQLite file or postgresql:// URL "
                              "(default: $KFACE_STORE_URL, else visitors.db).")
    retention_days: float | None = Field(
        365, gt=0, description="Visitors older than this are deleted (None: kept).")
    min_seconds: float = Field(MIN_SECONDS, ge=0)
    gap_seconds: float = Field(GAP_SECONDS, ge=0)
    return_seconds: float = Field(RETURN_SECONDS, ge=0)
    retry_seconds: float = Field(1.0, gt=0)
    retry_max_seconds: float = Field(30.0, gt=0)
    stall_seconds: float = Field(10.0, gt=0)

    @field_validator("cameras")
    @classmethod
    def _some_camera(cls, cameras: dict) -> dict:
        if not cameras:
            raise ValueError("name at least one camera")
        for name in cameras:
            if not name or len(name) > 100 or "/" in name:
                raise ValueError(f"camera name {name!r}: 1-100 characters, no '/'")
        return cameras


def is_stream(source: str) -> bool:
    return "://" in source


class CameraError(ValueError):
    """A camera source that cannot be used (a file that is not there)."""


def check_source(name: str, source: str) -> None:
    """Before the model loads: a file source exists and is a video (a stream or camera
    index is tried by the service itself, and retried while it is down)."""
    if is_stream(source) or is_camera(source):
        return
    from inference.video import VideoError, check_video

    try:
        check_video(source)
    except VideoError as exc:
        raise CameraError(f"camera {name}: {exc}") from None


@dataclass
class Frame:
    image: np.ndarray
    at: float  # wall-clock time it was read (epoch seconds)
    sequence: int  # the reader's frame number, so a frame is analysed once


class CameraReader(threading.Thread):
    """Reads one camera in a thread, keeping only its newest frame (``latest``); retries
    a lost stream and reports outages to ``on_down`` / ``on_up``."""

    def __init__(self, name: str, camera: CameraConfig, cfg: CountConfig,
                 stop: threading.Event, on_down: Callable[[str, str, float], None],
                 on_up: Callable[[str, float, float], None]):
        super().__init__(name=f"kface-camera-{name}", daemon=True)
        self.camera_name, self.cfg, self.stop_event = name, cfg, stop
        self.source = expand_env(camera.source)
        self.loop = camera.loop
        self.shown = redact(self.source)
        self.file = not (is_stream(self.source) or is_camera(self.source))
        self.on_down, self.on_up = on_down, on_up
        self.lock = threading.Lock()
        self.latest: Frame | None = None
        self.frames_read = 0
        self.connection = 0  # +1 per (re)connection: the analysis closes visitors on a change
        self.ended = False  # a file source read to its end
        self.down_since: float | None = None

    def _open(self):
        import cv2

        if is_camera(self.source):
            return cv2.VideoCapture(int(self.source))
        timeout = int(self.cfg.stall_seconds * 1000)
        return cv2.VideoCapture(self.source, cv2.CAP_FFMPEG,
                                [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout,
                                 cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout])

    def _went_down(self, reason: str) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            self.on_down(self.camera_name, reason, self.down_since)

    def run(self) -> None:
        import cv2

        wait = self.cfg.retry_seconds
        while not self.stop_event.is_set():
            cap = self._open()
            if not cap.isOpened():
                cap.release()
                self._went_down(f"cannot open {self.shown}")
                if self.file:  # checked before start: it went away
                    self.ended = True
                    return
                log.warning("camera %s: cannot open %s; retrying in %.0f s",
                            self.camera_name, self.shown, wait)
                self.stop_event.wait(wait)
                wait = min(2 * wait, self.cfg.retry_max_seconds)
                continue
            if self.down_since is not None:
                now = time.time()
                self.on_up(self.camera_name, self.down_since, now)
                self.down_since = None
            wait = self.cfg.retry_seconds
            self.connection += 1
            fps = cap.get(cv2.CAP_PROP_FPS) or 25.0 if self.file else None
            started, count = time.time(), 0
            try:
                while not self.stop_event.is_set():
                    ok, image = cap.read()
                    if not ok:
                        break
                    if fps:  # a file stands in for a camera: its frames at their own rate
                        count += 1
                        delay = started + count / fps - time.time()
                        if delay > 0:
                            self.stop_event.wait(delay)
                    with self.lock:
                        self.frames_read += 1
                        self.latest = Frame(image, time.time(), self.frames_read)
            finally:
                cap.release()
            if self.stop_event.is_set():
                return
            if self.file and self.loop:
                continue
            if self.file:
                log.info("camera %s: end of %s", self.camera_name, self.shown)
                self.ended = True
                return
            self._went_down("stream lost")
            log.warning("camera %s: stream lost (%s); retrying in %.0f s", self.camera_name,
                        self.shown, wait)
            self.stop_event.wait(wait)

    def take(self, after: int) -> Frame | None:
        """The newest frame if it is newer than frame number ``after``."""
        with self.lock:
            frame = self.latest
        return frame if frame is not None and frame.sequence > after else None


class StoreWriter(threading.Thread):
    """Writes to the store in order from a queue; a refused write is retried each second
    (logged once per streak), so a restarting database or a full disk loses nothing
    while the service runs (up to ``MAX_PENDING`` rows held)."""

    def __init__(self, store: Store):
        super().__init__(name="kface-store-writer", daemon=True)
        self.store = store
        self.jobs: queue.Queue = queue.Queue()
        self.written = 0
        self.failing = False
        self.done = threading.Event()

    def put(self, job: tuple) -> None:
        if self.jobs.qsize() >= MAX_PENDING:
            log.error("store %s refuses writes and %d rows wait: dropping the oldest",
                      self.store.shown, MAX_PENDING)
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                pass
        self.jobs.put(job)

    def _do(self, job: tuple) -> None:
        kind, *args = job
        if kind == "visitors":
            self.written += self.store.add_visitors(args[0])
        elif kind == "down":
            self.store.start_downtime(*args)
        elif kind == "up":
            self.store.end_downtime(*args)
        elif kind == "beat":
            self.store.beat(*args)
        elif kind == "forget":
            gone = self.store.forget_before(args[0])
            if gone:
                log.info("retention: deleted %d visitors before %s", gone,
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(args[0])))

    def run(self) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        while True:
            job = self.jobs.get()
            if job is None:
                self.done.set()
                return
            while True:
                try:
                    self._do(job)
                    if self.failing:
                        log.warning("store %s: writing again", self.store.shown)
                    self.failing = False
                    break
                except SQLAlchemyError as exc:
                    if not self.failing:
                        log.error("store %s refused a write (%s); retrying each second, "
                                  "nothing is lost while the service runs", self.store.shown,
                                  short_error(exc))
                    self.failing = True
                    time.sleep(1.0)

    def close(self, timeout: float) -> bool:
        """Write what is queued (at most ``timeout`` seconds); True when all was written."""
        self.jobs.put(None)
        return self.done.wait(timeout)


@dataclass
class CameraState:
    """The analysis side of one camera: its tracks, the time of each analysed frame
    still needed, and its figures."""

    name: str
    reader: CameraReader
    detect_fps: float
    tracks: FaceTracks
    run_id: str
    last_sequence: int = 0
    connection: int = 0
    frame_index: int = 0
    next_due: float = 0.0
    analysed: int = 0
    times: dict[int, float] = field(default_factory=dict)
    visitors: int = 0


def run_service(analyzer, cfg: CountConfig, seconds: float | None = None,
                stop: threading.Event | None = None,
                on_visitor: Callable[[dict], None] | None = None) -> dict:
    """Count the cameras of ``cfg`` into its store until ``stop`` is set, SIGTERM or
    SIGINT arrives, ``seconds`` have passed, or every file source has ended. Returns the
    run's figures per camera (frames read and analysed, visitors written, downtime)."""
    from sqlalchemy.exc import SQLAlchemyError

    store = Store(cfg.store)
    stop = stop or threading.Event()
    writer = StoreWriter(store)
    writer.start()
    g_names, a_names = analyzer.labels["gender"], analyzer.labels["age_band"]
    model_id = analyzer.provenance()["model"]["id"]
    run_id = uuid.uuid4().hex[:12]
    outages: dict[str, str] = {}
    downtime: dict[str, float] = {}

    def on_down(name: str, reason: str, at: float) -> None:
        outages[name] = f"{name}/{run_id}/{at:.3f}"
        writer.put(("down", name, outages[name], at, reason))

    def on_up(name: str, since: float, at: float) -> None:
        log.info("camera %s: back after %.0f s", name, at - since)
        downtime[name] = downtime.get(name, 0.0) + at - since
        if name in outages:
            writer.put(("up", outages.pop(name), at))

    cams = []
    for name, camera in cfg.cameras.items():
        if not camera.enabled:
            continue
        reader = CameraReader(name, camera, cfg, stop, on_down, on_up)
        cams.append(CameraState(name, reader, camera.detect_fps,
                                FaceTracks(camera.detect_fps, cfg.gap_seconds,
                                           cfg.return_seconds), run_id))
    handlers = _stop_on_signals(stop)
    started = time.time()
    names = [cam.name for cam in cams]
    for name in names:  # the time no service counted this camera: downtime
        try:
            last = store.heartbeat(name)
        except SQLAlchemyError as exc:  # (the store went away since it was opened)
            log.error("store %s: cannot read camera %s's last heartbeat (%s); its time "
                      "off is not recorded", store.shown, name, short_error(exc))
            last = None
        if last is not None and started - last["seen_at"] > OFF_AFTER:
            key = f"{name}/off/{last['run_id']}"
            writer.put(("down", name, key, last["seen_at"], OFF_REASON))
            writer.put(("up", key, started))
            log.info("camera %s: not counted for %.0f s before this start (recorded as "
                     "downtime)", name, started - last["seen_at"])
    writer.put(("beat", names, run_id, started, started))
    for cam in cams:
        log.info("camera %s: %s at %g frames/s -> %s", cam.name, cam.reader.shown,
                 cam.detect_fps, store.shown)
        cam.reader.start()

    def write(cam: CameraState, done: list[Visitor]) -> None:
        rows = []
        for visitor in done:
            record = visitor_record(visitor, g_names, a_names, cam.detect_fps,
                                    cfg.min_seconds, model_id)
            entered = cam.times.get(visitor.first_frame, time.time())
            left = cam.times.get(visitor.last_frame, entered) + 1 / cam.detect_fps
            seconds = sum(cam.times.get(t.last_frame, entered) - cam.times.get(
                t.first_frame, entered) + 1 / cam.detect_fps for t in visitor.tracks)
            record["seconds_in_view"] = round(seconds, 2)  # wall-clock, not frames / fps
            record["counted"] = seconds >= cfg.min_seconds
            key = f"{cam.name}/{cam.run_id}/{record['track_id']}"
            rows.append(visitor_row(record, cam.name, key, entered, left, "live"))
            cam.visitors += record["counted"]
            if on_visitor:
                on_visitor(rows[-1])
        if rows:
            writer.put(("visitors", rows))
        oldest = cam.tracks.oldest_frame()
        for index in [i for i in cam.times if oldest is None or i < oldest]:
            if index < cam.frame_index - 1:
                del cam.times[index]

    next_retention, next_beat = 0.0, started + BEAT_EVERY
    try:
        while not stop.is_set():
            now = time.time()
            if seconds is not None and now - started >= seconds:
                break
            if now >= next_beat:
                writer.put(("beat", names, run_id, started, now))
                next_beat = now + BEAT_EVERY
            if cfg.retention_days and now >= next_retention:
                writer.put(("forget", now - cfg.retention_days * 86400))
                next_retention = now + RETENTION_EVERY
            worked = False
            for cam in cams:
                if cam.reader.connection != cam.connection:  # reconnected: a new picture
                    if cam.connection:
                        write(cam, cam.tracks.finish())
                    cam.connection = cam.reader.connection
                if now < cam.next_due:
                    continue
                frame = cam.reader.take(cam.last_sequence)
                if frame is None:
                    continue
                cam.last_sequence = frame.sequence
                period = 1 / cam.detect_fps  # keep the phase, unless a period behind
                cam.next_due = (cam.next_due + period if now - cam.next_due < period
                                else now + period)
                found = analyzer.crops(frame.image)
                preds = analyzer.predictions([found])[0]
                cam.times[cam.frame_index] = frame.at
                _, done = cam.tracks.step(cam.frame_index, frame.image, preds)
                cam.frame_index += 1
                cam.analysed += 1
                write(cam, done)
                worked = True
            if cams and all(c.reader.ended for c in cams):
                break
            if not worked:
                stop.wait(0.01)
    finally:
        stop.set()
        for cam in cams:
            write(cam, cam.tracks.finish())
        end = time.time()
        for key in list(outages.values()):  # a camera still down when the service ends
            writer.put(("up", key, end))
        writer.put(("beat", names, run_id, started, end))
        complete = writer.close(timeout=30)
        _restore_signals(handlers)
        if not complete:
            log.error("store %s still refuses writes: %d rows not written",
                      store.shown, writer.jobs.qsize())
        store.close()
    elapsed = time.time() - started
    return {"seconds": round(elapsed, 1), "store": store.shown, "run_id": run_id,
            "visitors_written": writer.written, "complete": complete,
            "cameras": {c.name: {"frames_read": c.reader.frames_read,
                                 "frames_analysed": c.analysed,
                                 "visitors": c.visitors,
                                 "downtime_seconds": round(downtime.get(c.name, 0.0), 1)}
                        for c in cams}}


def _stop_on_signals(stop: threading.Event) -> dict:
    """SIGTERM and SIGINT set ``stop`` (main thread only); returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, lambda *_: stop.set())
    return old


def _restore_signals(old: dict) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


def load_count_config(path: Path | None, sources: list[str], overrides: dict) -> CountConfig:
    """The service's settings: a YAML file (``cameras:`` name -> source and rate, and
    the other fields of ``CountConfig``), sources from the command line (``NAME=SOURCE``
    or a bare source, named cam1, cam2, ...), and command-line ``overrides``."""
    import yaml

    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CameraError(f"config {path}: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise CameraError(f"config {path}: expected a map with 'cameras:'")
    cameras = dict(data.get("cameras") or {})
    for i, source in enumerate(sources, 1):
        name, _, url = source.partition("=") if "=" in source.split("://")[0] else (
            f"cam{i}", "", source)
        cameras[name] = {"source": url}
    data["cameras"] = {k: (v if isinstance(v, dict) else {"source": str(v)})
                       for k, v in cameras.items()}
    data.update({k: v for k, v in overrides.items() if v is not None})
    from pydantic import ValidationError

    try:
        return CountConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "cameras"
        raise CameraError(f"{'config ' + str(path) if path else 'kface count'}: {where}: "
                          f"{first['msg']}") from None


def configure_logging() -> None:
    """One line per event on stderr, with the local time."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")


__all__ = ["CameraConfig", "CountConfig", "StoreError", "run_service", "load_count_config"]
