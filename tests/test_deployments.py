"""The UI path: a real ``prefect server start`` (SQLite, its own PREFECT_HOME, 127.0.0.1,
free port), ``kface serve`` registering the deployments, a run started through the REST
API as the UI's Run button does, and ``prefect deploy`` of ``prefect.yaml`` run by a
process worker."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import (
    REPO,
    api,
    start_prefect_server,
    stop_process,
    tiny_config,
    wait_flow_run,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url, env = start_prefect_server(tmp_path_factory.mktemp("prefect-home"))
    yield url, env
    stop_process(proc)
    assert proc.poll() is not None


def _deployment(url: str, name: str, timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    while True:
        try:
            return api(f"{url}/deployments/name/{name}")
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def test_serve_then_run_from_the_ui(server, kface_tree, tmp_path):
    url, env = server
    out = tmp_path / "run"
    config = tiny_config(kface_tree, out, tmp_path / "tiny.yaml")
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "-c", str(config),
                              "--cron", "0 3 * * *"], cwd=tmp_path, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        full = _deployment(url, "kface-pipeline/full")
        reprocess = _deployment(url, "kface-pipeline/reprocess")
        assert _deployment(url, "kface-predict/batch")["parameters"]["model"] == str(
            out / "model")
        assert [s["schedule"]["cron"] for s in reprocess["schedules"]] == ["0 3 * * *"]
        assert reprocess["parameters"]["stages"] == ["select", "detect", "merge", "split",
                                                     "crops"]
        assert full["parameters"]["config"]["out"] == str(out)
        assert not full["schedules"]
        # the UI's Run -> Quick run: a flow run of the deployment with its default parameters
        run = api(f"{url}/deployments/{full['id']}/create_flow_run", "POST",
                  {"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"}})
        finished = wait_flow_run(url, run["id"])
        assert finished["state"]["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[
            -3000:]
    finally:
        stop_process(serve)  # serve first, then (fixture) the server
        log.close()
    assert serve.returncode is not None
    assert (out / "reports" / "report.md").exists()
    evaluate = json.loads((out / "stages" / "evaluate.json").read_text())
    assert 0 <= evaluate["val_gender_accuracy"] <= 1
    keys = {a["key"] for a in api(f"{url}/artifacts/filter", "POST", {})}  # run + subflows
    assert {"detect-summary", "train-summary", "kface-report",
            "kface-pipeline-summary"} <= keys, keys


def test_prefect_yaml_deploys_and_a_worker_runs_it(server, kface_tree, tmp_path):
    url, env = server
    prefect = [sys.executable, "-m", "prefect"]
    res = subprocess.run([*prefect, "work-pool", "create", "kface-process", "--type",
                          "process"], env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], env={**env,
                         "PWD": str(REPO)}, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reprocess = api(f"{url}/deployments/name/kface-pipeline/reprocess")
    assert reprocess["work_pool_name"] == "kface-process"
    assert reprocess["pull_steps"][0]["prefect.deployments.steps.set_working_directory"][
        "directory"] == str(REPO)
    assert reprocess["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

    out = tmp_path / "pool-run"
    import yaml

    config = yaml.safe_load(tiny_config(kface_tree, out, tmp_path / "tiny.yaml").read_text())
    run = api(f"{url}/deployments/{reprocess['id']}/create_flow_run", "POST",
              {"parameters": {"config": config, "stages": ["select", "detect"]}})
    res = subprocess.run([*prefect, "worker", "start", "--pool", "kface-process",
                          "--run-once"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=400)
    finished = wait_flow_run(url, run["id"], timeout=60)
    assert finished["state"]["type"] == "COMPLETED", res.stdout[-3000:] + res.stderr[-3000:]
    detect = json.loads((out / "stages" / "detect.json").read_text())
    assert detect["rows_out"] == 42 and detect["shards"] == 5
    assert not (out / "faces.parquet").exists()  # only the requested stages ran


def test_serve_without_a_server_says_what_to_do(tmp_path, kface_tree):
    env = {**os.environ, "PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path)}
    config = tiny_config(kface_tree, tmp_path / "run", tmp_path / "tiny.yaml")
    res = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "-c", str(config)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "kface server" in res.stderr and "PREFECT_API_URL" in res.stderr
