"""A shop's day: the visitors store at scale, the cameras one service keeps up with, and
its memory over a long run.

``python bench/bench_shop.py store [--visitors 1000000] [--postgres URL]``
    A store of ``--visitors`` visitors over 100 days (10,000 a day, 2 cameras), SQLite
    (and PostgreSQL with ``--postgres``): seconds to write them, then one day's hourly
    counts (``kface counts --day``, the dashboard's query): the store's query alone, the
    whole answer with the estimates (cold: nothing cached), and again (a refresh: every
    finished hour cached). Beside it, the same query on a store without the time index
    (what a store without ``visitors_by_time`` would do).

``python bench/bench_shop.py live [--cameras 1,2,3] [--seconds 60]``
    ``--cameras`` 720p cameras (a 1280x720 clip of real faces, 10 fps, looped and read at
    its own rate: a camera's stream) counted by one service with the shipped model at 10
    analysed frames/s each: the frames analysed against the frames due, per camera (the
    share dropped). Beside it, today's one-shot path on the same clip (``kface video``'s
    ``analyze_video``, every frame): its frames/s, the 10 fps cameras that makes, and
    the visitors it counts against the service's on the same clip played once.

``python bench/bench_shop.py memory [--minutes 20]``
    One 720p camera for ``--minutes``: the service's resident memory after the first
    minute and at the end, sampled every 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))
AAF = SHARED / "faces" / "aaf"


def make_store(url: str, visitors: int) -> float:
    """A fresh store of ``visitors`` (the tables of an earlier run dropped first)."""
    from sqlalchemy import create_engine, text

    from inference.store import BAND_COLUMNS, GENDER_COLUMNS, Store, store_url

    engine = create_engine(store_url(url))
    with engine.begin() as conn:
        for table in ("visitors", "downtime", "kface_schema"):
            conn.execute(text(f"drop table if exists {table}"))
    engine.dispose()
    store = Store(url)
    rng = np.random.default_rng(0)
    first = datetime(2026, 9, 1).timestamp()
    per_day = 10_000
    start = time.perf_counter()
    batch = 20_000
    for lo in range(0, visitors, batch):
        n = min(batch, visitors - lo)
        i = np.arange(lo, lo + n)
        day, k = i // per_day, i % per_day
        entered = first + day * 86400 + 9 * 3600 + k * (12 * 3600 / per_day)  # 9:00-21:00
        band = rng.dirichlet([2, 2, 2, 2], n)
        male = rng.uniform(0.02, 0.98, n)
        rows = [{"visitor_key": f"cam{j % 2}/bench/{j}", "camera": f"cam{j % 2}",
                 "source": "live", "entered_at": float(t), "left_at": float(t) + 5,
                 "seconds_in_view": 5.0, "counted": True, "age": 33.0,
                 **dict(zip(GENDER_COLUMNS, (float(m), float(1 - m)), strict=True)),
                 **dict(zip(BAND_COLUMNS, map(float, b), strict=True)),
                 "model_id": "shipped", "written_at": float(t) + 15}
                for j, t, m, b in zip(i, entered, male, band, strict=True)]
        store.add_visitors(rows)
    seconds = time.perf_counter() - start
    store.close()
    return seconds


def bench_store(args) -> dict:
    from sqlalchemy import text

    from inference.shop_counts import _CACHE, shop_counts
    from inference.store import Store

    json_model = json.loads((REPO / "models/data/default/labels.json").read_text())
    results = {}
    urls = {"sqlite": str(Path(tempfile.mkdtemp(prefix="kface-bench-")) / "shop.db")}
    if args.postgres:
        urls["postgresql"] = args.postgres
    for name, url in urls.items():
        write = make_store(url, args.visitors)
        store = Store(url)
        with store.engine.begin() as conn:  # the shipped model's id: its reference applies
            conn.execute(text("update visitors set model_id = :m"),
                         {"m": json_model["model_id"]})
        day = date(2026, 9, 1) + timedelta(days=50)
        timings = {}
        for label in ("cold", "cached"):
            if label == "cold":
                _CACHE.clear()
            t = time.perf_counter()
            counts = shop_counts(store, day, "hour")
            timings[label] = {"query_ms": round(1000 * counts["seconds"]["query"], 1),
                              "answer_ms": round(1000 * (time.perf_counter() - t), 1)}
        with store.engine.begin() as conn:  # the same query without the time index
            conn.execute(text("drop index visitors_by_time"))
            conn.execute(text("drop index visitors_by_camera_time"))
        _CACHE.clear()
        t = time.perf_counter()
        store.visitors_between(counts["periods"][0]["start"], counts["periods"][-1]["end"])
        no_index = round(1000 * (time.perf_counter() - t), 1)
        store.close()
        results[name] = {"visitors": args.visitors, "write_s": round(write, 1),
                         "day_visitors": counts["total"]["visitors"], **timings,
                         "query_ms_without_index": no_index,
                         "index_ratio": round(no_index / timings["cold"]["query_ms"], 1)}
        print(json.dumps({name: results[name]}), flush=True)
    return results


def shop_visits(seconds: float, offset: int = 0) -> list:
    """Real faces walking in three lanes, two or three in view, for ``seconds`` (the
    people from the ``offset``-th on)."""
    from tasks.sample_data import Visit

    files = sorted(p.name for p in AAF.glob("*.jpg"))
    visits, t, i = [], 0.0, offset
    while t < seconds - 6:
        for lane in range(3):
            visits.append(Visit(files[(i * 37) % len(files)], t + lane * 0.7,
                                t + lane * 0.7 + 4.5, lane))
            i += 1
        t += 6
    return visits


def clip_720p(path: Path, seconds: float = 60.0, fps: int = 10, offset: int = 0) -> Path:
    """A 1280x720 clip (10 fps by default) of ``shop_visits``."""
    from tasks.sample_data import write_visit_clip

    write_visit_clip(AAF, shop_visits(seconds, offset), path, fps=fps, size=(1280, 720))
    return path


def bench_live(args) -> dict:
    from inference.service import CameraConfig, CountConfig, run_service
    from inference.video import analyze_video
    from models.analyzer import FaceAnalyzer

    work = Path(tempfile.mkdtemp(prefix="kface-bench-live-"))
    clip = clip_720p(work / "shop720.mp4")
    analyzer = FaceAnalyzer(None)
    t = time.perf_counter()
    summary = analyze_video(analyzer, str(clip), work / "video")
    video_fps = summary["frames"] / (time.perf_counter() - t)
    results = {"kface_video_fps": round(video_fps, 1),
               "kface_video_cameras_at_10fps": round(video_fps / 10, 2),
               "kface_video_visitors": summary["visitors"], "service": {}}
    once = run_service(analyzer, CountConfig(  # the same clip once, as a camera
        cameras={"cam": CameraConfig(source=str(clip))}, store=str(work / "once.db"),
        retention_days=None))
    results["service_visitors_same_clip"] = once["cameras"]["cam"]["visitors"]
    print(json.dumps(results), flush=True)
    for n in args.cameras:
        cfg = CountConfig(cameras={f"cam{i}": CameraConfig(source=str(clip), loop=True)
                                   for i in range(n)},
                          store=str(work / f"live{n}.db"), retention_days=None)
        out = run_service(analyzer, cfg, seconds=args.seconds)
        due = 10 * out["seconds"]
        cams = out["cameras"].values()
        analysed = [c["frames_analysed"] / due for c in cams]
        results["service"][n] = {"seconds": out["seconds"],
                                 "analysed_share_per_camera": [round(a, 3) for a in analysed],
                                 "dropped_share": round(1 - float(np.mean(analysed)), 3),
                                 "visitors_counted": sum(c["visitors"] for c in cams)}
        print(json.dumps({f"{n} cameras": results["service"][n]}), flush=True)
    return results


def bench_memory(args) -> dict:
    import psutil

    from inference.service import CameraConfig, CountConfig, run_service
    from models.analyzer import FaceAnalyzer

    work = Path(tempfile.mkdtemp(prefix="kface-bench-mem-"))
    clip = clip_720p(work / "shop720.mp4")
    cfg = CountConfig(cameras={"cam": CameraConfig(source=str(clip), loop=True)},
                      store=str(work / "mem.db"), retention_days=None)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    me = psutil.Process()

    def sample() -> None:
        start = time.time()
        while not stop.wait(30):
            samples.append((round(time.time() - start), me.memory_info().rss / 2**20))
            print(json.dumps({"s": samples[-1][0], "rss_mib": round(samples[-1][1], 1)}),
                  flush=True)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = run_service(FaceAnalyzer(None), cfg, seconds=args.minutes * 60)
    stop.set()
    after_first = next((r for s, r in samples if s >= 60), samples[0][1])
    return {"minutes": args.minutes, "rss_mib_after_1_min": round(after_first, 1),
            "rss_mib_end": round(samples[-1][1], 1),
            "growth_mib": round(samples[-1][1] - after_first, 1),
            "visitors_counted": sum(c["visitors"] for c in out["cameras"].values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("store")
    s.add_argument("--visitors", type=int, default=1_000_000)
    s.add_argument("--postgres", default=None)
    live = sub.add_parser("live")
    live.add_argument("--cameras", type=lambda v: [int(x) for x in v.split(",")],
                      default=[1, 2, 3])
    live.add_argument("--seconds", type=float, default=60)
    m = sub.add_parser("memory")
    m.add_argument("--minutes", type=float, default=20)
    args = parser.parse_args()
    result = {"store": bench_store, "live": bench_live, "memory": bench_memory}[args.what](
        args)
    print(json.dumps({args.what: result}, indent=1))


if __name__ == "__main__":
    main()
