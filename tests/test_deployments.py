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
    chromium_and_playwright,
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


def _deployment(url: str, name: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while True:
        try:
            return api(f"{url}/deployments/name/{name}")
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def served_run(server, kface_tree, tmp_path_factory):
    """``kface serve`` a tiny config with a cron, start kface-pipeline/full through the
    REST API as the UI's Run button does, wait for it; stop serve (before the server)."""
    url, env = server
    work = tmp_path_factory.mktemp("served")
    out = work / "run"
    config = tiny_config(kface_tree, out, work / "tiny.yaml")
    log = open(work / "serve.log", "w")  # noqa: SIM115
    serve = subprocess.Popen([sys.executable, "-m", "cli", "serve", "-c", str(config),
                              "--cron", "0 3 * * *"], cwd=work, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deployments = {name: _deployment(url, name) for name in (
            "kface-pipeline/full", "kface-pipeline/reprocess", "kface-predict/batch")}
        # the UI's Run -> Quick run: a flow run of the deployment with its default parameters
        run = api(f"{url}/deployments/{deployments['kface-pipeline/full']['id']}"
                  "/create_flow_run", "POST",
                  {"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"}})
        finished = wait_flow_run(url, run["id"])
    finally:
        stop_process(serve)
        log.close()
    assert serve.returncode is not None
    return {"url": url, "out": out, "run": finished, "deployments": deployments,
            "log": (work / "serve.log").read_text()}


def test_serve_then_run_from_the_ui(served_run):
    url, out, deployments = served_run["url"], served_run["out"], served_run["deployments"]
    assert served_run["run"]["state"]["type"] == "COMPLETED", served_run["log"][-3000:]
    full, reprocess = deployments["kface-pipeline/full"], deployments["kface-pipeline/reprocess"]
    assert deployments["kface-predict/batch"]["parameters"]["model"] == str(
        out / "experiments" / "default" / "model")
    assert [s["schedule"]["cron"] for s in reprocess["schedules"]] == ["0 3 * * *"]
    assert reprocess["parameters"]["stages"] == ["select", "detect", "merge", "split", "crops"]
    assert full["parameters"]["config"]["out"] == str(out)
    assert not full["schedules"]
    assert (out / "experiments" / "default" / "reports" / "report.md").exists()
    evaluate = json.loads((out / "experiments" / "default" / "stages" / "evaluate.json")
                          .read_text())
    assert 0 <= evaluate["test_gender_accuracy"] <= 1
    keys = {a["key"] for a in api(f"{url}/artifacts/filter", "POST", {})}  # run + subflows
    assert {"detect-summary", "detect-progress", "train-summary", "kface-report",
            "kface-pipeline-summary"} <= keys, keys


def test_ui_shows_the_deployments_and_the_completed_run(served_run, tmp_path):
    """Headless Chromium (Debian's chromium, driven by Playwright) on the real UI."""
    chromium, sync_playwright = chromium_and_playwright()
    ui = served_run["url"].removesuffix("/api")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{ui}/deployments")
        for text in ("reprocess", "full", "batch", "At 03:00 AM every day"):
            page.get_by_text(text, exact=True).first.wait_for(timeout=90_000)
        page.screenshot(path=tmp_path / "deployments.png")
        page.goto(f"{ui}/runs/flow-run/{served_run['run']['id']}")
        page.get_by_text("Completed").first.wait_for(timeout=90_000)
        page.get_by_text("Artifacts", exact=True).first.click()  # the run page's tab
        page.get_by_text("kface-pipeline-summary").first.wait_for(timeout=90_000)
        page.screenshot(path=tmp_path / "flow-run.png")
        browser.close()
    assert (tmp_path / "deployments.png").stat().st_size > 10_000


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
    finished = wait_flow_run(url, run["id"], timeout=300)  # the worker already ran it
    assert finished["state"]["type"] == "COMPLETED", res.stdout[-3000:] + res.stderr[-3000:]
    detect = json.loads((out / "stages" / "detect.json").read_text())
    assert detect["rows_out"] == 42 and detect["shards"] == 20
    assert not (out / "faces.parquet").exists()  # only the requested stages ran


def test_serve_without_a_server_says_what_to_do(tmp_path, kface_tree):
    env = {**os.environ, "PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path)}
    config = tiny_config(kface_tree, tmp_path / "run", tmp_path / "tiny.yaml")
    res = subprocess.run([sys.executable, "-m", "cli", "serve", "-c", str(config)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "kface server" in res.stderr and "PREFECT_API_URL" in res.stderr


def test_kface_server_on_another_port_points_its_ui_there(tmp_path):
    """``kface server --port N``: the server answers on N and its UI calls the API on N
    (with ``prefect server start --port N`` alone the UI calls 4200)."""
    from conftest import free_port

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "server", "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300  # a hang guard: busy cores start it slowly
        while True:
            try:
                assert api(f"http://127.0.0.1:{port}/api/health") is True
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.5)
        settings = api(f"http://127.0.0.1:{port}/ui-settings")
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
    finally:
        stop_process(proc)
    assert proc.returncode is not None


def test_serve_exits_on_sigterm_when_its_server_is_gone(kface_tree, tmp_path):
    """``kface serve`` pauses its deployments on the way out through the server's API; with
    the server gone that would retry for minutes: SIGTERM ends it within its grace."""
    import signal

    from flows.deploy import SHUTDOWN_GRACE_S

    (tmp_path / "home-gone").mkdir()
    proc, url, env = start_prefect_server(tmp_path / "home-gone")
    config = tiny_config(kface_tree, tmp_path / "run", tmp_path / "tiny.yaml")
    serve = subprocess.Popen([sys.executable, "-m", "cli", "serve", "-c", str(config)],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _deployment(url, "kface-pipeline/full")  # serving
    finally:
        stop_process(proc)  # the server goes away first
    start = time.time()
    os.killpg(serve.pid, signal.SIGTERM)
    try:
        serve.wait(SHUTDOWN_GRACE_S + 120)  # a hang guard, not the check
    except subprocess.TimeoutExpired:
        stop_process(serve)
        pytest.fail("kface serve did not exit after SIGTERM with its server gone")
    took = time.time() - start  # within its grace (and the process's own exit)
    assert took < SHUTDOWN_GRACE_S + 5, f"kface serve took {took:.1f} s to exit"
