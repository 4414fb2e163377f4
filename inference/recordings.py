"""Recorded videos counted into the visitors store (``kface recordings``): the work of the
recordings pipeline (``flows/recordings/``), one video at a time.

A recordings folder (a DVR's export, a day per folder) is walked; every file in it, but
hidden ones, is one unit of work. Each video is read at ``detect_fps`` analysed frames a
second (the frames between are skipped, not decoded), its faces followed into visitors
with the same tracker, re-joining and glimpse rule as ``kface video`` and ``kface
count``, and its visitors written to the store with their wall-clock times: the video's
start plus their seconds into it.

A video's start time comes from its name (``name_pattern``, strftime codes, found
anywhere in the path below the folder, read in ``timezone``), else from its container
(an MP4 or QuickTime file's creation time), else from the file's mtime less its
length (a recorder last writes a file when it ends); the store's
``recordings`` row says which (``time_from``). A file that is not a readable video gets a
``recordings`` row with status ``error`` and its reason; the others go on.

Written once: a video's visitors and its ``recordings`` row replace, in one
transaction, those of an earlier count of the same file (``Store.replace_recording``),
so a recount after a change of the file, the model or the settings never doubles a
visitor, and a run killed halfway leaves each video counted once or not at all.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import cv2
from pydantic import BaseModel, Field, field_validator

from inference.video import (
    GAP_SECONDS,
    MIN_SECONDS,
    RETURN_SECONDS,
    FaceTracks,
    VideoError,
    visitor_record,
)

TimeFrom = Literal["name", "container", "mtime"]
MP4_EPOCH = 2_082_844_800  # seconds from 1904-01-01 (MP4's epoch) to 1970-01-01
STRFTIME_FIELDS = {"%Y": r"\d{4}", "%y": r"\d{2}", "%m": r"\d{2}", "%d": r"\d{2}",
                   "%H": r"\d{2}", "%M": r"\d{2}", "%S": r"\d{2}", "%j": r"\d{3}",
                   "%%": "%"}


class RecordingsSettings(BaseModel):
    """``kface recordings``' settings: which folder, into which store, read how."""

    root: Path = Field(description="The recordings folder (every file below it but "
                       "hidden ones is counted).")
    camera: str | None = Field(None, min_length=1, max_length=100, description="The "
                               "camera the videos are from (default: the folder's name).")
    store: str | None = Field(None, description="SQLite file or postgresql:// URL "
                              "(default: $KFACE_STORE_URL, else visitors.db).")
    name_pattern: str = Field("%Y%m%d_%H%M%S", description="Where a video's start time "
                              "is in its path (strftime codes: %Y %y %m %d %H %M %S %j).")
    timezone: str | None = Field(None, description="The zone the names' times are in "
                                 "(an IANA name such as Asia/Seoul; default: this "
                                 "machine's).")
    detect_fps: float = Field(10.0, gt=0, description="Frames analysed per second of "
                              "video.")
    min_seconds: float = Field(MIN_SECONDS, ge=0)
    gap_seconds: float = Field(GAP_SECONDS, ge=0)
    return_seconds: float = Field(RETURN_SECONDS, ge=0)
    model: Path | None = Field(None, description="Model folder (default: the shipped "
                               "model).")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str | None) -> str | None:
        from zoneinfo import ZoneInfo

        if zone is not None:
            try:
                ZoneInfo(zone)
            except (ValueError, KeyError, OSError) as exc:  # (not found: a KeyError)
                raise ValueError(f"unknown time zone {zone!r}: give an IANA name such as "
                                 "Asia/Seoul") from exc
        return zone

    @field_validator("name_pattern")
    @classmethod
    def _dated(cls, pattern: str) -> str:
        codes = set(re.findall(r"%.", pattern))
        unknown = codes - set(STRFTIME_FIELDS)
        if unknown or not codes & {"%Y", "%y"} or not ({"%m", "%d"} <= codes or "%j" in codes):
            raise ValueError(f"{pattern!r}: use strftime codes among "
                             f"{' '.join(STRFTIME_FIELDS)}, with a year and a day")
        return pattern

    def camera_name(self) -> str:
        return self.camera or Path(self.root).resolve().name or "recordings"

    def key_settings(self) -> dict:
        """What changes a video's count: everything but where the folder and the model
        are (the model enters the key by its id)."""
        return {**self.model_dump(mode="json", exclude={"root", "model"}),
                "camera": self.camera_name()}


