"""Detection alone with reader threads: photos/s of res10 or YuNet over the same AAF
photos (decode + detect), with OpenCV's own threads (its default, the CPU count) and with
one, for 1, 2 and 3 reader threads (``core.threads.ordered_map``, a network per thread:
what ``kface predict`` and ``kface video`` do before classifying). Tells where a
detector's ceiling is on this machine.

``python bench/bench_readers.py [--photos 300] [--detector res10|yunet]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402

from core.images import load_image  # noqa: E402
from core.threads import ordered_map  # noqa: E402
from models.detector import DetectorConfig, get_detector  # noqa: E402

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--detector", choices=("res10", "yunet"), default="res10")
    args = ap.parse_args()
    paths = sorted((SHARED / "faces" / "aaf").glob("*.jpg"))[:args.photos]
    cfg = DetectorConfig(kind=args.detector)

    def faces(path: Path) -> int:
        return len(get_detector(cfg).detect(load_image(path)[0]))

    rows = []
    for opencv_threads in (cv2.getNumThreads(), 1):
        cv2.setNumThreads(opencv_threads)
        for readers in (1, 2, 3):
            start = time.perf_counter()
            found = sum(ordered_map(faces, paths, readers))
            seconds = time.perf_counter() - start
            rows.append({"detector": args.detector, "opencv_threads": opencv_threads,
                         "readers": readers, "photos_per_s": round(len(paths) / seconds, 1),
                         "faces": found})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["photos_per_s"]
    best = max(rows, key=lambda r: r["photos_per_s"])
    print(json.dumps({"photos": len(paths), "cpus": os.cpu_count(),
                      "best_vs_one_reader": round(best["photos_per_s"] / base, 2),
                      "best": best}))


if __name__ == "__main__":
    main()
