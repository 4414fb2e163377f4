"""Long streams: per-frame time and memory at the start and the end of a shop-camera run.

``python bench/bench_video_long.py [--hours 1] [--frames 3000]``

1. The tracker alone, on an hour of synthetic detections at 25 fps (a new person every
   2 s, each in view for 1.5 s): ours (ended tracks closed and counted) vs keeping every
   track (the previous behaviour, where each frame scanned all tracks ever seen).
2. ``analyze_video`` end to end (detector, a small untrained classifier, tracker,
   annotated mp4, frames.jsonl, tracks.jsonl) on a generated clip of ``--frames`` frames
   with a new real face every 20 frames: ms per frame and process RSS over the first and
   the last 10% of the frames.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from bench.bench_video import save_model  # noqa: E402
from inference.video import IoUTracker  # noqa: E402
from models.analyzer import FacePrediction  # noqa: E402
from models.classifier import ModelConfig  # noqa: E402

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))
FPS = 25


def synthetic_faces(frame: int) -> list[FacePrediction]:
    """People enter every 50 frames and stay 38 frames, at one of 8 places."""
    faces = []
    for person in range(max(0, frame // 50 - 1), frame // 50 + 1):
        if person * 50 <= frame < person * 50 + 38:
            x = (person % 8) * 70
            faces.append(FacePrediction((x, 100, x + 60, 170), 0.99, "M", {"M": 0.9, "F": 0.1},
                                        "30s", {"20s": 0.1, "30s": 0.7, "40s": 0.1,
                                                "50s": 0.1}))
    return faces


class KeepEveryTrack(IoUTracker):
    """The previous tracker: every track ever seen kept, all scanned each frame."""

    def __init__(self):
        super().__init__()
        self.every: list = []

    def update(self, faces, frame):
        self.live = [t for t in self.every if frame - t.last_frame <= self.max_gap]
        known = len(self.live)
        out = super().update(faces, frame)
        self.every.extend(self.live[known:])
        return out


def tracker_run(frames: int, close: bool) -> dict:
    tracker = IoUTracker() if close else KeepEveryTrack()
    times = np.zeros(frames)
    for frame in range(frames):
        faces = synthetic_faces(frame)
        start = time.perf_counter()
        if close:
            tracker.close_ended(frame)
        tracker.update(faces, frame)
        times[frame] = time.perf_counter() - start
    tenth = frames // 10
    held = len(tracker.live) if close else len(tracker.every)
    return {"people": tracker.started, "tracks_held_at_end": held,
            "us_per_frame_first_10pct": round(1e6 * times[:tenth].mean(), 1),
            "us_per_frame_last_10pct": round(1e6 * times[-tenth:].mean(), 1)}


def make_clip(path: Path, frames: int) -> None:
    photos = sorted((SHARED / "faces" / "aaf").glob("*.jpg"))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (640, 480))
    face = None
    for i in range(frames):
        if i % 20 == 0:
            face = cv2.resize(cv2.imread(str(photos[(i // 20) % len(photos)])), (130, 150))
        frame = np.full((480, 640, 3), 100, np.uint8)
        x = 40 + ((i // 20) % 4) * 140 + (i % 20) * 2
        frame[160:310, x:x + 130] = face
        writer.write(frame)
    writer.release()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--frames", type=int, default=3000)
    args = ap.parse_args()
    frames = int(args.hours * 3600 * FPS)
    results = {"tracker_only": {"frames": frames,
                                "ours": tracker_run(frames, close=True),
                                "keep_every_track": tracker_run(frames, close=False)}}
    print(json.dumps(results, indent=1), flush=True)

    from inference import video
    from models.analyzer import FaceAnalyzer

    process = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = tmp / "long.mp4"
        make_clip(clip, args.frames)
        save_model(tmp / "model", ModelConfig(backbone="mobilenet_v3_small"), 128)
        analyzer = FaceAnalyzer(tmp / "model")
        stamps: list[tuple[float, int]] = []
        analyze = analyzer.analyze

        def timed(frame):  # records the wall time and RSS of every frame
            out = analyze(frame)
            stamps.append((time.perf_counter(), process.memory_info().rss))
            return out

        analyzer.analyze = timed
        start = time.perf_counter()
        summary = video.analyze_video(analyzer, str(clip), tmp / "out", stats=True)
        seconds = time.perf_counter() - start
        t = np.diff(np.array([start] + [s[0] for s in stamps]))
        rss = np.array([s[1] for s in stamps]) / 2**20
        tenth = len(t) // 10
        results["analyze_video"] = {
            "frames": summary["frames"], "people": summary["tracks"],
            "seconds": round(seconds, 1),
            "ms_per_frame_first_10pct": round(1000 * t[1:tenth].mean(), 1),
            "ms_per_frame_last_10pct": round(1000 * t[-tenth:].mean(), 1),
            "rss_mb_first_10pct": round(float(rss[:tenth].mean())),
            "rss_mb_last_10pct": round(float(rss[-tenth:].mean()))}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