def list_recordings(root: Path) -> list[tuple[str, int, int]]:
    """Every file below ``root`` but hidden ones: ``(path below root, size, mtime_ns)``,
    sorted by path."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            st = path.stat()
            found.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(found)


def recording_key(camera: str, rel: str) -> str:
    """The store's key of a video (its visitors' keys start with it): the camera and a
    hash of its path below the folder (a path can be longer than a key may be)."""
    return f"rec/{camera}/{hashlib.sha1(rel.encode()).hexdigest()[:16]}"


def time_from_name(rel: str, pattern: str, zone: str | None) -> float | None:
    """The time ``pattern`` finds in ``rel`` (the last match: a day folder's date and a
    file's time both count only in full), as epoch seconds in ``zone``; None when the
    path holds none (or an impossible date)."""
    regex = "".join(STRFTIME_FIELDS.get(part, re.escape(part))
                    for part in re.split(r"(%.)", pattern) if part)
    for match in reversed(list(re.finditer(regex, rel))):
        try:
            when = datetime.strptime(match.group(0), pattern)
        except ValueError:
            continue
        return _in_zone(when, zone).timestamp()
    return None


def _in_zone(when: datetime, zone: str | None) -> datetime:
    if zone is None:
        return when.astimezone()  # (a naive time: this machine's zone)
    from zoneinfo import ZoneInfo

    return when.replace(tzinfo=ZoneInfo(zone))


def container_time(path: Path) -> float | None:
    """An MP4 or QuickTime file's creation time (its ``moov/mvhd`` box, seconds since
    1904 in UTC), None for other files or one whose writer left it 0."""
    try:
        with open(path, "rb") as fh:
            moov = _find_box(fh, b"moov", os.fstat(fh.fileno()).st_size)
            if moov is None:
                return None
            mvhd = _find_box(fh, b"mvhd", moov)
            if mvhd is None:
                return None
            head = fh.read(12)
    except OSError:
        return None
    if len(head) < 12:
        return None
    version = head[0]
    if version == 1:
        created = struct.unpack(">Q", head[4:12])[0]
    else:
        created = struct.unpack(">I", head[4:8])[0]
    return float(created - MP4_EPOCH) if created > MP4_EPOCH else None


def _find_box(fh, kind: bytes, end: int) -> int | None:
    """Move ``fh`` to the content of the box ``kind`` among the boxes from here to
    ``end``; return where that box ends (None: not found)."""
    while fh.tell() + 8 <= end:
        start = fh.tell()
        header = fh.read(8)
        if len(header) < 8:
            return None
        size, name = struct.unpack(">I4s", header)
        if size == 1:
            size = struct.unpack(">Q", fh.read(8))[0]
        elif size == 0:
            size = end - start
        if size < 8:
            return None
        if name == kind:
            return start + size
        fh.seek(start + size)
    return None


def start_time(path: Path, rel: str, settings: RecordingsSettings) -> tuple[float, TimeFrom]:
    """When the video at ``path`` (``rel`` below the folder) starts, and where that came
    from: its name, its container, else its mtime."""
    named = time_from_name(rel, settings.name_pattern, settings.timezone)
    if named is not None:
        return named, "name"
    contained = container_time(path)
    if contained is not None:
        return contained, "container"
    return path.stat().st_mtime, "mtime"


def count_recording(analyzer, path: Path, settings: RecordingsSettings
                    ) -> tuple[list[dict], dict]:
    """The visitors of one video (``visitor_record``s, their ``first_s`` and ``last_s``
    seconds into it) and what was read: frames, analysed frames, seconds."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError("not a readable video")
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        step = max(1, round(fps / settings.detect_fps))
        analysed_fps = fps / step
        tracks = FaceTracks(analysed_fps, settings.gap_seconds, settings.return_seconds)
        g_names, a_names = analyzer.labels["gender"], analyzer.labels["age_band"]
        model_id = analyzer.provenance()["model"]["id"]
        done, frames, analysed = [], 0, 0
        while True:
            if frames % step:
                if not cap.grab():
                    break
                frames += 1
                continue
            ok, frame = cap.read()
            if not ok:
                break
            frames += 1
            preds = analyzer.predictions([analyzer.crops(frame)])[0]
            _, ended = tracks.step(analysed, frame, preds)
            done.extend(ended)
            analysed += 1
    finally:
        cap.release()
    if not frames:
        raise VideoError("not a readable video (no frame could be read)")
    done.extend(tracks.finish())
    records = [visitor_record(v, g_names, a_names, analysed_fps, settings.min_seconds,
                              model_id) for v in done]
    return records, {"frames": frames, "analysed": analysed, "fps": fps,
                     "seconds": round(frames / fps, 3), "model_id": model_id}


