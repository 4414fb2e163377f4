"""The shipped model's own speed, as a user runs it (no ``--model``, default settings):
today's path against the one before 2026-12-07, on the same inputs in the same run.

``python bench/bench_shipped.py [--photos 1200] [--frames 0] [--skip-video]``

- **before**: the shipped ``model.keras`` exported as ``kface export`` did until then
  (the mirror pass inside the graph, tf2onnx's five-node PReLUs), with its labels.json,
  and YuNet on OpenCV (``KFACE_YUNET_RUNTIME=opencv``): what ``kface predict`` and
  ``kface video`` ran.
- **now**: the shipped folder as it is (PReLUs rewritten by ``models.onnx_graph``, no
  mirror pass: ``mirror: false``), YuNet on ONNX Runtime.
- **now --mirror**: the same with the mirror pass asked for.

``predict``: ``kface predict`` on the first 200 and the first ``--photos`` All-Age-Faces
portraits, each as the command a user runs (process start and model load included); the
marginal rate is (photos - 200) / (difference in seconds), the issue's measure.
``video``: ``kface video`` on a 1280x720 10 fps clip of real faces (``bench_shop``'s),
each as the command, minus the same command's time on 10 frames (start and load): the
frames/s, and the tracks and visitors each counts. Prints JSON, with whether the goals
(predict >= 100 photos/s, video >= 30 FPS) are met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))
SHIPPED = REPO / "models" / "data" / "default"


def before_folder(folder: Path) -> Path:
    """The shipped model as the ONNX export made it before: flip-averaged graph, no
    rewrite (tf2onnx straight from Keras), the labels.json without the mirror keys."""
    from models.classifier import load_classifier

    folder.mkdir(parents=True, exist_ok=True)
    model = load_classifier(SHIPPED / "model.keras", compile=False)
    model.predict_on_batch(__import__("numpy").zeros((1, 112, 112, 3), "float32"))
    model.export(str(folder / "model.onnx"), format="onnx", verbose=False)
    labels = json.loads((SHIPPED / "labels.json").read_text())
    for key in ("mirror", "onnx_mirror"):
        labels.pop(key, None)
    (folder / "labels.json").write_text(json.dumps(labels))
    shutil.copy(SHIPPED / "soft_confusion.json", folder / "soft_confusion.json")
    return folder


def kface(*args: str, before: bool = False) -> float:
    """Seconds ``kface ARGS`` takes as a command; ``before``: YuNet on OpenCV's
    FaceDetectorYN, as it ran before (``KFACE_YUNET_RUNTIME=opencv``)."""
    start = time.perf_counter()
    env = {**os.environ, **({"KFACE_YUNET_RUNTIME": "opencv"} if before else {})}
    res = subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO,
                         capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"kface {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - start


def photo_folder(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for photo in sorted((SHARED / "faces" / "aaf").glob("*.jpg"))[:count]:
        (folder / photo.name).symlink_to(photo)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=1200)
    ap.add_argument("--skip-video", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-shipped-"))
    variants = {"before": ["--model", str(before_folder(work / "before"))],
                "now": [], "now --mirror": ["--mirror"]}
    small, large = photo_folder(work / "p200", 200), photo_folder(work / "pN", args.photos)
    results: dict = {"photos": args.photos, "cpus": os.cpu_count(), "predict": {},
                     "video": {}}
    for name, extra in variants.items():
        before = name == "before"
        t_small = kface("predict", str(small), "--out", str(work / "o"), *extra,
                        before=before)
        t_large = kface("predict", str(large), "--out", str(work / "o"), *extra,
                        before=before)
        results["predict"][name] = {
            "seconds_200": round(t_small, 1), f"seconds_{args.photos}": round(t_large, 1),
            "marginal_photos_per_s": round((args.photos - 200) / (t_large - t_small), 1)}
    if not args.skip_video:
        from bench_shop import clip_720p

        clip = clip_720p(work / "shop720.mp4")
        for name, extra in variants.items():
            before = name == "before"
            start = kface("video", str(clip), "--max-frames", "10", "--out",
                          str(work / "v"), *extra, before=before)
            seconds = kface("video", str(clip), "--out", str(work / "v"), *extra,
                            before=before)
            summary = json.loads((work / "v" / "summary.json").read_text())
            results["video"][name] = {
                "frames": summary["frames"], "seconds": round(seconds, 1),
                "fps": round((summary["frames"] - 10) / (seconds - start), 1),
                "tracks": summary["tracks"], "visitors": summary["visitors"]}
    before = results["predict"]["before"]["marginal_photos_per_s"]
    results["predict_ratio_now_vs_before"] = round(
        results["predict"]["now"]["marginal_photos_per_s"] / before, 2)
    if results["video"]:
        results["video_ratio_now_vs_before"] = round(
            results["video"]["now"]["fps"] / results["video"]["before"]["fps"], 2)
    results["goals"] = {  # issue 40's, on 2 CPU cores with the shipped model
        "predict >= 100 photos/s": results["predict"]["now"]["marginal_photos_per_s"] >= 100,
        **({"video >= 30 FPS at 720p": results["video"]["now"]["fps"] >= 30}
           if results["video"] else {})}
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
