"""A shop's day: the counting service on a real stream (FFmpeg serving a clip of real
faces over HTTP, cut midway and restored) and on a video file standing in for a camera,
killed and restarted; the visitors store on SQLite and on a real PostgreSQL, written by
several processes at once; counts per hour, day and week; bad input. The dashboard in
Chromium is in test_dashboard.py."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from conftest import REPO, free_port, run_kface, stop_process

TZ = "Asia/Seoul"
DAY = "2026-12-07"


def shipped_model_id() -> str:
    from models.analyzer import DEFAULT_MODEL

    return json.loads((DEFAULT_MODEL / "labels.json").read_text())["model_id"]


@pytest.fixture(scope="module")
def shop_clip(aaf_dir, tmp_path_factory) -> Path:
    """6.5 s at 10 frames/s: four people, two at a time (known visitors: 4)."""
    from tasks.sample_data import Visit, write_visit_clip

    files = sorted(p.name for p in aaf_dir.glob("*.jpg"))
    clip = tmp_path_factory.mktemp("shop") / "shop.mp4"
    write_visit_clip(aaf_dir, [Visit(files[10], 0, 2.5, 0), Visit(files[2000], 0.5, 3, 2),
                               Visit(files[3000], 3.2, 5.5, 1),
                               Visit(files[11], 3.5, 5.5, 0)], clip)
    return clip


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _count(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", "count", *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            env=_env(), cwd=log.parent, start_new_session=True)


def _visitors(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("select visitor_key, camera, entered_at, left_at, counted "
                            "from visitors order by entered_at").fetchall()


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _serve(clip: Path, port: int) -> subprocess.Popen:
    """FFmpeg serving ``clip`` at its frame rate as an MJPEG stream over HTTP (one
    client; it ends with the clip): a camera's stream."""
    import imageio_ffmpeg

    return subprocess.Popen([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel",
                             "error", "-re", "-i", str(clip), "-c:v", "mjpeg", "-q:v", "4",
                             "-f", "mpjpeg", "-listen", "1",
                             f"http://127.0.0.1:{port}/cam"])


@pytest.mark.slow
def test_a_stream_cut_midway_counts_both_halves_and_records_the_gap(shop_clip, tmp_path):
    """The stream ends, is unreachable for 3 s, then is back: the service logs one line
    each way, counts the 4 visitors of each half, and the gap is the camera's downtime.
    The password in the camera URL and the store URL is never shown."""
    port = free_port()
    db = tmp_path / "shop.db"
    (tmp_path / "shop.yaml").write_text(
        f"cameras:\n  door:\n    source: http://kface:${{CAM_PW}}@127.0.0.1:{port}/cam\n"
        "    detect_fps: 10\nretry_max_seconds: 1\n")
    first = _serve(shop_clip, port)
    log = tmp_path / "count.log"
    service = subprocess.Popen(
        [sys.executable, "-m", "cli", "count", "-c", "shop.yaml", "--store",
         str(db)], stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        env={**_env(), "CAM_PW": "s3cret-pw"}, cwd=tmp_path, start_new_session=True)
    try:
        first.wait(timeout=60)
        _wait(lambda: "stream lost" in log.read_text(), 20, "the lost stream's line")
        time.sleep(3)
        back = time.time()
        second = _serve(shop_clip, port)
        second.wait(timeout=60)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0, log.read_text()
    finally:
        stop_process(service)
        first.kill()
    text = log.read_text()
    assert "s3cret-pw" not in text and "kface:***@127.0.0.1" in text, text
    assert text.count("stream lost") == 2 and text.count("back after") == 1, text
    rows = _visitors(db)
    assert [r[4] for r in rows] == [1] * 8, text  # 4 + 4, each counted once
    assert len({r[0] for r in rows}) == 8 and {r[1] for r in rows} == {"door"}
    with sqlite3.connect(db) as conn:
        down = conn.execute("select camera, started_at, ended_at, reason from downtime "
                            "order by started_at").fetchall()
        assert "s3cret" not in " ".join(map(str, conn.iterdump()))
    cut = down[0]
    assert cut[0] == "door" and cut[3] == "stream lost"
    assert 2.5 <= cut[2] - cut[1] <= 8 and cut[1] < back < cut[2] + 0.5
    assert rows[3][3] <= cut[1] + 0.5 and rows[4][2] >= cut[2] - 0.5  # halves apart
    res = run_kface("counts", "--store", str(db), "--json")
    assert res.returncode == 0, res.stderr
    counts = json.loads(res.stdout)
    assert counts["total"]["visitors"] == 8 and counts["total"]["downtime"]["door"] >= 2.5


