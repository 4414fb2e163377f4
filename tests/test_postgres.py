"""The Prefect server on a real PostgreSQL (Debian's ``postgresql``, a throwaway cluster
this test starts on 127.0.0.1) with the settings docker-compose.yml gives it, and a
pipeline run against that server."""

import glob
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import (
    compose_config,
    free_port,
    run_kface,
    start_prefect_server,
    stop_process,
)

pytestmark = pytest.mark.slow


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"{name} not found: install Debian's postgresql (apt-get install -y "
                    "postgresql); .ci/run does this")
    return found


def _compose_env(service: str) -> dict:
    res = compose_config("--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["services"][service]["environment"]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster with the compose file's user, password and database."""
    settings = _compose_env("postgres")
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
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(work / "data"), "-U", user,
                    f"--pwfile={work / 'pw'}", "--auth=scram-sha-256"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(work / "data"), "-w", "-l",
                    str(work / "log"), "-o", f"-p {port} -k {work} -c "
                    "listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    env = {**os.environ, "PGPASSWORD": password}
    try:
        subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user,
                        db], check=True, env=env, capture_output=True)
        yield {"port": port, "user": user, "db": db, "env": env}
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(work / "data"), "-m", "fast",
                        "stop"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def test_prefect_server_on_postgres_runs_the_pipeline(postgres, kface_tree, tmp_path):
    server_env = _compose_env("prefect-server")
    url = server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url.replace(
        "@postgres:5432/", f"@127.0.0.1:{postgres['port']}/")
    home = tmp_path / "prefect-home"
    home.mkdir()
    proc, api_url, env = start_prefect_server(home, server_env)
    try:
        out = tmp_path / "run"
        res = run_kface("run", "--data-root", str(kface_tree), "--out", str(out),
                        "--stages", "select,detect", "--workers", "2", "--shard-size", "10",
                        env={k: env[k] for k in ("PREFECT_HOME", "PREFECT_API_URL")})
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"Prefect API: {api_url}" in res.stderr  # used the server, started none
    finally:
        stop_process(proc)
    assert json.loads((out / "stages" / "detect.json").read_text())["rows_out"] == 42
    query = ("select f.name, r.state_type from flow_run r join flow f on f.id = r.flow_id "
             "order by f.name")
    rows = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(postgres["port"]), "-U",
                           postgres["user"], "-d", postgres["db"], "-At", "-c", query],
                          env=postgres["env"], capture_output=True, text=True, check=True)
    assert rows.stdout.split() == ["detect|COMPLETED", "kface-pipeline|COMPLETED"]