_ANALYZERS: dict = {}


def _analyzer(model: Path | None):
    """One analyser per worker process (and model), one thread: the workers are the
    parallelism."""
    from models.analyzer import FaceAnalyzer

    if model not in _ANALYZERS:
        _ANALYZERS[model] = FaceAnalyzer(model, threads=1)
    return _ANALYZERS[model]


def count_video_shard(root: Path, shard, settings: RecordingsSettings, final: Path,
                      key: str, opencv_threads: int = 1):
    """One unit of the recordings pipeline, in a worker: count the video ``shard.paths[0]``
    into the store (its ``recordings`` row and visitors, replacing an earlier count),
    then write ``final`` (one row: what was counted, with ``key``). A file that is not a
    video gets its error row and its file too: it is done."""
    import pyarrow as pa

    from core.sharding import ShardResult
    from core.storage import write_parquet_atomic
    from inference.store import Store, visitor_row

    cv2.setNumThreads(opencv_threads)
    rel = shard.paths[0]
    path = Path(root) / rel
    camera = settings.camera_name()
    base = recording_key(camera, rel)
    analyzer = _analyzer(settings.model)
    started, time_from = start_time(path, rel, settings)
    visitors, status, reason, seconds = [], "ok", None, None
    try:
        records, info = count_recording(analyzer, path, settings)
        seconds = info["seconds"]
        if time_from == "mtime":  # (a recorder writes a file to its end: it started then)
            started -= seconds
        visitors = [visitor_row(r, camera, f"{base}/{r['track_id']}", started + r["first_s"],
                                started + r["last_s"], "recording") for r in records]
    except VideoError as exc:
        status, reason = "error", str(exc)
    recording = {"recording_key": base, "camera": camera, "path": rel, "content_key": key,
                 "started_at": started if status == "ok" else None, "seconds": seconds,
                 "time_from": time_from, "status": status, "reason": reason,
                 "visitors": sum(v["counted"] for v in visitors),
                 "model_id": analyzer.provenance()["model"]["id"],
                 "written_at": datetime.now(timezone.utc).timestamp()}
    store = Store(settings.store)
    try:
        store.replace_recording(recording, visitors)
    finally:
        store.close()
    row = {k: [v] for k, v in recording.items() if k != "written_at"}
    write_parquet_atomic(final, pa.table(row), key)
    return ShardResult.done_here(shard, final, 1, {status: 1,
                                                   "visitors": recording["visitors"]})


def stored_video(final: Path, key: str):
    """The summary of a unit's file complete for ``key`` (None: the video needs
    counting)."""
    import pyarrow.parquet as pq

    from core.sharding import ShardResult, holds_key

    if not holds_key(final, key):
        return None
    row = pq.read_table(final, columns=["status", "visitors"]).to_pylist()[0]
    return ShardResult.on_disk(final, 1, {row["status"]: 1, "visitors": row["visitors"]})

