"""The Prefect server on a real PostgreSQL (Debian's ``postgresql``, a throwaway cluster
this test starts on 127.0.0.1) with the settings docker-compose.yml gives it, and a
pipeline run against that server."""

import json
import subprocess

import pytest
from conftest import compose_env, run_kface, start_prefect_server, stop_process

pytestmark = pytest.mark.slow


def test_prefect_server_on_postgres_runs_the_pipeline(postgres, kface_tree, tmp_path):
    server_env = compose_env("prefect-server")
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
