"""Detection benchmark: the original notebook's serial loop vs our detect stage, same inputs,
same run. ``python bench/bench_detect.py [--small 6 --large 25 --big 3] [--detector yunet]``

``--detector yunet`` runs our stage with YuNet (the original's loop is res10, as it was),
and also our stage with res10 on the large tree, so that faces found and the agreement
with the placed faces compare the two networks in the same run.

Prints, for each approach: total seconds at two sizes, steady-state img/s (from the
difference of the two sizes, so fixed start-up cancels), fixed overhead, the ratio, and
the agreement (same images with a face; mean IoU of the best boxes). Also 1 vs 2 workers,
peak RSS at N and 4N images, and a 4000x3000 set where decoding dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402

from models.detector import DetectorConfig, box_iou, resolve_weights  # noqa: E402
from models.detector_quality import truth_agreement  # noqa: E402
from tasks.sample_data import TreeSpec, build_kface_tree  # noqa: E402
from tasks.select import DataConfig, SelectionConfig, select_images  # noqa: E402

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))
LIGHTS = ("L1", "L2", "L3", "L4", "L8", "L9", "L12", "L13", "L22")
CAMS = ("C4", "C5", "C6", "C7", "C8", "C9", "C10", "C19", "C20")


def make_tree(root: Path, n_subjects: int, size=(864, 576)) -> list[str]:
    """A K-Face tree of ``n_subjects`` x 9 lights x 9 cameras = 81 selected photos each."""
    if not (root / "High_Resolution").exists():
        build_kface_tree(SHARED / "faces" / "aaf", root, n_subjects,
                         TreeSpec(lights=LIGHTS, cameras=CAMS, size=size))
    table, _ = select_images(DataConfig(root=root), SelectionConfig())
    return table.column("path").to_pylist()


def original_loop(root: Path, paths: list[str]) -> tuple[float, dict]:
    """The blog's loop: serial, full imread, blobFromImage to 300x300, one forward each,
    OpenCV's default threads, its edge rule (drop rows outside (0, 1)); same weights, mean
    and threshold as ours."""
    cfg = DetectorConfig()
    model, config = resolve_weights(cfg)
    net = cv2.dnn.readNetFromCaffe(str(config), str(model))
    boxes = {}
    start = time.perf_counter()
    for rel in paths:
        img = cv2.imread(str(root / rel))
        rows, cols = img.shape[:2]
        blob = cv2.dnn.blobFromImage(img, 1.0, (300, 300), cfg.mean)
        net.setInput(blob)
        detections = net.forward()
        for d in detections[0, 0]:
            if float(d[2]) > cfg.confidence and 0 < d[3] < 1 and 0 <= d[4] < 1 \
                    and 0 < d[5] < 1 and 0 < d[6] < 1:
                boxes.setdefault(rel, (int(d[3] * cols), int(d[4] * rows),
                                       int(d[5] * cols), int(d[6] * rows)))
    return time.perf_counter() - start, boxes


def ours(root: Path, paths: list[str], workers: int, work: Path, shard_size: int = 100,
         detector: str = "res10") -> tuple[float, dict, float]:
    """Our stage end to end through the CLI (Prefect, temporary server, spawn workers)."""
    out = work / f"out-{len(paths)}-{workers}-{detector}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PREFECT_API_URL": "", "PREFECT_HOME": str(work / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = work / f"{out.name}.log"
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = psutil.Popen([sys.executable, "-m", "cli", "run", "--data-root",
                             str(root), "--out", str(out), "--stages", "select,detect",
                             "--workers", str(workers), "--shard-size", str(shard_size),
                             "--set", f"detector.kind={detector}"], cwd=REPO, env=env,
                            stdout=sink, stderr=subprocess.STDOUT)
    peak = 0
    while proc.poll() is None:  # peak RSS of the whole process tree (CLI, server, workers)
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"kface run failed with exit code {proc.returncode}: "
                         f"{log.read_text()[-2000:]}")
    peak_mb = peak / 2**20
    table = ds.dataset(out / "detections").to_table().to_pylist()
    boxes = {r["path"]: (r["x1"], r["y1"], r["x2"], r["y2"]) for r in table
             if r["status"] == "ok"}
    return seconds, boxes, peak_mb


def agreement(a: dict, b: dict) -> tuple[int, int, float]:
    both = set(a) & set(b)
    ious = [box_iou(a[p], b[p]) for p in both]
    return len(both), len(set(a) ^ set(b)), float(np.mean(ious)) if ious else 0.0


def truth(root: Path, boxes: dict) -> dict:
    """The chosen boxes vs the generator's ground truth (Cnn.txt)."""
    rows = [{"path": p, "status": "ok", "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3]}
            for p, b in boxes.items()]
    return truth_agreement(root, rows)


def steady(n1, t1, n2, t2) -> tuple[float, float]:
    rate = (n2 - n1) / (t2 - t1)
    return rate, t1 - n1 / rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=6, help="subjects (x81 images)")
    ap.add_argument("--large", type=int, default=25, help="subjects (x81 images)")
    ap.add_argument("--big", type=int, default=3,
                    help="subjects at 4000x3000 (timed at 1 and this many; 0 to skip)")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--detector", choices=("res10", "yunet"), default="res10",
                    help="our stage's network (the original's loop is res10)")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    kind = args.detector
    results: dict = {"cpu_count": os.cpu_count(), "opencv": cv2.__version__, "detector": kind}

    # warm-up (not timed): creates the Prefect database in PREFECT_HOME, as any earlier run
    # on a user's machine has; the first run ever pays ~5 s more for that
    warm = work / "tree-1"
    ours(warm, make_tree(warm, 1), 2, work, detector=kind)
    timings = {}
    sizes = {}
    for subjects in (args.small, args.large):
        root = work / f"tree-{subjects}"
        paths = make_tree(root, subjects)
        n = sizes[subjects] = len(paths)
        t_orig, b_orig = original_loop(root, paths)
        t_ours, b_ours, peak = ours(root, paths, 2, work, detector=kind)
        same, differ, iou = agreement(b_orig, b_ours)
        timings[n] = (t_orig, t_ours)
        t_o, t_u = truth(root, b_orig), truth(root, b_ours)
        results[f"n{n}"] = {"original_s": round(t_orig, 1), "ours_s": round(t_ours, 1),
                            "peak_rss_mb": round(peak), "faces_original": len(b_orig),
                            "faces_ours": len(b_ours), "faces_both": same,
                            "faces_differ": differ, "mean_iou": round(iou, 4),
                            "truth_match_original": t_o["match_rate"],
                            "truth_match_ours": t_u["match_rate"],
                            "truth_mean_iou_original": t_o["mean_iou"],
                            "truth_mean_iou_ours": t_u["mean_iou"]}
        print(json.dumps({n: results[f"n{n}"]}), flush=True)
    n1, n2 = sizes[args.small], sizes[args.large]
    r_orig, o_orig = steady(n1, timings[n1][0], n2, timings[n2][0])
    r_ours, o_ours = steady(n1, timings[n1][1], n2, timings[n2][1])
    results["steady_img_s"] = {"original": round(r_orig, 1), "ours": round(r_ours, 1),
                               "ratio": round(r_ours / r_orig, 2)}
    results["fixed_overhead_s"] = {"original": round(o_orig, 1), "ours": round(o_ours, 1)}

    root = work / f"tree-{args.large}"
    paths = make_tree(root, args.large)
    t1, _, _ = ours(root, paths, 1, work, detector=kind)
    results["workers"] = {"1": round(t1, 1), "2": round(timings[n2][1], 1),
                          "speedup_2_vs_1": round(t1 / timings[n2][1], 2)}
    if kind != "res10":  # the same photos through our stage with res10, for the networks
        t_res10, b_res10, _ = ours(root, paths, 2, work)
        t_r, large = truth(root, b_res10), results[f"n{n2}"]
        results["res10_stage_same_photos"] = {
            "seconds": round(t_res10, 1), "faces_res10": len(b_res10),
            f"faces_{kind}": large["faces_ours"], "truth_match_res10": t_r["match_rate"],
            f"truth_match_{kind}": large["truth_match_ours"],
            "truth_mean_iou_res10": t_r["mean_iou"],
            f"truth_mean_iou_{kind}": large["truth_mean_iou_ours"],
            f"stage_time_res10_over_{kind}": round(t_res10 / timings[n2][1], 2)}

    if args.big:
        big = {}
        for subjects in (1, args.big):
            root = work / f"big-{subjects}"
            paths = make_tree(root, subjects, size=(4000, 3000))
            t_orig, b_orig = original_loop(root, paths)
            t_ours, b_ours, _ = ours(root, paths, 2, work, shard_size=20, detector=kind)
            same, differ, iou = agreement(b_orig, b_ours)
            big[len(paths)] = (t_orig, t_ours)
            results[f"4000x3000_n{len(paths)}"] = {
                "original_s": round(t_orig, 1), "ours_s": round(t_ours, 1),
                "mean_iou": round(iou, 4), "faces_both": same, "faces_differ": differ}
            print(json.dumps({f"4000x3000_n{len(paths)}": results[f"4000x3000_n{len(paths)}"]}),
                  flush=True)
        (m1, (o1, u1)), (m2, (o2, u2)) = sorted(big.items())
        rb_orig, _ = steady(m1, o1, m2, o2)
        rb_ours, _ = steady(m1, u1, m2, u2)
        results["4000x3000_steady_img_s"] = {"original": round(rb_orig, 1),
                                             "ours": round(rb_ours, 1),
                                             "ratio": round(rb_ours / rb_orig, 2)}
    print(json.dumps(results, indent=2))
    name = "bench_detect.json" if kind == "res10" else f"bench_detect-{kind}.json"
    (work / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
