"""Video inference: faces tracked across frames, predictions smoothed per track, tracks
joined into visitors.

``analyze_video`` reads a file (or a camera index), runs the analyser on every frame,
links faces to tracks with a greedy IoU tracker, averages each track's class
probabilities over its frames (so labels do not flicker), and joins the tracks of one
person who left the view and came back within ``return_seconds`` into one visitor
(``Visitors``: the new track must start after the old one ended, look alike and have the
same gender). It writes an annotated video, per-frame JSON lines, one line per visitor
(``tracks.jsonl``, written as each visitor's return window closes) and, with ``stats``,
the store statistics: visitors per age band x gender, a per-minute timeline CSV and a
bar chart PNG. Finished visitors are counted and dropped, so an hour-long stream runs at
the same per-frame cost and memory as a minute.

What "looks alike" is: a 12x12 grey, histogram-equalised thumbnail of the inner face box,
averaged over the track, compared by cosine similarity (``MIN_SIMILARITY``). Measured on
78 AAF faces, each shown at two places in a frame and JPEG-compressed at two qualities
(res10 boxes): the same face 0.84-0.98 (5th percentile 0.92), two different faces at most
0.86 (99.9th percentile 0.79) of 6,006 pairs; the gender and time-window conditions cut
false joins further. It is no face-recognition model, so on real cameras (a turned head,
other light) a return may be counted as a new visitor, and two look-alikes of the same
gender coming and going within the window may be joined.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from core.storage import atomic_path, write_json_atomic
from core.threads import READERS, ordered_map
from inference.predict import GENDER_NAMES, annotate
from inference.stats import visitor_stats
from models.analyzer import FaceAnalyzer, FacePrediction
from models.detector import box_iou

MIN_SECONDS = 0.5  # a visitor in view for less is not counted
GAP_SECONDS = 1.0  # a face unseen for up to this long keeps its track
RETURN_SECONDS = 10.0  # a person back in view within this long is the same visitor
MIN_SIMILARITY = 0.85  # thumbnails at least this alike (cosine) are the same person
TRACK_SIMILARITY = 0.6  # a face less alike than this never continues a track
THUMB = 12
# every file kface video may write in --out (core.storage.staged_outputs)
VIDEO_OUTPUTS = ("annotated.mp4", "frames.jsonl", "tracks.jsonl", "summary.json",
                 "stats.json", "timeline.csv", "people.png")


EDGE = 2  # px: a box this close to the frame's border is a face cut by it


def face_thumbnail(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
    """The face's appearance for re-identification: a grey ``THUMB`` x ``THUMB``
    histogram-equalised thumbnail, zero mean, unit length. None for an empty box, and for
    a face cut by the frame's edge (entering or leaving): its part does not look like the
    whole face, so it neither vetoes the track it continues nor joins its looks."""
    h, w = frame.shape[:2]
    if box[0] <= EDGE or box[1] <= EDGE or box[2] >= w - EDGE or box[3] >= h - EDGE:
        return None
    dx, dy = (box[2] - box[0]) // 8, (box[3] - box[1]) // 8  # the face, not the background
    left, top, right, bottom = (max(0, box[0] + dx), max(0, box[1] + dy),
                                min(w, box[2] - dx), min(h, box[3] - dy))
    if right - left < 4 or bottom - top < 4:
        return None
    grey = cv2.cvtColor(frame[top:bottom, left:right], cv2.COLOR_BGR2GRAY)
    thumb = cv2.equalizeHist(cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA))
    vector = thumb.astype(np.float32).ravel()
    vector -= vector.mean()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else None


class VideoError(ValueError):
    """The video or camera cannot be opened or read."""


@dataclass
class Track:
    track_id: int
    box: tuple[int, int, int, int]
    first_frame: int
    last_frame: int
    gender_sum: np.ndarray
    age_sum: np.ndarray
    years_sum: float = 0.0  # the exact-age head's years, summed over the frames that have it
    years_frames: int = 0
    frames: int = 1
    minutes: set[int] = field(default_factory=set)
    looks: np.ndarray | None = None  # the summed face thumbnails (``face_thumbnail``)

    def __post_init__(self) -> None:
        self.first_box = self.box
        self.twin: Track | None = None  # the track this one's looks split it from
        self.absorbed: list[int] = []  # ids of tracks merged into this one

    def absorb(self, other: Track) -> None:
        """Take ``other``'s frames in (one person whose track split; ``IoUTracker``)."""
        self.gender_sum = self.gender_sum + other.gender_sum
        self.age_sum = self.age_sum + other.age_sum
        self.years_sum += other.years_sum
        self.years_frames += other.years_frames
        self.frames += other.frames
        self.minutes |= other.minutes
        self.first_frame = min(self.first_frame, other.first_frame)
        if other.looks is not None:
            self.add_looks(other.looks)
        self.absorbed += [other.track_id, *other.absorbed]

    def add(self, face: FacePrediction, frame: int, thumbnail: np.ndarray | None = None
            ) -> None:
        gender_p, age_p = _probs(face)
        self.box, self.last_frame = face.box, frame
        self.gender_sum = self.gender_sum + gender_p
        self.age_sum = self.age_sum + age_p
        self.add_years(face)
        self.add_looks(thumbnail)
        self.frames += 1

    def add_looks(self, thumbnail: np.ndarray | None) -> None:
        if thumbnail is not None:
            self.looks = thumbnail.copy() if self.looks is None else self.looks + thumbnail

    def add_years(self, face: FacePrediction) -> None:
        if face.age is not None:
            self.years_sum += face.age
            self.years_frames += 1

    @property
    def age(self) -> float | None:
        return round(self.years_sum / self.years_frames, 1) if self.years_frames else None