@pytest.mark.slow
def test_a_killed_service_keeps_what_it_wrote_and_a_restart_writes_nothing_twice(
        shop_clip, tmp_path):
    """SIGKILL once the first visitor is written: what was committed stays and the file
    is whole; a second run of the same clip (a new run of the service) adds its own 4
    visitors with keys of its own. SIGTERM ends a run within seconds with its visitors
    still in view written."""
    db = tmp_path / "shop.db"
    (tmp_path / "fast.yaml").write_text(f"cameras:\n  till: {{source: {shop_clip}}}\n"
                                        "return_seconds: 0\n")
    service = _count(["-c", "fast.yaml", "--store", str(db)], tmp_path / "kill.log")
    try:
        _wait(lambda: db.exists() and len(_visitors(db)) >= 1, 60, "a written visitor")
        service.send_signal(signal.SIGKILL)
        service.wait(timeout=10)
    finally:
        stop_process(service)
    kept = _visitors(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma integrity_check").fetchone() == ("ok",)
        # its heartbeat says when it last counted; say it died 10 minutes ago
        (run, seen), = conn.execute("select run_id, seen_at from heartbeats "
                                    "where camera = 'till'").fetchall()
        conn.execute("update heartbeats set seen_at = seen_at - 600")
    assert 1 <= len(kept) < 4 and run in kept[0][0]
    restarted = time.time()
    res = run_kface("count", "-c", str(tmp_path / "fast.yaml"), "--store", str(db))
    assert res.returncode == 0, res.stderr[-2000:]
    with sqlite3.connect(db) as conn:  # the time it did not run is the camera's downtime
        (start, end, reason), = conn.execute(
            "select started_at, ended_at, reason from downtime").fetchall()
        beat = conn.execute("select run_id, seen_at from heartbeats").fetchall()
    assert start == pytest.approx(seen - 600) and restarted <= end <= time.time()
    assert reason == "kface count was not running" and "not counted for" in res.stderr
    assert len(beat) == 1 and beat[0][0] != run and beat[0][1] >= end  # the new run's
    assert "4 visitors written" in res.stderr, res.stderr
    rows = _visitors(db)
    assert len(rows) == len(kept) + 4 and len({r[0] for r in rows}) == len(rows)
    assert rows[:len(kept)] == kept
    runs = {r[0].split("/")[1] for r in rows}
    assert len(runs) == 2  # every key names its camera, its run and its track

    # SIGTERM 3 s into the clip: none has left 10 s ago, so the store is empty until the
    # service, ending, writes the visitors it holds
    term_db = tmp_path / "term.db"
    service = _count([str(shop_clip), "--store", str(term_db)], tmp_path / "term.log")
    try:
        _wait(lambda: "cam1:" in (tmp_path / "term.log").read_text(), 60, "the start")
        time.sleep(3)
        assert not term_db.exists() or not _visitors(term_db)
        sent = time.time()
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0, (tmp_path / "term.log").read_text()
        assert time.time() - sent < 5
    finally:
        stop_process(service)
    assert len(_visitors(term_db)) >= 2


def test_bad_input_is_one_line_and_an_unreachable_camera_is_downtime(tmp_path):
    """Each refused before the model loads, in one line; an unreachable stream is not
    an error: it is retried, logged and recorded as downtime."""
    (tmp_path / "notvideo.mp4").write_text("this is no video")
    from inference.store import Store

    older = tmp_path / "older.db"  # a store of schema version 1 (before heartbeats and
    Store(older).close()  # recordings)
    with sqlite3.connect(older) as conn:
        conn.execute("drop table heartbeats")
        conn.execute("drop table recordings")
        conn.execute("update kface_schema set version = 1")
    res = run_kface("counts", "--store", str(older), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    with sqlite3.connect(older) as conn:  # upgraded in place
        assert conn.execute("select version from kface_schema").fetchall() == [(3,)]
        assert conn.execute("select count(*) from heartbeats").fetchone() == (0,)
        assert conn.execute("select count(*) from recordings").fetchone() == (0,)
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("create table kface_schema (version integer not null)")
        conn.execute("insert into kface_schema values (99)")
    cases = {
        ("count", str(tmp_path / "notvideo.mp4")): "notvideo.mp4: not a video",
        ("count", str(tmp_path / "missing.mp4")): "missing.mp4 not found",
        ("counts", "--store", str(newer)): "schema version 99, newer than",
        ("counts", "--store", "/sys/kface.db"): "cannot write in folder /sys",
        ("counts", "--store", "postgresql://u:${KFACE_NO_SUCH_VAR}@h/db"):
            "KFACE_NO_SUCH_VAR",
        ("counts", "--store", str(tmp_path / "v.db"), "--day", "7.12.2026"): "YYYY-MM-DD",
        ("counts", "--store", str(tmp_path / "v.db"), "--period", "month"): "month",
        ("count",): "name a camera",
    }
    if os.access("/sys", os.W_OK) and not os.path.exists("/sys/class"):
        cases.pop(("counts", "--store", "/sys/kface.db"))
    for args, message in cases.items():
        res = run_kface(*args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
        assert lines[-1].startswith("error:") and "Traceback" not in res.stderr, args
    db = tmp_path / "down.db"
    port = free_port()  # nothing listens there
    res = run_kface("count", f"gate=http://127.0.0.1:{port}/cam", "--store", str(db),
                    "--for", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "camera gate: cannot open" in res.stderr and "Traceback" not in res.stderr
    with sqlite3.connect(db) as conn:
        down = conn.execute("select camera, started_at, ended_at from downtime").fetchall()
    assert len(down) == 1 and down[0][0] == "gate" and 2 <= down[0][2] - down[0][1] <= 6


def _at(hour: int, minute: int = 0, day: str = DAY) -> float:
    y, m, d = map(int, day.split("-"))
    return datetime(y, m, d, hour, minute, tzinfo=ZoneInfo(TZ)).timestamp()


def synthetic_store(path: Path) -> dict:
    """A store of known visitors (Asia/Seoul): 40 at 10:00-10:59 on camera a (a young
    mix), 3 at 14:xx on camera b, 5 the next day; camera b down 12:30-13:15."""
    from inference.store import Store, visitor_row

    rng = np.random.default_rng(3)
    store = Store(path)
    rows = []

    def add(at: float, camera: str, i: int, young: bool) -> None:
        band = rng.dirichlet([8, 2, 1, 1] if young else [1, 1, 2, 8])
        male = float(rng.uniform(0.05, 0.95))
        record = {"gender_probs": {"M": male, "F": 1 - male},
                  "age_band_probs": dict(zip(("20s", "30s", "40s", "50s"), band,
                                             strict=True)),
                  "seconds_in_view": 4.0, "counted": True, "age": 30.0,
                  "model_id": shipped_model_id()}
        rows.append(visitor_row(record, camera, f"{camera}/run/{i}", at, at + 4, "live"))

    for i in range(40):
        add(_at(10, i), "a", i, True)
    for i in range(3):
        add(_at(14, 10 * i), "b", 100 + i, False)
    for i in range(5):
        add(_at(9, i, "2026-12-08"), "a", 200 + i, True)
    assert store.add_visitors(rows) == 48
    assert store.add_visitors(rows[:10]) == 0  # written twice: stored once
    store.start_downtime("b", "b/run/1", _at(12, 30), "stream lost")
    store.end_downtime("b/run/1", _at(13, 15))
    store.close()
    return {"rows": rows}


def test_counts_per_hour_day_and_week_from_the_store(tmp_path):
    """kface counts --json: each hour's visitors, their estimate by the estimator of
    kface stats on the same probabilities, the thin rule, downtime per hour, a camera
    filter, the week per day and the CSV; retention deletes what is older."""
    from core.labels import AGE_BANDS, GENDERS
    from inference.shop_counts import PERIOD_DRAWS
    from inference.stats import probability_stats
    from inference.store import Store

    db = tmp_path / "shop.db"
    rows = synthetic_store(db)["rows"]
    res = run_kface("counts", "--store", str(db), "--day", DAY, "--tz", TZ, "--json")
    assert res.returncode == 0, res.stderr
    counts = json.loads(res.stdout)
    hours = {p["label"][11:]: p for p in counts["periods"]}
    assert len(hours) == 24 and counts["total"]["visitors"] == 43
    assert hours["10:00"]["visitors"] == 40 and hours["14:00"]["visitors"] == 3
    assert sum(p["visitors"] for p in hours.values()) == 43
    assert hours["14:00"]["thin"] and not hours["10:00"]["thin"]
    assert any("too few visitors (3)" in w for w in hours["14:00"]["warnings"])
    assert hours["12:00"]["downtime"] == {"b": 1800.0}
    assert hours["13:00"]["downtime"] == {"b": 900.0} and not hours["11:00"]["downtime"]
    ten = rows[:40]  # the same estimator on the same probabilities
    expected = probability_stats(
        {"gender": list(GENDERS), "age_band": list(AGE_BANDS)},
        np.array([[r[f"p_{g.lower()}"] for g in GENDERS] for r in ten]),
        np.array([[r[f"p_{b}"] for b in AGE_BANDS] for r in ten]), shipped_model_id(),
        draws=PERIOD_DRAWS)
    assert expected["reference_source"] == "the shipped model's own"
    assert hours["10:00"]["age_band"] == expected["age_band"]
    assert hours["10:00"]["joint"] == expected["joint"]
    young = hours["10:00"]["age_band"]["20s"]
    assert young["low"] <= young["estimate"] <= young["high"] and young["estimate"] > 15

    res = run_kface("counts", "--store", str(db), "--day", DAY, "--tz", TZ, "--json",
                    "--camera", "b")
    assert json.loads(res.stdout)["total"]["visitors"] == 3
    res = run_kface("counts", "--store", str(db), "--day", DAY, "--tz", TZ, "--json",
                    "--period", "day")
    days = json.loads(res.stdout)["periods"]
    assert [p["label"] for p in days][:2] == ["2026-12-07", "2026-12-08"]
    assert [p["visitors"] for p in days] == [43, 5, 0, 0, 0, 0, 0]
    res = run_kface("counts", "--store", str(db), "--day", DAY, "--tz", TZ, "--csv")
    lines = res.stdout.splitlines()
    assert lines[0].startswith("period,visitors,20s_M_estimate") and len(lines) == 26
    assert lines[-1].startswith("total,43,")
    res = run_kface("counts", "--store", str(db), "--day", DAY, "--tz", TZ)
    assert res.returncode == 0 and "\n10:00            40" in res.stderr, res.stderr
    assert "\n14:00 *" in res.stderr and "1800 s" in res.stderr

    store = Store(db)
    assert store.forget_before(_at(0, 0, "2026-12-08")) == 43
    assert store.count_visitors() == 5
    store.close()


WRITER = """
import sys
from inference.store import Store, visitor_row
store = Store(sys.argv[1])
record = {"gender_probs": {"M": 0.5, "F": 0.5}, "counted": True, "seconds_in_view": 1.0,
          "age_band_probs": {"20s": 0.25, "30s": 0.25, "40s": 0.25, "50s": 0.25}}
start = int(sys.argv[2])
for batch in range(start, start + 200, 10):
    rows = [visitor_row(record, "cam", f"cam/r/{i % 300}", 1e9 + i, 1e9 + i + 1, "live")
            for i in range(batch, batch + 10)]
    store.add_visitors(rows)
"""


def _writers(url: str, env: dict) -> None:
    """Three processes write 200 rows each, their keys overlapping: 300 distinct."""
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(start)], env=env,
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
             for start in (0, 50, 100)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()


def test_concurrent_writers_never_lose_or_double_a_visitor_sqlite(tmp_path):
    from inference.store import Store

    db = tmp_path / "many.db"
    Store(db).close()
    _writers(str(db), _env())
    assert Store(db).count_visitors() == 300


@pytest.mark.slow
def test_the_store_on_postgresql(postgres, tmp_path):
    """The same store on a real PostgreSQL: created with its schema version, written by
    three processes at once, counted by kface counts; the password comes from the
    environment and is never printed."""
    from inference.store import Store

    url = (f"postgresql://{postgres['user']}:${{KFACE_PG_PW}}@127.0.0.1:{postgres['port']}"
           f"/{postgres['db']}")
    env = {**_env(), "KFACE_PG_PW": postgres["env"]["PGPASSWORD"]}
    os.environ["KFACE_PG_PW"] = env["KFACE_PG_PW"]
    try:
        _writers(url, env)
        store = Store(url)
        assert store.count_visitors() == 300 and "***" in store.shown
        store.beat(["door", "till"], "run1", 100.0, 130.0)  # heartbeats: replaced in place
        store.beat(["door"], "run2", 200.0, 230.0)
        assert store.heartbeat("door") == {"run_id": "run2", "started_at": 200.0,
                                           "seen_at": 230.0}
        assert store.heartbeat("till")["seen_at"] == 130.0 and not store.heartbeat("x")
        store.close()
        res = run_kface("counts", "--store", url, "--day", "2001-09-09", "--tz", "UTC",
                        "--json", env={"KFACE_PG_PW": env["KFACE_PG_PW"]})
        assert res.returncode == 0, res.stderr
        counts = json.loads(res.stdout)
        assert counts["total"]["visitors"] == 300
        assert f":{env['KFACE_PG_PW']}@" not in res.stdout + res.stderr
        assert ":***@127.0.0.1" in counts["store"]
        bad = run_kface("counts", "--store", url.replace("${KFACE_PG_PW}", "wrong"),
                        env={})
        assert bad.returncode == 2 and "cannot be opened" in bad.stderr
        assert ":wrong@" not in bad.stderr and ":***@" in bad.stderr
    finally:
        os.environ.pop("KFACE_PG_PW", None)
