"""``kface recordings``: a folder of recorded videos (real faces in generated shop clips)
counted into a real visitors store by the recordings pipeline's Prefect flow, on the
same stage machinery as the training pipeline: killed halfway and resumed with nothing
redone or doubled, rerun with only a changed video recounted, each video's start time
from its name, its container or its mtime, a file that is not a video an error row."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from conftest import kill_when_written, run_kface

TZ = "Asia/Seoul"


def _clip(aaf_dir, path, people: list[int], start: float = 0.0):
    """A clip of ``people`` (AAF photo indexes), two at a time, 2.5 s each."""
    from tasks.sample_data import Visit, write_visit_clip

    files = sorted(p.name for p in aaf_dir.glob("*.jpg"))
    visits = [Visit(files[n], start + 3.0 * (i // 2), start + 3.0 * (i // 2) + 2.5,
                    2 * (i % 2)) for i, n in enumerate(people)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_visit_clip(aaf_dir, visits, path)


@pytest.fixture(scope="module")
def recordings_folder(aaf_dir, tmp_path_factory):
    """A day's export: two clips named by their start, one whose container says when it
    was made, one file that is not a video."""
    import imageio_ffmpeg

    root = tmp_path_factory.mktemp("dvr") / "entrance"
    day = root / "2026-12-07"
    _clip(aaf_dir, day / "20261207_100000.mp4", [10, 2000, 3000, 11])
    _clip(aaf_dir, day / "20261207_110000.mp4", [20, 2100])
    plain = root / "plain.mp4"
    _clip(aaf_dir, plain, [30, 2200])
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i",
                    str(plain), "-c", "copy", "-metadata",
                    "creation_time=2026-12-07T05:30:00Z", str(day / "lobby.mp4")], check=True)
    plain.unlink()
    (day / "notes.mp4").write_text("this is no video")
    return root


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(TZ)).timestamp()


def _rows(db, query: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def test_a_recordings_folder_is_counted_once_resumed_and_recounted_where_changed(
        recordings_folder, aaf_dir, tmp_path, prefect_env):
    db, out = tmp_path / "shop.db", tmp_path / "run"
    args = ["recordings", str(recordings_folder), "--store", str(db), "--out", str(out),
            "--tz", TZ]
    env = {**prefect_env, "COLUMNS": "200"}
    done = kill_when_written(args, env, out / "recordings", 1, timeout=300)
    assert 1 <= len(done) < 4
    stored = _rows(db, "select path from recordings")
    assert len(done) <= len(stored) <= len(done) + 1  # (killed before its file: recounted)

    res = run_kface(*args, env=env)  # resumed: the finished videos are not counted again
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads((out / "stages" / "count.json").read_text())
    assert summary["shards"] == 4 and summary["shards_reused"] == len(done)
    assert all((out / "recordings" / name).stat().st_mtime_ns == mtime
               for name, mtime in done.items())
    assert "4 file(s)" in res.stderr and "8 visitors" in res.stderr
    rows = {r[0]: r[1:] for r in _rows(db, "select path, started_at, time_from, status, "
                                           "reason, visitors from recordings")}
    assert rows["2026-12-07/20261207_100000.mp4"] == (
        _epoch("2026-12-07T10:00:00"), "name", "ok", None, 4)
    assert rows["2026-12-07/20261207_110000.mp4"] == (
        _epoch("2026-12-07T11:00:00"), "name", "ok", None, 2)
    assert rows["2026-12-07/lobby.mp4"] == (_epoch("2026-12-07T14:30:00"), "container",
                                            "ok", None, 2)
    assert rows["2026-12-07/notes.mp4"][2:] == ("error", "not a readable video", 0)
    visitors = _rows(db, "select visitor_key, camera, source, entered_at from visitors "
                         "where counted")
    assert len(visitors) == len({v[0] for v in visitors}) == 8  # none twice
    assert {v[1:3] for v in visitors} == {("entrance", "recording")}
    start = _epoch("2026-12-07T10:00:00")
    assert sorted(round(v[3] - start, 1) for v in visitors if v[3] < start + 3600) == [
        0.0, 0.0, 3.0, 3.0]

    _clip(aaf_dir, recordings_folder / "2026-12-07" / "20261207_110000.mp4", [40])
    res = run_kface(*args, env=env)  # one video changed: only it is recounted
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "stages" / "count.json").read_text())
    assert summary["shards_computed"] == 1 and summary["shards_reused"] == 3
    assert _rows(db, "select count(*) from visitors where counted") == [(7,)]
    assert _rows(db, "select count(*) from recordings") == [(4,)]

    res = run_kface("counts", "--store", str(db), "--day", "2026-12-07", "--tz", TZ,
                    "--json")
    assert res.returncode == 0, res.stderr
    hours = {p["label"][11:]: p["visitors"] for p in json.loads(res.stdout)["periods"]}
    assert (hours["10:00"], hours["11:00"], hours["14:00"]) == (4, 1, 2)


def test_bad_recordings_input_is_one_line(tmp_path):
    res = run_kface("recordings", str(tmp_path / "nowhere"), "--store",
                    str(tmp_path / "s.db"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "recordings folder" in res.stderr and "not found" in res.stderr
    (tmp_path / "videos").mkdir()
    res = run_kface("recordings", str(tmp_path / "videos"), "--store", "/sys/kface.db")
    assert res.returncode != 0 and "cannot write in folder /sys" in res.stderr
    assert "Traceback" not in res.stderr
    assert not os.path.exists("/sys/kface.db")
    res = run_kface("recordings", str(tmp_path / "videos"), "--tz", "Mars/Base")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "timezone: unknown time zone 'Mars/Base'" in res.stderr


def test_kface_serve_registers_the_nightly_recordings_count(tmp_path, monkeypatch):
    from cli.shop import recordings_config
    from flows.config import load_config
    from flows.deploy import build_deployments

    monkeypatch.chdir(tmp_path)
    rec = recordings_config(tmp_path, "shop.db", tz=TZ)
    *_, nightly = build_deployments(load_config(None, {"out": "run"}), recordings=rec)
    assert (nightly.flow_name, nightly.name) == ("kface-recordings", "nightly")
    assert nightly.schedules[0].schedule.cron == "0 3 * * *"
    config = nightly.parameters["config"]
    assert config["recordings"]["root"] == str(tmp_path.resolve())
    assert config["recordings"]["store"] == str(tmp_path.resolve() / "shop.db")
    assert config["out"] == str(tmp_path.resolve() / "artifacts" / "recordings")
    url = "postgresql://kface:${KFACE_PG_PASSWORD}@db/kface"  # (never expanded here)
    assert recordings_config(tmp_path, url).recordings.store == url