def _probs(face: FacePrediction) -> tuple[np.ndarray, np.ndarray]:
    """The face's class probabilities as arrays, in the model's class order."""
    return (np.array(list(face.gender_probs.values())),
            np.array(list(face.age_band_probs.values())))


def similarity(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Cosine similarity of two (summed) thumbnails; None when one is missing."""
    if a is None or b is None:
        return None
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class IoUTracker:
    """Greedy IoU matching of each frame's faces to live tracks; a face whose thumbnail
    is unlike the track's (``TRACK_SIMILARITY``: another person stepping into the place
    of one who left) starts a new track.

    Only live tracks are kept: a track unseen for more than ``max_gap`` frames has ended,
    and ``close_ended`` hands it out (to be counted and written) and forgets it, so the
    per-frame cost and the memory stay flat however long the stream runs.
    """

    def __init__(self, iou_threshold: float = 0.3, max_gap: int = 15):
        self.iou_threshold, self.max_gap = iou_threshold, max_gap
        self.live: list[Track] = []
        self.started = 0

    def update(self, faces: list[FacePrediction], frame: int,
               thumbnails: list[np.ndarray | None] | None = None) -> list[Track]:
        thumbnails = thumbnails or [None] * len(faces)
        pairs = sorted(((box_iou(t.box, f.box), ti, fi) for ti, t in enumerate(self.live)
                        for fi, f in enumerate(faces)), reverse=True)
        assigned: dict[int, Track] = {}
        used = set()
        vetoed: dict[int, Track] = {}  # face -> the track its looks kept it from
        for iou, ti, fi in pairs:
            if iou < self.iou_threshold or ti in used or fi in assigned:
                continue
            alike = similarity(self.live[ti].looks, thumbnails[fi])
            if alike is not None and alike < TRACK_SIMILARITY:
                vetoed.setdefault(fi, self.live[ti])
                continue
            used.add(ti)
            self.live[ti].add(faces[fi], frame, thumbnails[fi])
            assigned[fi] = self.live[ti]
        for fi, face in enumerate(faces):
            if fi not in assigned:
                self.started += 1
                track = Track(self.started, face.box, frame, frame, *_probs(face))
                track.add_years(face)
                track.add_looks(thumbnails[fi])
                track.twin = vetoed.get(fi)
                self.live.append(track)
                assigned[fi] = track
        self._rejoin_twins(set(map(id, assigned.values())))
        return [assigned[i] for i in range(len(faces))]

    def _rejoin_twins(self, seen: set[int]) -> None:
        """A track started because a face looked unlike the track in its place (its
        ``twin``) was one noisy thumbnail, not another person, when the face goes back
        to the twin while the new track is not seen: it is merged into the twin (two
        tracks taking turns on one box counted one person twice). Seen together in one
        frame, they are two people, and stay apart."""
        for track in list(self.live):
            twin = track.twin
            if twin is None:
                continue
            if id(track) in seen and id(twin) in seen:
                track.twin = None
            elif id(twin) in seen and any(t is twin for t in self.live):
                twin.absorb(track)
                self.live = [t for t in self.live if t is not track]

    def close_ended(self, frame: int | None = None) -> list[Track]:
        """Remove and return the tracks that ended before ``frame`` (all when None)."""
        if frame is None:
            ended, self.live = self.live, []
        else:
            ended = [t for t in self.live if frame - t.last_frame > self.max_gap]
            self.live = [t for t in self.live if frame - t.last_frame <= self.max_gap]
        return ended


@dataclass
class Visitor:
    """One person's visit: the tracks of their time in view (more than one when they
    left and came back)."""

    tracks: list[Track]

    @property
    def first_frame(self) -> int:
        return self.tracks[0].first_frame

    @property
    def last_frame(self) -> int:
        return self.tracks[-1].last_frame

    @property
    def frames(self) -> int:
        return sum(t.frames for t in self.tracks)

    @property
    def gender_sum(self) -> np.ndarray:
        return sum(t.gender_sum for t in self.tracks)

    @property
    def age_sum(self) -> np.ndarray:
        return sum(t.age_sum for t in self.tracks)

    @property
    def age(self) -> float | None:
        frames = sum(t.years_frames for t in self.tracks)
        return round(sum(t.years_sum for t in self.tracks) / frames, 1) if frames else None

    @property
    def minutes(self) -> set[int]:
        return set().union(*(t.minutes for t in self.tracks))

    def frames_in_view(self) -> int:
        return sum(t.last_frame + 1 - t.first_frame for t in self.tracks)

    def similarity(self, track: Track) -> float:
        """Cosine similarity of the visitor's and the track's average thumbnails (0
        without thumbnails)."""
        looks = [t.looks for t in self.tracks if t.looks is not None]
        return similarity(sum(looks) if looks else None, track.looks) or 0.0


class Visitors:
    """Joins ended tracks into visitors: a track that starts within ``return_frames``
    after a waiting visitor's last frame, looks alike (``min_similarity``) and has the
    same most likely gender continues that visitor (the most alike one); any other track
    is a new visitor. A visitor is finished once its return window has passed and no
    live track that began inside the window could still join it."""

    def __init__(self, return_frames: int, min_similarity: float = MIN_SIMILARITY):
        self.return_frames, self.min_similarity = return_frames, min_similarity
        self.waiting: list[Visitor] = []

    def add(self, track: Track) -> None:
        gender = int(np.argmax(track.gender_sum))
        candidates = [v for v in self.waiting
                      if 0 < track.first_frame - v.last_frame <= self.return_frames
                      and int(np.argmax(v.gender_sum)) == gender]
        best = max(candidates, key=lambda v: v.similarity(track), default=None)
        if best is not None and best.similarity(track) >= self.min_similarity:
            best.tracks.append(track)
        else:
            self.waiting.append(Visitor([track]))

    def finished(self, frame: int | None, live: list[Track] = ()) -> list[Visitor]:
        """Remove and return the visitors no later track can join (all when ``frame`` is
        None, the end of the stream)."""
        if frame is None:
            done, self.waiting = self.waiting, []
            return sorted(done, key=lambda v: v.first_frame)
        starts = [t.first_frame for t in live]

        def open_(v: Visitor) -> bool:
            window = v.last_frame + self.return_frames
            return frame <= window or any(v.last_frame < s <= window for s in starts)

        done = [v for v in self.waiting if not open_(v)]
        self.waiting = [v for v in self.waiting if open_(v)]
        return done


class PeopleCounter:
    """Counts visitors per class (by their most likely class: a diagnostic beside the
    estimates of ``inference.stats``) and, per minute, the expected visitors of each class
    (their summed probabilities, age band x gender, the heads taken as independent);
    memory grows with the number of classes x minutes, not with the number of people. A
    visitor in view for less than ``min_seconds`` in all (a passer-by glimpsed, a false
    detection) is written but not counted. ``model_id`` goes on every visitor's line."""

    def __init__(self, g_names: list[str], a_names: list[str], fps: float = 25.0,
                 min_seconds: float = 0.0, model_id: str | None = None):
        self.g_names, self.a_names = g_names, a_names
        self.fps, self.min_seconds, self.model_id = fps, min_seconds, model_id
        self.classes = [f"{a}_{g}" for a in a_names for g in g_names]
        self.people: Counter[str] = Counter()
        self.per_minute: dict[int, np.ndarray] = {}

    def label(self, visitor: Visitor) -> str:
        return (f"{self.a_names[int(np.argmax(visitor.age_sum))]}_"
                f"{self.g_names[int(np.argmax(visitor.gender_sum))]}")

    def add(self, visitor: Visitor) -> dict:
        """Count ``visitor`` (when in view long enough) and return its line for
        ``tracks.jsonl`` (``visitor_record``)."""
        record = visitor_record(visitor, self.g_names, self.a_names, self.fps,
                                self.min_seconds, self.model_id)
        if record["counted"]:
            self.people[record["class"]] += 1
            gender_p = visitor.gender_sum / visitor.frames
            age_p = visitor.age_sum / visitor.frames
            joint = (age_p[:, None] * gender_p[None, :]).ravel()  # (stats' joint order)
            for minute in visitor.minutes:
                self.per_minute[minute] = self.per_minute.get(minute, 0) + joint
        return record


