"""Video inference: faces tracked across frames, predictions smoothed per track.

``analyze_video`` reads a file (or a camera index), runs the analyser on every frame,
links faces to tracks with a greedy IoU tracker, averages each track's class
probabilities over its frames (so labels do not flicker), and writes an annotated video,
per-frame JSON lines and, with ``stats``, the store statistics: distinct people (tracks)
per age band x gender, a per-minute timeline CSV and a bar chart PNG.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from models.analyzer import FaceAnalyzer, FacePrediction
from models.detector import box_iou
from tasks.predict import GENDER_NAMES, annotate
from tasks.storage import atomic_path, write_json_atomic


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
    frames: int = 1
    minutes: set[int] = field(default_factory=set)

    def add(self, face: FacePrediction, frame: int) -> None:
        gender_p, age_p = _probs(face)
        self.box, self.last_frame = face.box, frame
        self.gender_sum = self.gender_sum + gender_p
        self.age_sum = self.age_sum + age_p
        self.frames += 1


def _probs(face: FacePrediction) -> tuple[np.ndarray, np.ndarray]:
    """The face's class probabilities as arrays, in the model's class order."""
    return (np.array(list(face.gender_probs.values())),
            np.array(list(face.age_band_probs.values())))


class IoUTracker:
    """Greedy IoU matching of each frame's faces to live tracks."""

    def __init__(self, iou_threshold: float = 0.3, max_gap: int = 15):
        self.iou_threshold, self.max_gap = iou_threshold, max_gap
        self.tracks: list[Track] = []
        self._next = 1

    def update(self, faces: list[FacePrediction], frame: int) -> list[Track]:
        live = [t for t in self.tracks if frame - t.last_frame <= self.max_gap]
        pairs = sorted(((box_iou(t.box, f.box), ti, fi) for ti, t in enumerate(live)
                        for fi, f in enumerate(faces)), reverse=True)
        assigned: dict[int, Track] = {}
        used = set()
        for iou, ti, fi in pairs:
            if iou < self.iou_threshold or ti in used or fi in assigned:
                continue
            used.add(ti)
            live[ti].add(faces[fi], frame)
            assigned[fi] = live[ti]
        for fi, face in enumerate(faces):
            if fi not in assigned:
                track = Track(self._next, face.box, frame, frame, *_probs(face))
                self._next += 1
                self.tracks.append(track)
                assigned[fi] = track
        return [assigned[i] for i in range(len(faces))]


def open_capture(source: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(int(source) if str(source).isdigit() else str(source))
    if not cap.isOpened():
        raise VideoError(f"cannot open video {source!r}: not a readable video file or camera")
    return cap


def analyze_video(analyzer: FaceAnalyzer, source: str, out: Path, stats: bool = False,
                  max_frames: int | None = None) -> dict:
    """Analyse a video file or camera; write ``out/annotated.mp4``, ``out/frames.jsonl`` and
    (``stats``) ``out/stats.json``, ``out/timeline.csv``, ``out/people.png``."""
    cap = open_capture(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    g_names, a_names = analyzer.labels["gender"], analyzer.labels["age_band"]
    tracker = IoUTracker()
    writer = None
    frame_index = 0
    with atomic_path(out / "frames.jsonl") as jsonl_tmp, open(jsonl_tmp, "w") as jsonl:
        while max_frames is None or frame_index < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(out / ".annotated.mp4"),
                                         cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            preds = analyzer.analyze(frame)
            tracks = tracker.update(preds, frame_index)
            minute = int(frame_index / fps // 60)
            labels, records = [], []
            for pred, track in zip(preds, tracks, strict=True):
                track.minutes.add(minute)
                g = g_names[int(np.argmax(track.gender_sum))]
                a = a_names[int(np.argmax(track.age_sum))]
                labels.append(f"#{track.track_id} {GENDER_NAMES.get(g, g)}, {a}")
                records.append({**pred.as_dict(), "track_id": track.track_id,
                                "smoothed_gender": g, "smoothed_age_band": a})
            writer.write(annotate(frame, preds, labels))
            jsonl.write(json.dumps({"frame": frame_index,
                                    "time_s": round(frame_index / fps, 3),
                                    "faces": records}) + "\n")
            frame_index += 1
    cap.release()
    if writer is None:
        raise VideoError(f"{source!r}: no frame could be read")
    writer.release()
    (out / ".annotated.mp4").replace(out / "annotated.mp4")
    summary = {"source": str(source), "frames": frame_index, "fps": fps,
               "tracks": len(tracker.tracks)}
    if stats:
        summary["people"] = write_stats(tracker.tracks, g_names, a_names, out)
    write_json_atomic(out / "summary.json", summary)
    return summary


def write_stats(tracks: list[Track], g_names: list[str], a_names: list[str], out: Path
                ) -> dict:
    """Distinct people per age band x gender (one per track), per-minute timeline, chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cls(t: Track) -> str:
        return f"{a_names[int(np.argmax(t.age_sum))]}_{g_names[int(np.argmax(t.gender_sum))]}"

    counts = Counter(cls(t) for t in tracks)
    classes = [f"{a}_{g}" for a in a_names for g in g_names]
    minutes = sorted({m for t in tracks for m in t.minutes})
    lines = ["minute," + ",".join(classes)]
    for m in minutes:
        per = Counter(cls(t) for t in tracks if m in t.minutes)
        lines.append(f"{m}," + ",".join(str(per.get(c, 0)) for c in classes))
    with atomic_path(out / "timeline.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(classes, [counts.get(c, 0) for c in classes], color="tab:blue")
    ax.set_ylabel("people (tracks)")
    ax.set_title("Visitors by age band x gender")
    ax.tick_params(axis="x", rotation=45)
    with atomic_path(out / "people.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    people = {c: counts.get(c, 0) for c in classes}
    write_json_atomic(out / "stats.json", {"people": people, "minutes": minutes})
    return people
