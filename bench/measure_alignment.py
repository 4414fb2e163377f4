"""How upright YuNet-aligned crops come out: AAF photos turned by known angles, aligned
with the landmarks YuNet finds on the turned photo, and the eye line measured where the
face truly is (the landmarks of the upright photo carried by the known rotation).

``python bench/measure_alignment.py [--photos 32]`` prints, per angle, the mean turn of
the eye line before alignment and what is left after it, with the one crop function's
transform (``models.face_crop.similarity_transform``: eyes level, scale and shift fitted)
and, for comparison, the free five-point least-squares similarity fit that InsightFace
uses (here ``cv2.estimateAffinePartial2D`` with every point an inlier, which refines to
the least-squares solution).
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
from models.detector_quality import turned_photo  # noqa: E402
from models.face_crop import alignment_template, eye_angle, similarity_transform  # noqa: E402

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=32)
    args = ap.parse_args()
    detector = FaceDetector(DetectorConfig(kind="yunet", confidence=0.5))
    photos = sorted((SHARED / "faces" / "aaf").glob("*.jpg"))[40::50][:args.photos]
    template = alignment_template(160)
    results = {}
    for degrees in (5, 12, 30):
        before, ours, free = [], [], []
        for path in photos:
            image = cv2.imread(str(path))
            upright, _ = turned_photo(image, 0)
            truth = np.asarray(detector.detect(upright)[0].landmarks)
            for signed in (-degrees, degrees):
                turned, matrix = turned_photo(image, signed)
                found = np.asarray(detector.detect(turned)[0].landmarks, np.float32)
                true_points = np.c_[truth, np.ones(5)] @ matrix.T
                before.append(abs(eye_angle(true_points)))
                for fit, acc in ((similarity_transform(found, template), ours),
                                 (cv2.estimateAffinePartial2D(
                                     found, template, method=cv2.RANSAC,
                                     ransacReprojThreshold=1e6)[0], free)):
                    acc.append(abs(eye_angle(np.c_[true_points, np.ones(5)] @ fit.T)))
        results[f"turned_{degrees}"] = {
            "faces": len(before), "eye_line_before_deg": round(float(np.mean(before)), 1),
            "left_after_ours_deg": round(float(np.mean(ours)), 1),
            "left_after_ours_p90_deg": round(float(np.percentile(ours, 90)), 1),
            "left_after_least_squares_5_point_fit_deg": round(float(np.mean(free)), 1)}
        print(json.dumps({degrees: results[f"turned_{degrees}"]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