def visitor_record(visitor: Visitor, g_names: list[str], a_names: list[str], fps: float,
                   min_seconds: float = 0.0, model_id: str | None = None) -> dict:
    """One visitor's line (``tracks.jsonl``, and the visitors store's row): first and last
    second (frames / ``fps``), time in view (the sum of its tracks'), whether that is at
    least ``min_seconds`` (``counted``), its tracks, the averaged probabilities and age."""
    first, last = visitor.first_frame / fps, (visitor.last_frame + 1) / fps
    in_view = visitor.frames_in_view() / fps
    frames = visitor.frames
    gender_p, age_p = visitor.gender_sum / frames, visitor.age_sum / frames
    g, a = g_names[int(np.argmax(gender_p))], a_names[int(np.argmax(age_p))]
    return {"track_id": visitor.tracks[0].track_id,
            "track_ids": [i for t in visitor.tracks for i in (t.track_id, *t.absorbed)],
            "returns": len(visitor.tracks) - 1, "first_frame": visitor.first_frame,
            "last_frame": visitor.last_frame, "frames": frames,
            "first_s": round(first, 2), "last_s": round(last, 2),
            "seconds_in_view": round(in_view, 2), "counted": in_view >= min_seconds,
            "class": f"{a}_{g}", "gender": g,
            "gender_probs": {n: round(float(v), 4)
                             for n, v in zip(g_names, gender_p, strict=True)},
            "age_band": a,
            "age_band_probs": {n: round(float(v), 4)
                               for n, v in zip(a_names, age_p, strict=True)},
            "age": visitor.age, "model_id": model_id}


