"""What the original's blobFromImage call (no mean) changes, on real faces.

``python bench/measure_detector.py [--n 600]``: AAF photos (as they are, and placed on
an 864x576 K-Face-sized background) and the scenes, detected with the mean (ours) and
without (the original's call); prints faces found above 0.9 and score statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from models.detector import DetectorConfig, FaceDetector  # noqa: E402
from tasks.sample_data import compose_photo  # noqa: E402

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))


def best_scores(detector: FaceDetector, images: list[np.ndarray]) -> np.ndarray:
    return np.array([float(detector.raw_detections(im)[:, 0].max()) for im in images])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    args = ap.parse_args()
    files = sorted((SHARED / "faces" / "aaf").glob("*.jpg"))
    files = files[:: max(1, len(files) // args.n)][: args.n]
    raw = [cv2.imread(str(f)) for f in files]
    placed = [compose_photo(im, i, "L1", "C7", "S001", "E01") for i, im in enumerate(raw)]
    ours = FaceDetector(DetectorConfig())
    original = FaceDetector(DetectorConfig(mean=(0.0, 0.0, 0.0)))
    result = {}
    for name, images in (("aaf_photos", raw), ("aaf_on_864x576", placed)):
        a, b = best_scores(ours, images), best_scores(original, images)
        result[name] = {
            "images": len(images),
            "found_mean": int((a > 0.9).sum()), "found_no_mean": int((b > 0.9).sum()),
            "median_best_score_mean": round(float(np.median(a)), 4),
            "median_best_score_no_mean": round(float(np.median(b)), 4),
            "mean_score_change": round(float(np.mean(b - a)), 4),
        }
    scenes = {}
    for f in sorted((SHARED / "scenes").iterdir()):
        im = cv2.imread(str(f))
        scenes[f.name] = {"mean": len(ours.detect(im)), "no_mean": len(original.detect(im))}
    result["scenes_faces_above_0.9"] = scenes
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
