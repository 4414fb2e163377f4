"""End-to-end: the real CLI, a real Prefect run (temporary local server), 2 spawn workers,
real detector on real faces, and a SIGKILLed run that resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, detections_table, kill_when_written, run_kface

from flows.pipeline import STAGES

pytestmark = pytest.mark.slow


def test_select_and_detect_with_two_workers(full_run):
    out, res = full_run
    assert (out / "manifest.parquet").exists()
    shards = sorted(p.name for p in (out / "detections").glob("shard-*.parquet"))
    assert shards == [f"shard-{19062400 + i}.parquet" for i in range(20)]  # one per subject
    table = detections_table(out)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert len(rows) == 42
    bad = "High_Resolution/19062400/S001/L1/E01/"
    assert rows[bad + "C8.jpg"]["status"] == "error"
    assert rows[bad + "C9.jpg"]["status"] == "error"
    assert sum(r["status"] == "ok" for r in rows.values()) >= 30
    assert not any("/L10/" in p for p in rows)
    detect = json.loads((out / "stages" / "detect.json").read_text())
    assert detect["shards_computed"] == 20 and detect["workers"] == 2
    assert detect["tasks"] == 11  # 4 photos a task: the subject with 4, then pairs of 2
    select = json.loads((out / "stages" / "select.json").read_text())
    assert select["unrecognised"] == 1 and select["rows_out"] == 42
    log = res.stdout + res.stderr
    # the terminal is quiet: no routine Prefect lines, no links that die with the server
    for noise in ("Finished in state", "View at http", "Starting temporary server"):
        assert noise not in log, noise
    # the unusable photos are named with their reasons, in the log and the summary
    assert "detect: 2 photo(s) could not be used" in log and "e.g. High_Resolution/" in log
    assert detect["errors"]["error"] == {"empty": 1, "not_image": 1}
    assert detect["error_examples"]["empty"] == [bad + "C8.jpg"]


def test_rerun_reuses_every_shard(full_run, kface_tree, prefect_env):
    out, _ = full_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "detections").glob("shard-*")}
    res = run_kface("run", "--data-root", str(kface_tree), "--out", str(out),
                    "--stages", "select,detect", "--workers", "2", "--shard-size", "4",
                    env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    detect = json.loads((out / "stages" / "detect.json").read_text())
    assert detect["shards_reused"] == 20 and detect["shards_computed"] == 0
    assert "detect: cached, all 20 shards are up to date" in res.stdout + res.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (out / "detections").glob("shard-*")}
    assert after == before


def test_a_run_folder_in_use_is_refused(tmp_path, kface_tree, prefect_env):
    from core.storage import folder_lock

    with folder_lock(tmp_path, "flow run other-run"):
        res = run_kface("run", "--data-root", str(kface_tree), "--out", str(tmp_path),
                        "--stages", "select", env=prefect_env)
    assert res.returncode != 0
    assert f"{tmp_path} is in use by another run (pid {os.getpid()}" in res.stderr
    assert "other-run" in res.stderr and not (tmp_path / "manifest.parquet").exists()


def test_a_server_that_never_answers_is_one_line_and_leaves_nothing(tmp_path, kface_tree):
    """A fresh PREFECT_HOME's first start migrates the database (18 s idle here, over
    120 s once in CI); a 1 s limit cannot be met: two tries, then one line, no server left."""
    import psutil

    home = str(tmp_path / "home")

    def servers() -> set[int]:
        """Processes of this run's Prefect home (its temporary server), whatever else
        runs on the machine."""
        found = set()
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("PREFECT_HOME") == home:
                    found.add(proc.pid)
            except psutil.Error:  # gone, or another user's
                pass
        return found

    res = run_kface("run", "--data-root", str(kface_tree), "--out", str(tmp_path / "out"),
                    "--stages", "select",
                    env={"PREFECT_HOME": home, "PREFECT_API_URL": "",
                         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"})
    assert res.returncode != 0
    assert "did not answer in 1 s, twice" in res.stderr and "kface server" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    deadline = time.time() + 10  # (a process on its way out may take a moment)
    while servers() and time.time() < deadline:
        time.sleep(0.2)
    assert not servers(), "a temporary server outlived the failed start"


def test_missing_input_is_named(tmp_path, kface_tree, prefect_env):
    res = run_kface("run", "--data-root", str(kface_tree), "--out", str(tmp_path),
                    "--stages", "detect", env=prefect_env)
    assert res.returncode != 0
    assert "manifest.parquet" in res.stderr and "--stages select,detect" in res.stderr


def test_sigkill_then_resume(full_run, kface_tree, tmp_path, prefect_env):
    out = tmp_path / "crash"
    args = ["run", "--data-root", str(kface_tree), "--out", str(out), "--stages",
            "select,detect", "--workers", "1", "--shard-size", "1"]
    done = kill_when_written(args, prefect_env, out / "detections", 3, timeout=240)
    assert 3 <= len(done) < 20
    res = run_kface(*args, env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    detect = json.loads((out / "stages" / "detect.json").read_text())
    assert detect["shards_reused"] >= len(done)
    assert detect["shards_computed"] == 20 - detect["shards_reused"]
    for name, mtime in done.items():  # finished shards were not recomputed
        assert (out / "detections" / name).stat().st_mtime_ns == mtime
    assert not list((out / "detections").glob(".*.tmp"))
    reference = detections_table(full_run[0])
    assert detections_table(out).equals(reference)


def test_full_pipeline_then_everything_cached(kface_tree, tmp_path, prefect_env):
    out = tmp_path / "full"
    args = ["run", "--data-root", str(kface_tree), "--metadata",
            str(kface_tree / "KFace_metadata.csv"), "--out", str(out), "--workers", "2",
            "--shard-size", "10", "--set", "crops.size=48", "--set", "model.backbone=small_cnn",
            "--set", "train.epochs=1"]
    res = run_kface(*args, env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    exp = "experiments/default/"
    for rel in ("manifest.parquet", "faces.parquet", "split.parquet", exp + "model/model.keras",
                exp + "model/labels.json", exp + "model/history.json", exp + "reports/report.md",
                exp + "reports/metrics.json", exp + "reports/curve_loss.png",
                exp + "config.yaml"):
        assert (out / rel).exists(), rel
    assert list((out / "crops").glob("shard-*.parquet"))
    merge = json.loads((out / "stages" / "merge.json").read_text())
    assert merge["faces"] >= 30 and merge["subjects"] >= 17
    split = json.loads((out / "stages" / "split.json").read_text())
    assert split["subjects"]["in_both"] == 0
    metrics = json.loads((out / exp / "reports" / "metrics.json").read_text())
    assert metrics["examples"] == split["rows"]["test"] and metrics["scored_split"] == "test"
    model_mtime = (out / exp / "model" / "model.keras").stat().st_mtime_ns

    status_args = ["status", *args[1:]]
    assert _states(status_args, prefect_env) == dict.fromkeys(STAGES, "done")

    mtimes = _mtimes(out)
    res = run_kface("--verbose", *args, env=prefect_env)  # with Prefect's routine lines
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    for stage in STAGES:  # every stage says it was skipped
        assert f"{stage}: cached" in log, stage
        assert _summary(out, stage)["reused"] is True
    tasks = _summary(out, "detect")["tasks"] + _summary(out, "crops")["tasks"]
    assert log.count("Finished in state Cached(") == 5 + tasks  # 5 stages + every shard task
    assert json.loads((out / "stages" / "crops.json").read_text())["shards_computed"] == 0
    assert _mtimes(out) == mtimes  # nothing rewritten
    assert (out / exp / "model" / "model.keras").stat().st_mtime_ns == model_mtime
    assert _states(status_args, prefect_env) == dict.fromkeys(STAGES, "cached")
    trained = _summary(out, "train")  # a cached stage keeps the time its work took
    assert trained["seconds"] == 0.0 and trained["work_seconds"] > 0

    # a training hyper-parameter: only train and evaluate are redone
    changed = [*args, "--set", "train.learning_rate=0.002"]
    expected = {**dict.fromkeys(STAGES, "cached"), "train": "stale", "evaluate": "stale"}
    assert _states(["status", *changed[1:]], prefect_env) == expected
    res = run_kface(*changed, env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [s for s in STAGES if not _summary(out, s)["reused"]] == ["train", "evaluate"]
    assert (out / exp / "model" / "model.keras").stat().st_mtime_ns != model_mtime

    # the detector threshold: detect and everything after it
    changed = [*changed, "--threshold", "0.95"]
    states = _states(["status", *changed[1:]], prefect_env)
    assert states == {"select": "cached", **{s: "stale" for s in STAGES[1:]}}
    res = run_kface(*changed[:-4], "--stages", "select,detect", "--threshold", "0.95",
                    env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _summary(out, "select")["reused"] is True
    assert _summary(out, "detect")["shards_computed"] == 20


def test_detector_and_alignment_switches_redo_only_what_follows(kface_tree, tmp_path,
                                                                prefect_env):
    """YuNet's landmarks reach the detections, faces and crops; aligning recomputes the
    crops alone (detections reused), switching the detector recomputes from detect."""
    import pyarrow.parquet as pq

    from models.detector import LANDMARK_COLUMNS

    out = tmp_path / "yunet"
    args = ["run", "--data-root", str(kface_tree), "--metadata",
            str(kface_tree / "KFace_metadata.csv"), "--out", str(out), "--workers", "2",
            "--set", "crops.size=48", "--set", "detector.kind=yunet"]
    data_stages = ["--stages", "select,detect,merge,split,crops"]
    res = run_kface(*args, *data_stages, env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    faces = pq.read_table(out / "faces.parquet").to_pandas()
    assert len(faces) >= 30 and faces[list(LANDMARK_COLUMNS)].notna().all().all()
    inside = (faces.eye_r_x > faces.left) & (faces.eye_l_x < faces.right)
    assert inside.all() and (faces.eye_r_x < faces.eye_l_x).all()  # person's right: left

    aligned = [*args, "--set", "crops.align=true"]
    states = _states(["status", *aligned[1:]], prefect_env)
    assert states == {"select": "done", "detect": "done", "merge": "done", "split": "done",
                      "crops": "stale", "train": "missing", "evaluate": "missing"}
    res = run_kface(*aligned, *data_stages, env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _summary(out, "detect")["shards_computed"] == 0
    crops = _summary(out, "crops")
    assert crops["shards_reused"] == 0 and crops["status_counts"]["unaligned"] == 0

    back = [a if a != "detector.kind=yunet" else "detector.kind=res10" for a in aligned]
    states = _states(["status", *back[1:]], prefect_env)
    assert states["select"] == "cached" and states["detect"] == "stale"
    assert {states[s] for s in ("merge", "split", "crops")} == {"stale"}
    res = run_kface(*back, *data_stages, env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "have no landmarks" in res.stdout + res.stderr  # res10: box crops, said once
    assert not set(LANDMARK_COLUMNS) & set(pq.read_schema(out / "faces.parquet").names)


def _states(args: list[str], env: dict) -> dict[str, str]:
    res = run_kface(*args, "--json", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return {s["stage"]: s["state"] for s in json.loads(res.stdout)["stages"]}


def _summary(out, stage: str) -> dict:
    folder = out / "experiments" / "default" if stage in ("train", "evaluate") else out
    return json.loads((folder / "stages" / f"{stage}.json").read_text())


def _mtimes(out) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and "stages" not in p.parts
            and p.name not in ("config.yaml", ".lock")}


def test_sigterm_stops_the_temporary_server(kface_tree, tmp_path, prefect_env):
    import psutil

    out = tmp_path / "term"
    proc = psutil.Popen([sys.executable, "-m", "cli", "run", "--data-root",
                         str(kface_tree), "--out", str(out), "--stages", "select,detect",
                         "--workers", "1", "--shard-size", "1"], cwd=REPO,
                        env={**os.environ, **prefect_env}, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "detections").glob("shard-*")):
        time.sleep(0.1)
    servers = [p for p in proc.children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
    assert servers, "no temporary Prefect server found"
    proc.terminate()
    proc.wait(60)
    gone, alive = psutil.wait_procs(servers, timeout=90)
    for p in alive:
        p.kill()
    assert not alive, "the temporary Prefect server outlived a terminated run"
    os.killpg(proc.pid, signal.SIGKILL) if psutil.pid_exists(proc.pid) else None