class FaceTracks:
    """Faces frame by frame into tracks, tracks into visitors: ``step`` takes a frame's
    predictions and returns each face's track and the visitors no later frame can change;
    ``finish`` hands out the rest (the end of the stream). ``fps`` is the rate of the
    frames given, which the gap and return windows are counted in."""

    def __init__(self, fps: float, gap_seconds: float = GAP_SECONDS,
                 return_seconds: float = RETURN_SECONDS):
        self.tracker = IoUTracker(max_gap=max(1, round(gap_seconds * fps)))
        self.visitors = Visitors(round(return_seconds * fps))

    def _finished(self, ended: list[Track], frame: int | None) -> list[Visitor]:
        for track in ended:
            self.visitors.add(track)
        return self.visitors.finished(frame, self.tracker.live)

    def step(self, frame_index: int, frame: np.ndarray, preds: list[FacePrediction]
             ) -> tuple[list[Track], list[Visitor]]:
        done = self._finished(self.tracker.close_ended(frame_index), frame_index)
        live = self.tracker.update(preds, frame_index,
                                   [face_thumbnail(frame, p.box) for p in preds])
        return live, done

    def finish(self) -> list[Visitor]:
        return self._finished(self.tracker.close_ended(), None)

    def oldest_frame(self) -> int | None:
        """The first frame of any live track or waiting visitor (what a stream must
        still be able to date); None when there is none."""
        firsts = [t.first_frame for t in self.tracker.live] + [
            v.first_frame for v in self.visitors.waiting]
        return min(firsts, default=None)


