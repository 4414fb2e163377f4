"""Video inference speed: frames/s on a 640x480 clip with one face, this CPU, small
backbone and ResNet50, ours (`analyze_video`: detect, one batched classifier call per
frame, tracking, annotated output) vs the original's webcam loop (detect with no mean,
then one ``model.predict`` call per face) on the same clip, same model, same run; for the
quality recipe's network also ours on its ONNX export (ONNX Runtime, no TensorFlow),
with the default reader threads and with one (frames detected in turn).
``python bench/bench_video.py [--frames 150] [--detector res10|yunet]``: ours detects with
the given network (the original's loop always uses res10). Models are untrained: speed
only.
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

from core.storage import write_json_atomic  # noqa: E402
from models.classifier import ModelConfig, build_classifier  # noqa: E402
from models.detector import DetectorConfig, resolve_weights  # noqa: E402

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_clip(path: Path, frames: int) -> None:
    face = cv2.resize(cv2.imread(str(sorted((SHARED / "faces" / "aaf").glob("*.jpg"))[7])),
                      (160, 180))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (640, 480))
    for i in range(frames):
        frame = np.full((480, 640, 3), 100, np.uint8)
        x = 100 + (i * 3) % 300
        frame[150:330, x:x + 160] = face
        writer.write(frame)
    writer.release()


def save_model(folder: Path, cfg: ModelConfig, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    build_classifier(cfg, size).save(folder / "model.keras")
    write_json_atomic(folder / "labels.json", {
        "gender": ["M", "F"], "age_band": ["20s", "30s", "40s", "50s"], "input_size": size,
        "crop": {"size": size, "margin": 0.2, "margin_mode": "symmetric"}})


def original_loop(clip: Path, model, size: int) -> float:
    model_file, config = resolve_weights(DetectorConfig())
    net = cv2.dnn.readNetFromCaffe(str(config), str(model_file))
    cap = cv2.VideoCapture(str(clip))
    frames, start = 0, time.perf_counter()
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        rows, cols = frame.shape[:2]
        net.setInput(cv2.dnn.blobFromImage(frame, 1.0, (300, 300)))
        for d in net.forward()[0, 0]:
            if float(d[2]) > 0.9 and 0 < d[3] < 1 and 0 <= d[4] < 1 and 0 < d[5] < 1 \
                    and 0 < d[6] < 1:
                left, top = int(d[3] * cols), int(d[4] * rows)
                right, bottom = int(d[5] * cols), int(d[6] * rows)
                crop = cv2.cvtColor(frame[top:bottom, left:right], cv2.COLOR_BGR2RGB)
                crop = cv2.resize(crop, (size, size)).reshape(-1, size, size, 3)
                model.predict(crop, verbose=0)
        frames += 1
    return frames / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--detector", choices=("res10", "yunet"), default="res10")
    args = ap.parse_args()
    from inference.video import analyze_video
    from models.analyzer import FaceAnalyzer

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = tmp / "clip.mp4"
        make_clip(clip, args.frames)
        for name, cfg, size in (("mobilenet_v3_small@128", ModelConfig(
                backbone="mobilenet_v3_small"), 128),
                ("mobilenet_0.25@160 (quality recipe)", ModelConfig(backbone="mobilenet"), 160),
                ("resnet50@224", ModelConfig(), 224)):
            folder = tmp / name
            save_model(folder, cfg, size)
            analyzer = FaceAnalyzer(folder, detector_kind=args.detector)
            analyzer.analyze(np.full((480, 640, 3), 100, np.uint8))  # warm-up
            start = time.perf_counter()
            summary = analyze_video(analyzer, str(clip), tmp / f"out-{name}")
            ours = summary["frames"] / (time.perf_counter() - start)
            onnx_fps = onnx_one_reader_fps = None
            if "recipe" in name:  # the same network exported, on ONNX Runtime
                from models.export import export_model

                export_model(folder, tmp / "recipe-onnx", "onnx")
                onnx = FaceAnalyzer(tmp / "recipe-onnx", detector_kind=args.detector)
                onnx.analyze(np.full((480, 640, 3), 100, np.uint8))
                start = time.perf_counter()
                summary = analyze_video(onnx, str(clip), tmp / "out-recipe-onnx")
                onnx_fps = round(summary["frames"] / (time.perf_counter() - start), 1)
                start = time.perf_counter()  # frames detected in turn, not ahead
                summary = analyze_video(onnx, str(clip), tmp / "out-onnx-1", readers=1)
                onnx_one_reader_fps = round(summary["frames"] / (time.perf_counter()
                                                                 - start), 1)
            original = original_loop(clip, analyzer.model.model, size)
            results[name] = {"detector": args.detector, "ours_fps": round(ours, 1),
                             "ours_onnx_fps": onnx_fps,
                             "ours_onnx_one_reader_fps": onnx_one_reader_fps,
                             "original_fps": round(original, 1),
                             "ratio": round(ours / original, 2), "frames": summary["frames"]}
            print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
