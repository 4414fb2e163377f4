"""Recorded videos counted (``kface recordings``): how many times real time, and the
analysed frame rate that gives the same counts as every frame.

``python bench/bench_recordings.py [--minutes 2] [--videos 2] [--fps 25] [--rates 25,10,5,3]``
    ``--videos`` 1280x720 clips of ``--minutes`` each at ``--fps`` (real faces walking in
    three lanes, their visits known), counted by ``kface recordings`` as a user runs it
    (the shipped model, ``--workers 2``, a fresh store and run folder each time) at each
    analysed frame rate of ``--rates`` (the first: every frame): wall seconds, video
    seconds per wall second, also without the run's fixed cost (a rerun of the same
    folder, every video cached: the Prefect server, the model, the walk), which an hour of
    video pays once (the goal: an hour in <= 15 minutes, 4x real time), the visitors
    counted against the known ones and against every frame's count. Beside it, today's
    one-shot path on the same clips: ``kface video`` (every frame, one clip after the
    other), its speed and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def kface(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, text=True,
                         capture_output=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return time.perf_counter() - start, res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--rates", default="25,10,5,3")
    args = parser.parse_args()
    import sqlite3

    work = Path(tempfile.mkdtemp(prefix="kface-bench-recordings-"))
    folder = work / "export"
    folder.mkdir()
    from bench_shop import clip_720p, shop_visits

    known = 0
    for n in range(args.videos):  # (each clip its own people)
        clip_720p(folder / f"20261207_{10 + n:02d}0000.mp4", args.minutes * 60, args.fps,
                  n * 100)
        known += len(shop_visits(args.minutes * 60, n * 100))
    video_seconds = args.videos * args.minutes * 60
    results = {"videos": args.videos, "video_seconds": video_seconds, "source_fps": args.fps,
               "known_visitors": known, "recordings": []}
    every, fixed = None, None
    for rate in [float(r) for r in args.rates.split(",")]:
        db, out = work / f"store-{rate:g}.db", work / f"run-{rate:g}"
        seconds, _ = kface("recordings", str(folder), "--store", str(db), "--out", str(out),
                           "--detect-fps", f"{rate:g}", "--workers", "2")
        with sqlite3.connect(db) as conn:
            counted = conn.execute("select count(*) from visitors where counted").fetchone()[0]
        every = counted if every is None else every
        if fixed is None:  # what a run costs besides the videos: the same run, all cached
            fixed, _ = kface("recordings", str(folder), "--store", str(db), "--out", str(out),
                             "--detect-fps", f"{rate:g}", "--workers", "2")
            results["fixed_s"] = round(fixed, 1)
        marginal = video_seconds / max(seconds - fixed, 1e-3)
        row = {"detect_fps": rate, "wall_s": round(seconds, 1),
               "x_real_time": round(video_seconds / seconds, 2),
               "x_real_time_marginal": round(marginal, 2),
               "hour_in_minutes": round(60 / marginal + fixed / 60, 1),
               "visitors": counted, "same_as_every_frame": counted == every}
        results["recordings"].append(row)
        print(json.dumps(row), flush=True)
    start = time.perf_counter()
    for n, video in enumerate(sorted(folder.glob("*.mp4"))):
        kface("video", str(video), "--out", str(work / f"video-{n}"))
    seconds = time.perf_counter() - start
    results["kface_video"] = {"wall_s": round(seconds, 1),
                              "x_real_time": round(video_seconds / seconds, 2)}
    best = max((r for r in results["recordings"] if r["same_as_every_frame"]),
               key=lambda r: r["x_real_time"])
    results["best_same_counts"] = {**best, "ratio_to_kface_video": round(
        best["x_real_time"] / results["kface_video"]["x_real_time"], 2),
        "goal_hour_in_15_min_met": best["hour_in_minutes"] <= 15}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
