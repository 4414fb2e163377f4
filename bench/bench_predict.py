"""``kface predict`` speed: today's path (Keras, one classifier call per photo, photos
read and detected in turn) vs ONNX Runtime with the faces of 16 photos classified
together while reader threads read and detect the next photos (``kface predict``'s
defaults), on the same real photos, in one run, each as the ``kface predict`` command a
user runs (process start, model load and TensorFlow's import included). Also Keras
batched, ONNX per photo and ONNX batched without reader threads, so the causes show
apart; peak RSS of each process; the largest difference between the Keras and the ONNX
answers; and whether the ONNX process imported TensorFlow at all.

``python bench/bench_predict.py [--photos 600] [--size 160] [--detector res10|yunet]``:
All-Age-Faces photos (one
face each), the quality recipe's network (MobileNet v1 0.25, exact-age head, mirror
averaging) untrained: speed only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.storage import write_json_atomic  # noqa: E402
from core.threads import READERS  # noqa: E402

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))
# runs kface predict in this process and reports its peak RSS and whether TF was imported
RUNNER = ("import runpy, sys\n"
          "sys.argv = ['kface', *sys.argv[1:]]\n"
          "try:\n"
          "    runpy.run_module('cli', run_name='__main__')\n"
          "finally:\n"
          "    hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM')]\n"
          "    rss = int(hwm[0].split()[1]) / 1024  # (ru_maxrss survives exec)\n"
          "    print(f'BENCH {rss:.0f} {\"tensorflow\" in sys.modules}', file=sys.stderr)\n")


def save_model(folder: Path, size: int) -> None:
    from models.classifier import ModelConfig, build_classifier, flip_averaged

    folder.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(backbone="mobilenet", alpha=0.25, weights="none", flip_average=True,
                      exact_age=True)
    flip_averaged(build_classifier(cfg, size, exact_age=True)).save(folder / "model.keras")
    write_json_atomic(folder / "labels.json", {
        "gender": ["M", "F"], "age_band": ["20s", "30s", "40s", "50s"], "input_size": size,
        "crop": {"size": size, "margin": 0.2, "margin_mode": "symmetric"}})


def run_predict(photos: Path, model: Path, out: Path, batch: int, detector: str,
                threads: int | None) -> dict:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", RUNNER, "predict", str(photos), "--model",
                          str(model), "--out", str(out), "--batch", str(batch),
                          "--detector", detector,
                          *(["--threads", str(threads)] if threads else [])],
                         cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    line = next(x for x in res.stderr.splitlines() if x.startswith("BENCH "))
    _, rss, tf = line.split()
    entries = json.loads((out / "predictions.json").read_text())
    return {"seconds": round(seconds, 1), "photos_per_s": round(len(entries) / seconds, 1),
            "peak_rss_mb": int(rss), "imported_tensorflow": tf == "True",
            "faces": sum(len(e["faces"]) for e in entries), "entries": entries}


def largest_difference(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert [f["box"] for f in x["faces"]] == [f["box"] for f in y["faces"]], x["path"]
        for fx, fy in zip(x["faces"], y["faces"], strict=True):
            for key in ("gender_probs", "age_band_probs"):
                worst = max(worst, *(abs(fx[key][k] - fy[key][k]) for k in fx[key]))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=600)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--detector", choices=("res10", "yunet"), default="res10",
                    help="the detector of every path (the model is res10-trained)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    photos = work / "photos"
    photos.mkdir()
    for f in sorted((SHARED / "faces" / "aaf").glob("*.jpg"))[:args.photos]:
        (photos / f.name).symlink_to(f.resolve())
    save_model(work / "keras", args.size)
    from models.export import export_model

    export_model(work / "keras", work / "onnx", "onnx")
    runs = {}
    for name, model, batch, threads in (("keras_per_photo (today)", "keras", 1, 1),
                                        ("keras_batched", "keras", 16, 1),
                                        ("onnx_per_photo", "onnx", 1, 1),
                                        ("onnx_batched", "onnx", 16, 1),
                                        ("onnx_batched_readers", "onnx", 16, None)):
        runs[name] = run_predict(photos, work / model, work / f"out-{name.split()[0]}", batch,
                                 args.detector, threads)
        print(name, {k: v for k, v in runs[name].items() if k != "entries"}, flush=True)
    today, onnx = runs["keras_per_photo (today)"], runs["onnx_batched_readers"]
    result = {
        "photos": args.photos, "input_size": args.size, "detector": args.detector,
        "cpus": os.cpu_count(),
        **{name: {k: v for k, v in r.items() if k != "entries"} for name, r in runs.items()},
        "readers": READERS,
        "onnx_batched_readers_vs_today": round(onnx["photos_per_s"] / today["photos_per_s"],
                                               2),
        "onnx_batched_vs_today": round(runs["onnx_batched"]["photos_per_s"]
                                       / today["photos_per_s"], 2),
        "max_probability_difference": largest_difference(today["entries"], onnx["entries"]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
