"""Detection quality on real photos: phantom faces, faces found, boxes vs ground truth.

``python bench/measure_detector.py [--aaf-step 1] [--subjects 300]``

1. All-Age-Faces single-person photos: the share with exactly one face, for our rule
   (training settings at 0.9; inference settings at 0.8), for clipping every row (the
   previous behaviour: phantoms become faces) and for the original's rule (drop any row
   with a coordinate outside (0, 1)).
2. A K-Face-layout tree built from them (``--subjects`` x 16 photos, ground-truth
   ``Cnn.txt`` from the generator): the detect stage's function on each photo with the
   default (aspect-keeping 300x204 input) and the 300x300 reference input, both rules:
   exactly-one share, faces found vs the reference, chosen box vs the placed face.
3. The scenes: faces per photo at the inference settings (the group photo has 6).
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

from models.analyzer import inference_detector_config  # noqa: E402
from models.detector import DetectorConfig  # noqa: E402
from models.detector_quality import (  # noqa: E402
    count_faces,
    single_face_summary,
    truth_agreement,
)
from tasks.detect import detect_images  # noqa: E402
from tasks.sample_data import TreeSpec, build_kface_tree  # noqa: E402

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))
TRUTH_SPEC = TreeSpec(accessories=("S001", "S002"), lights=("L1", "L3"),
                      expressions=("E01", "E02"), cameras=("C4", "C19"))

SINGLE_PERSON_CONFIGS = {
    "ours_train_0.9": DetectorConfig(),
    "ours_inference_0.8": inference_detector_config(),
    "clip_all_0.9 (previous)": DetectorConfig(edge_rows="clip", input_aspect="square"),
    "clip_all_0.5 (previous inference)": DetectorConfig(edge_rows="clip", input_aspect="square",
                                                        confidence=0.5),
    "original_drop_0.9": DetectorConfig(edge_rows="drop", input_aspect="square"),
}
TREE_CONFIGS = {
    "ours (300x204, aspect kept)": DetectorConfig(),
    "reference (300x300, our rule)": DetectorConfig(input_aspect="square"),
    "original rule (300x300, drop)": DetectorConfig(input_aspect="square", edge_rows="drop"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--aaf-step", type=int, default=1, help="every Nth AAF photo")
    ap.add_argument("--subjects", type=int, default=300, help="K-Face-layout subjects (x16 photos)")
    args = ap.parse_args()
    cv2.setNumThreads(os.cpu_count() or 1)
    result: dict = {}
    start = time.perf_counter()
    photos = sorted((SHARED / "faces" / "aaf").glob("*.jpg"))[:: args.aaf_step]
    counts = count_faces(photos, SINGLE_PERSON_CONFIGS)
    result["aaf_single_person"] = {k: single_face_summary(v) for k, v in counts.items()}
    print(json.dumps({"aaf_single_person": result["aaf_single_person"]}, indent=1), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_kface_tree(SHARED / "faces" / "aaf", root, args.subjects, TRUTH_SPEC)
        paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
        tree: dict = {}
        found_reference = None
        for name, cfg in TREE_CONFIGS.items():
            t0 = time.perf_counter()
            table = detect_images(root, paths, cfg).to_pylist()
            seconds = time.perf_counter() - t0
            ok = sum(r["status"] == "ok" for r in table)
            tree[name] = {
                **single_face_summary(np.array([r["n_faces"] for r in table])),
                "photos_with_a_face": ok,
                "truth": truth_agreement(root, table),
                "ms_per_photo_1_process": round(1000 * seconds / len(table), 1),
            }
            if name.startswith("reference"):
                found_reference = ok
        for entry in tree.values():
            entry["faces_found_vs_reference"] = round(
                entry["photos_with_a_face"] / found_reference - 1, 4)
        result["kface_layout_tree"] = tree
        print(json.dumps({"kface_layout_tree": tree}, indent=1), flush=True)

    scenes = {}
    inference = inference_detector_config()
    for f in sorted((SHARED / "scenes").iterdir()):
        scenes[f.name] = int(count_faces([f], {"x": inference})["x"][0])
    result["scenes_faces_inference"] = scenes
    result["seconds"] = round(time.perf_counter() - start)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
