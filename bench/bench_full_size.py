"""K-Face at full size: the original selection's 583,200 photo paths in one run.

``build``: a K-Face-layout tree of 400 subjects with every path the original notebook
selects (substring rule: accessories S001-S003, 27 lights, expressions E01-E02, 9
cameras: 1,458 a subject), each path a link to one of 6 photos composed for its subject
(a real AAF face, none of the held-out fifth, on an 864x576 background, as
``kface sample-data`` composes them): every path is read and detected, the photos on disk
are 2,400. A CP949 metadata CSV with the faces' real labels.

``run``: the pipeline on that tree with ``selection.legacy_substring_match: true`` and the
quality recipe's detector (YuNet), as a user runs it (``kface run``, 2 spawned workers):
select + detect killed (SIGKILL, the whole process group) once about half the shards are
written, then resumed (which shards it recomputed); an unchanged rerun; ``kface status``;
new mtimes on every photo file (what a copy without its times gives): one read of the
files and no detection; the crops stage; a short training over all faces (a small
network, 30 steps, then the evaluate stage over the test people). Each step's wall time
and the peak RSS of the largest process (sampled every 0.5 s) are printed as JSON lines
and written to ``--work``/results.json.

``probe``: after ``run``, its memory-heavy steps again with today's code (``probe``'s
docstring). ``rate --detector res10 --subjects 20``: detection alone on the first
subjects (photos/s, and the wall time the whole set would take); ``dask --subjects 20
--workers 4``: the same detection on a local Dask cluster of that many worker processes
(``--dask-address``).

``status``: after ``run``, an unchanged rerun of the data stages, then ``kface status``
three times as it is now (the walk and a stat per photo compared with the manifest's
scan, the sharded stages' keys from ``stages/<stage>.plan.json``), and once as a run
folder without those records makes it (a full scan and every shard key planned): the
seconds and the ratio.

``python bench/bench_full_size.py build|run|probe|status|rate|dask [--work /work/big]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SUBJECTS, VARIANTS = 400, 6
ACCESSORIES = ("S001", "S002", "S003")
LIGHTS = ("L1", *(f"L{i}" for i in range(10, 20)), "L2", *(f"L{i}" for i in range(20, 30)),
          "L3", "L30", "L4", "L8", "L9")  # what the original's substrings match: 27
EXPRESSIONS = ("E01", "E02")
CAMERAS = ("C4", "C5", "C6", "C7", "C8", "C9", "C10", "C19", "C20")
ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def build(work: Path) -> dict:
    """The tree (see the module docstring); skipped when its metadata CSV is there."""
    import cv2
    import pandas as pd
    from aaf_quality import SHARED, held_out

    from tasks.sample_data import compose_photo, write_metadata_csv

    tree = work / "tree"
    if (tree / "KFace_metadata.csv").exists():
        return {"tree": str(tree), "built": False}
    start = time.perf_counter()
    aaf = SHARED / "faces" / "aaf"
    labels = pd.read_csv(aaf / "labels.csv")
    labels = labels[~labels.file.map(held_out)].sample(SUBJECTS, random_state=0)
    labels["age_band"] = (labels.age // 10 * 10).astype(int).astype(str) + "s"
    photos = work / "photos"
    links = 0
    rows = []
    for k, rec in enumerate(labels.itertuples(index=False)):
        sid = f"{19000000 + k:08d}"
        face = cv2.imread(str(aaf / rec.file))
        variants = []
        for v in range(VARIANTS):
            path = photos / sid / f"{v}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = compose_photo(face, zlib.crc32(f"{sid}/{v}".encode()), LIGHTS[v],
                                  CAMERAS[v], ACCESSORIES[v % 3], EXPRESSIONS[v % 2],
                                  (864, 576))
            cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
            variants.append(path)
        for s in ACCESSORIES:
            for light in LIGHTS:
                for e in EXPRESSIONS:
                    folder = tree / "High_Resolution" / sid / s / light / e
                    folder.mkdir(parents=True, exist_ok=True)
                    for c in CAMERAS:
                        pick = zlib.crc32(f"{s}/{light}/{e}/{c}".encode()) % VARIANTS
                        (folder / f"{c}.jpg").symlink_to(variants[pick])
                        links += 1
        rows.append((sid, rec.age_band, rec.gender))
    write_metadata_csv(tree / "KFace_metadata.csv", rows)
    return {"tree": str(tree), "built": True, "paths": links, "photos": SUBJECTS * VARIANTS,
            "seconds": round(time.perf_counter() - start, 1)}


class PeakRSS:
    """The largest resident memory of any one process of a process group, sampled."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                root = psutil.Process(self.pid)
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        self.peak = max(self.peak, proc.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.stop.wait(0.5)

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return round(self.peak / 2 ** 30, 2)


def kface(args: list[str], kill_when=None) -> dict:
    """Run ``kface ARGS`` in its own session; with ``kill_when()`` true, SIGKILL the
    group. Returns seconds, exit code, peak RSS of the largest process, the output's end."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    rss = PeakRSS(proc.pid)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    killed = False
    while proc.poll() is None:
        if kill_when is not None and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.5)
    proc.wait()
    reader.join(timeout=5)
    return {"seconds": round(time.perf_counter() - start, 1), "rc": proc.returncode,
            "killed": killed, "peak_rss_gb": rss.done(), "tail": "".join(lines[-6:])}


def config_args(work: Path, out: Path, detector: str, subjects: int | None = None) -> list:
    tree = work / "tree" if subjects is None else subset(work, subjects)
    return ["--data-root", str(tree), "--metadata", str(work / "tree" / "KFace_metadata.csv"),
            "--out", str(out), "--workers", "2", "--set",
            "selection.legacy_substring_match=true", "--set", f"detector.kind={detector}",
            "--set", "crops.size=112", "--set", "crops.align=true"]


def subset(work: Path, subjects: int) -> Path:
    """A tree of the first ``subjects`` subjects: their folders, with links to the same
    photos (the select stage does not follow linked folders)."""
    part = work / f"tree-{subjects}"
    if not part.exists():
        full = work / "tree" / "High_Resolution"
        for sid in sorted(os.listdir(full))[:subjects]:
            for link in (full / sid).rglob("*.jpg"):
                target = part / "High_Resolution" / link.relative_to(full)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(os.readlink(link))
    return part


def shard_files(out: Path, folder: str = "detections") -> list[Path]:
    return sorted((out / folder).glob("shard-*.parquet"))


def summary(out: Path, stage: str) -> dict:
    path = out / "stages" / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run(work: Path) -> list[dict]:
    out = work / "run"
    args = ["run", *config_args(work, out, "yunet"), "--stages", "select,detect"]
    results = []

    def record(step: str, res: dict, **extra) -> None:
        row = {"step": step, **{k: v for k, v in res.items() if k != "tail"}, **extra}
        print(json.dumps(row), flush=True)
        results.append(row)
        if res["rc"] not in (0, -9) and not res["killed"]:
            raise SystemExit(f"{step} failed:\n{res['tail']}")

    half = SUBJECTS // 2
    res = kface(args, kill_when=lambda: len(shard_files(out)) >= half)
    done = {p.name: p.stat().st_mtime_ns for p in shard_files(out)}
    record("select+detect, killed at half", res, shards_done=len(done))
    res = kface(args)
    detect, select = summary(out, "detect"), summary(out, "select")
    untouched = all((out / "detections" / n).stat().st_mtime_ns == m for n, m in done.items())
    record("resumed", res, shards_recomputed=detect.get("shards_computed"),
           shards_reused=detect.get("shards_reused"), finished_shards_untouched=untouched,
           photos=detect.get("rows_in"), status_counts=detect.get("status_counts"),
           detect_seconds=detect.get("seconds"), select_seconds=select.get("seconds"),
           files_hashed=select.get("files_hashed"),
           shards_mb=round(sum(p.stat().st_size for p in shard_files(out)) / 2 ** 20, 1))
    res = kface(args)
    record("unchanged rerun", res, shards_recomputed=summary(out, "detect").get(
        "shards_computed"), files_hashed=summary(out, "select").get("files_hashed"))
    res = kface(["status", "--out", str(out)])
    record("kface status", res)
    now = time.time()  # new mtimes on every photo: what a copy without its times gives
    for photo in (work / "photos").rglob("*.jpg"):
        os.utime(photo, (now, now))
    res = kface(args)
    record("every photo with new mtimes", res,
           files_hashed=summary(out, "select").get("files_hashed"),
           shards_recomputed=summary(out, "detect").get("shards_computed"))
    res = kface(["run", *config_args(work, out, "yunet"), "--stages", "merge,split,crops"])
    crops = summary(out, "crops")
    record("merge, split, crops", res, faces=crops.get("rows_out"),
           crops_seconds=crops.get("seconds"),
           crops_mb=round(sum(p.stat().st_size for p in shard_files(out, "crops")) / 2 ** 20))
    res = kface(["run", *config_args(work, out, "yunet"), "--stages", "train,evaluate",
                 "--set", "model.backbone=small_cnn", "--set", "train.epochs=1",
                 "--set", "train.steps_per_epoch=30", "--set", "train.batch_size=32"])
    train = json.loads((out / "experiments" / "default" / "stages" / "train.json").read_text()
                       ) if res["rc"] == 0 else {}
    record("short training over all faces, and evaluate", res,
           train_faces=train.get("train_examples"), val_faces=train.get("val_examples"))
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def probe(work: Path) -> list[dict]:
    """After ``run``: the two memory-heavy steps again on its run folder, with today's
    code: ``select`` after new mtimes on every photo (every file hashed), then merge and
    split recomputed (their outputs removed) with the crop plan read (every crop shard
    reused); and ``kface status``."""
    out, rows = work / "run", []
    args = ["run", *config_args(work, out, "yunet")]
    now = time.time()
    for photo in (work / "photos").rglob("*.jpg"):
        os.utime(photo, (now, now))
    for step, extra, before in (
            ("select, every photo with new mtimes", ["--stages", "select"], ()),
            ("merge and split recomputed, crops planned (all reused)",
             ["--stages", "merge,split,crops"], ("faces.parquet", "split.parquet")),
            ("kface status", None, ())):
        for name in before:
            (out / name).unlink(missing_ok=True)
        res = kface([*args, *extra] if extra else ["status", "--out", str(out)])
        res.pop("tail")
        rows.append({"step": step, **res,
                     "files_hashed": summary(out, "select").get("files_hashed")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def status(work: Path) -> list[dict]:
    """``kface status`` with the records a run keeps (the walk's names in
    ``stages/select.json``, the plans' keys in ``stages/<stage>.plan.json``) and
    without them (hidden for one call, then put back), on the same run folder."""
    out, rows = work / "run", []
    rerun = kface(["run", *config_args(work, out, "yunet"), "--stages",
                   "select,detect,merge,split,crops"])
    rerun.pop("tail")
    rows.append({"step": "unchanged rerun of the data stages", **rerun})
    print(json.dumps(rows[-1]), flush=True)
    now = []
    for _ in range(3):
        res = kface(["status", "--out", str(out)])
        now.append(res)
    report = subprocess.run([sys.executable, "-m", "cli", "status", "--out", str(out),
                             "--json"], cwd=REPO, env=ENV, capture_output=True, text=True)
    states = {s["stage"]: s["state"] for s in json.loads(report.stdout)["stages"]}
    select_file = out / "stages" / "select.json"
    select = select_file.read_text()
    indexes = sorted((out / "stages").glob("*.plan.json"))
    hidden = [p.rename(p.with_name(p.name + ".hidden")) for p in indexes]
    try:
        select_file.write_text(json.dumps({k: v for k, v in json.loads(select).items()
                                           if k != "listing_digest"}))
        before = kface(["status", "--out", str(out)])
    finally:
        select_file.write_text(select)
        for p, original in zip(hidden, indexes, strict=True):
            p.rename(original)
    seconds = sorted(r["seconds"] for r in now)
    rows.append({"step": "kface status, with the run's records (3 calls)",
                 "seconds": seconds, "peak_rss_gb": max(r["peak_rss_gb"] for r in now),
                 "rc": now[-1]["rc"], "states": states})
    rows.append({"step": "kface status, without them (a full scan, every shard key)",
                 "seconds": before["seconds"], "peak_rss_gb": before["peak_rss_gb"],
                 "rc": before["rc"], "ratio": round(before["seconds"] / seconds[1], 1)})
    for row in rows[1:]:
        print(json.dumps(row), flush=True)
    return rows


def rate(work: Path, detector: str, subjects: int) -> dict:
    out = work / f"rate-{detector}-{subjects}"
    res = kface(["run", *config_args(work, out, detector, subjects), "--stages",
                 "select,detect"])
    detect = summary(out, "detect")
    photos = detect.get("rows_in", 0)
    per_s = photos / detect["seconds"] if detect.get("seconds") else None
    row = {"step": f"detection rate, {detector}, {subjects} subjects", **res, "photos": photos,
           "detect_seconds": detect.get("seconds"),
           "photos_per_s": None if per_s is None else round(per_s, 1),
           "full_set_hours": None if per_s is None else round(583_200 / per_s / 3600, 2)}
    row.pop("tail")
    print(json.dumps(row), flush=True)
    return row


def dask(work: Path, subjects: int, workers: int) -> dict:
    """The detection of ``subjects`` subjects on a local Dask cluster of ``workers``
    single-threaded worker processes (``kface run --dask-address``)."""
    from dask.distributed import LocalCluster

    out = work / f"dask-{subjects}-{workers}"
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        res = kface(["run", *config_args(work, out, "yunet", subjects), "--stages",
                     "select,detect", "--dask-address", cluster.scheduler_address])
    detect = summary(out, "detect")
    row = {"step": f"dask, {workers} workers, {subjects} subjects", **res,
           "photos": detect.get("rows_in"), "detect_seconds": detect.get("seconds"),
           "ran_on": detect.get("ran_on")}
    row.pop("tail")
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["build", "run", "probe", "status", "rate", "dask"])
    ap.add_argument("--work", type=Path, default=Path("/work/big"))
    ap.add_argument("--detector", default="res10")
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "build":
        print(json.dumps(build(args.work)))
    elif args.step == "run":
        build(args.work)
        run(args.work)
    elif args.step == "probe":
        probe(args.work)
    elif args.step == "status":
        status(args.work)
    elif args.step == "rate":
        rate(args.work, args.detector, args.subjects)
    else:
        dask(args.work, args.subjects, args.workers)


if __name__ == "__main__":
    main()