def is_camera(source: str) -> bool:
    """A camera index ("0"), not a file."""
    return str(source).isdigit()


def check_video(source: str) -> None:
    """Before a model loads: a video file exists, is no still photo and OpenCV decodes a
    frame of it; a camera index opens. VideoError with one line otherwise."""
    if is_camera(source):
        cap = cv2.VideoCapture(int(source))
        try:
            if not cap.isOpened():
                raise VideoError(f"camera {source} cannot be opened (no camera at that index, "
                                 "or another program holds it): give a video file, or "
                                 "another index")
        finally:
            cap.release()
        return
    if not Path(source).is_file():
        raise VideoError(f"video {source} not found")
    from core.images import IMAGE_SUFFIXES

    if Path(source).suffix.lower() in IMAGE_SUFFIXES:
        raise VideoError(f"{source} is a still photo, not a video: kface predict {source} "
                         "analyses a photo")
    cap = cv2.VideoCapture(str(source))
    try:
        ok = cap.isOpened() and cap.read()[0]
    finally:
        cap.release()
    if not ok:
        raise VideoError(f"{source}: not a video OpenCV can read (no frame decoded): give a "
                         "video file (mp4, avi, mkv, ...) or a camera index such as 0")


def open_capture(source: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(int(source) if is_camera(source) else str(source))
    if not cap.isOpened():
        raise VideoError(f"cannot open video {source!r}: not a readable video file or camera")
    return cap


def analyze_video(analyzer: FaceAnalyzer, source: str, out: Path, stats: bool = False,
                  max_frames: int | None = None, min_seconds: float = MIN_SECONDS,
                  gap_seconds: float = GAP_SECONDS, return_seconds: float = RETURN_SECONDS,
                  progress: Callable[[int, int | None], None] | None = None,
                  readers: int | None = None, reference: Path | None = None,
                  allow_other_model: bool = False, summed: bool = False) -> dict:
    """Analyse a video file or camera; write ``out/annotated.mp4``, ``out/frames.jsonl``,
    ``out/tracks.jsonl`` and (``stats``) ``out/stats.json`` (the visitors' counts with
    intervals, ``inference.stats``, mix-corrected with a ``reference``), ``out/timeline.csv``,
    ``out/people.png``. A face unseen for up to ``gap_seconds`` keeps its track; a person
    back within ``return_seconds`` (0: never) stays the same visitor; a visitor in view
    for less than ``min_seconds`` is not counted. ``progress(frames done, frames in the
    file or None)`` is called every frame. ``readers`` threads detect the next frames
    while this one is classified, tracked and written (default: ``READERS`` for a file,
    1 for a camera, whose frames should not wait in a queue)."""
    cap = open_capture(source)
    if readers is None:
        readers = 1 if is_camera(source) else READERS
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # (None for a camera)
    if total and max_frames:
        total = min(total, max_frames)
    g_names, a_names = analyzer.labels["gender"], analyzer.labels["age_band"]
    tracks = FaceTracks(fps, gap_seconds, return_seconds)
    counter = PeopleCounter(g_names, a_names, fps, min_seconds,
                            analyzer.provenance()["model"]["id"])
    writer = None
    frame_index = 0
    # tracks.jsonl is a log written as tracks end (a stopped stream keeps what it counted)
    with atomic_path(out / "frames.jsonl") as jsonl_tmp, open(jsonl_tmp, "w") as jsonl, \
            open(out / "tracks.jsonl", "w") as tracks_file:
        def write(done: list[Visitor]) -> None:
            for visitor in done:
                tracks_file.write(json.dumps(counter.add(visitor)) + "\n")
            tracks_file.flush()

        def frames() -> Iterator[np.ndarray]:
            for _ in itertools.count() if max_frames is None else range(max_frames):
                ok, frame = cap.read()
                if not ok:
                    return
                yield frame

        try:  # a camera runs until Ctrl-C: that ends it, and what it counted is written
            for frame, found in ordered_map(lambda f: (f, analyzer.crops(f)), frames(),
                                            readers):
                if writer is None:
                    h, w = frame.shape[:2]
                    writer = cv2.VideoWriter(str(out / ".annotated.mp4"),
                                             cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                preds = analyzer.predictions([found])[0]
                live, done = tracks.step(frame_index, frame, preds)
                write(done)
                minute = int(frame_index / fps // 60)
                labels, records = [], []
                for pred, track in zip(preds, live, strict=True):
                    track.minutes.add(minute)
                    g = g_names[int(np.argmax(track.gender_sum))]
                    a = a_names[int(np.argmax(track.age_sum))]
                    labels.append(f"#{track.track_id} {GENDER_NAMES.get(g, g)}, {a}"
                                  + ("" if track.age is None else f", age {track.age:.0f}"))
                    records.append({**pred.as_dict(), "track_id": track.track_id,
                                    "smoothed_gender": g, "smoothed_age_band": a,
                                    "smoothed_age": track.age})
                writer.write(annotate(frame, preds, labels))
                jsonl.write(json.dumps({"frame": frame_index,
                                        "time_s": round(frame_index / fps, 3),
                                        "faces": records}) + "\n")
                frame_index += 1
                if progress:
                    progress(frame_index, total)
        except KeyboardInterrupt:
            if not is_camera(source):
                raise
        write(tracks.finish())
    cap.release()
    if writer is None:
        raise VideoError(f"{source!r}: no frame could be read")
    writer.release()
    (out / ".annotated.mp4").replace(out / "annotated.mp4")
    summary = {"source": str(source), "frames": frame_index, "fps": fps,
               "tracks": tracks.tracker.started, "visitors": sum(counter.people.values()),
               "min_seconds": min_seconds, "gap_seconds": gap_seconds,
               "return_seconds": return_seconds}
    summary["made_by"] = analyzer.provenance()
    if stats:
        summary["people"], summary["counts"] = write_stats(counter, out, reference,
                                                           summary["made_by"],
                                                           allow_other_model, summed)
    write_json_atomic(out / "summary.json", summary)
    return summary


def write_stats(counter: PeopleCounter, out: Path, reference: Path | None = None,
                made_by: dict | None = None, allow_other_model: bool = False,
                summed: bool = False) -> tuple[dict, dict]:
    """The visitors' counts with 95% intervals (``kface stats`` over ``tracks.jsonl``,
    mix-corrected with a ``reference``, the shipped model's own for its visitors, or
    ``summed`` probabilities); the headline ``people`` is their age band x
    gender estimates; a per-minute timeline of expected visitors (``timeline.csv``); a
    chart of the estimates with their intervals (``people.png``; left out where matplotlib
    is not installed, as in the light inference install); all in ``stats.json``."""
    classes = counter.classes
    minutes = sorted(counter.per_minute)
    lines = ["minute," + ",".join(classes)]
    for m in minutes:
        lines.append(f"{m}," + ",".join(f"{v:.2f}" for v in counter.per_minute[m]))
    with atomic_path(out / "timeline.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    counts = visitor_stats(out / "tracks.jsonl", reference, allow_other_model, summed)
    counts["input"] = "tracks.jsonl"  # beside stats.json (out may be a staging folder)
    people = {c: counts["joint"][c] for c in classes}
    chart = importlib.util.find_spec("matplotlib") is not None
    if not chart:
        counts["warnings"].append("people.png left out: matplotlib is not installed (the "
                                  "light install); stats.json holds the same figures")
    if made_by:
        counts["made_by"] = made_by  # the analyser's: model and detector
    write_json_atomic(out / "stats.json", {"people": people, "minutes": minutes, **counts})
    if chart:
        write_chart(people, out / "people.png", chart_note(counts))
    return people, counts


def chart_note(counts: dict) -> str:
    """What a chart of ``counts`` must say under its title: the estimator and its
    reference, and whether the visitors are too few to split by band."""
    if "reference" in counts:
        source = counts.get("reference_source", "given")
        how = (f"mix-corrected with {'the given' if source == 'given' else source} "
               f"reference ({Path(counts['reference']).name})")
    else:
        how = "summed calibrated probabilities (no reference)"
    thin = (f"; too few visitors ({counts['visitors']}) to split by age band"
            if counts.get("thin") else "")
    return f"{counts['visitors']} visitors, {how}{thin}"


def write_chart(people: dict[str, dict], path: Path, note: str = "") -> None:
    """A bar chart of the estimated people per class, with their 95% intervals, and
    ``note`` (``chart_note``: the estimator, the reference, thin counts) under its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(people)
    estimate = np.array([people[c]["estimate"] for c in classes])
    low = np.array([people[c]["low"] for c in classes])
    high = np.array([people[c]["high"] for c in classes])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(classes, estimate, color="tab:blue",
           yerr=np.vstack([estimate - low, high - estimate]), capsize=3)
    ax.set_ylabel("visitors (estimate, 95% interval)")
    ax.set_title("Visitors by age band x gender" + (f"\n{note}" if note else ""),
                 fontsize=10)
    ax.tick_params(axis="x", rotation=45)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def check_display() -> None:
    """Raise VideoError unless a window can be shown (a display and OpenCV's GUI build)."""
    import os

    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise VideoError("no display (DISPLAY is not set): use 'kface video SOURCE' to write "
                         "an annotated video instead")
    try:
        cv2.namedWindow("kface-probe")
        cv2.destroyWindow("kface-probe")
    except cv2.error:
        raise VideoError("this OpenCV build has no GUI (opencv-python-headless): pip "
                         "uninstall -y opencv-python-headless && pip install "
                         "'opencv-python<5' (see README)") from None


def show_webcam(analyzer: FaceAnalyzer, camera: int) -> None:
    """A live window of camera ``camera`` with labelled faces until q is pressed."""
    cap = open_capture(str(camera))
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            cv2.imshow("kface", annotate(frame, analyzer.analyze(frame)))
            if cv2.waitKey(1) & 0xFF == ord("q"):
                break
    finally:
        cap.release()
        cv2.destroyAllWindows()
