"""The light inference install, as docs/operations.md gives it: a fresh virtual
environment with only ``requirements-inference.txt`` and this package (``--no-deps``)
runs ``kface predict`` and ``kface video --stats`` on an exported ONNX model folder, on
real faces, and holds no TensorFlow, Keras, Prefect, pandas or pyarrow."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, make_video

HEAVY = ("tensorflow", "keras", "prefect", "pandas", "pyarrow", "matplotlib", "jax", "torch")


@pytest.fixture(scope="module")
def light_kface(tmp_path_factory):
    """The ``kface`` command of a fresh light environment, and that environment."""
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = venv.parent / "source"  # the package's files only: the build writes no file here
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "cli", "core", "models", "tasks", "inference",
                 "flows"):
        if (REPO / part).is_dir():
            shutil.copytree(REPO / part, source / part,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / part, source / part)
    for args in (["-r", str(REPO / "requirements-inference.txt")], ["--no-deps", str(source)]):
        res = subprocess.run(pip + args, capture_output=True, text=True, timeout=900, env=env,
                             cwd=venv.parent)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u, sys; "
         f"print(','.join(m for m in {HEAVY!r} if u.find_spec(m)))"],
        capture_output=True, text=True, env=env, cwd=venv.parent, check=True)
    assert found.stdout.strip() == "", f"the light install holds {found.stdout.strip()}"
    return venv / "bin" / "kface", env


def run_light(light_kface, *args, cwd):
    kface, env = light_kface
    return subprocess.run([str(kface), *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd)


def test_light_install_predicts_on_real_faces(light_kface, onnx_model, scenes_dir, tmp_path):
    res = run_light(light_kface, "predict", str(scenes_dir / "insightface_t1.jpg"),
                    "--model", str(onnx_model), "--out", str(tmp_path / "p"), "--csv",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    faces = json.loads((tmp_path / "p" / "predictions.json").read_text())["images"][0]["faces"]
    assert len(faces) == 6 and all(20 <= f["age"] < 60 for f in faces)
    assert (tmp_path / "p" / "predictions.csv").read_text().count("\n") == 7


def test_light_install_counts_people_in_a_video(light_kface, onnx_model, aaf_dir, tmp_path):
    clip = tmp_path / "clip.mp4"
    make_video(clip, aaf_dir)
    res = run_light(light_kface, "video", str(clip), "--model", str(onnx_model), "--out",
                    str(tmp_path / "v"), "--stats", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((tmp_path / "v" / "stats.json").read_text())
    assert stats["visitors"] == 2 and stats["input"] == "tracks.jsonl"  # not the staging
    assert not (tmp_path / "v" / "people.png").exists()  # no matplotlib: no chart, and
    assert "people.png left out" in res.stderr  # it says so


def test_light_install_runs_a_shops_day(light_kface, aaf_dir, tmp_path):
    """kface count on a clip standing in for a camera (the shipped model, ONNX Runtime),
    kface counts from its SQLite store, and the dashboard's page and script from the
    installed package."""
    import re
    import time
    import urllib.request
    from datetime import date

    from conftest import stop_process

    clip = tmp_path / "clip.mp4"
    make_video(clip, aaf_dir)
    res = run_light(light_kface, "count", str(clip), "--store", "shop.db", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 visitors written" in res.stderr, res.stderr
    res = run_light(light_kface, "counts", "--store", "shop.db", "--json",
                    "--day", date.today().isoformat(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["total"]["visitors"] == 2
    kface, env = light_kface
    log = tmp_path / "dash.log"
    proc = subprocess.Popen([str(kface), "dashboard", "--store", "shop.db", "--port", "0"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            env=env, cwd=tmp_path, start_new_session=True)
    try:
        for _ in range(300):
            found = re.search(r"on (http://\S+) ", log.read_text())
            if found or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert found, log.read_text()
        for page, holds in (("", b"<title>kface: visitors</title>"),
                            ("static/dashboard.js", b"api/counts?")):
            with urllib.request.urlopen(found.group(1) + page, timeout=30) as answer:
                assert answer.status == 200 and holds in answer.read()
    finally:
        stop_process(proc)


def test_light_install_says_which_commands_need_the_full_install(light_kface, tmp_path):
    """Every command the light install cannot run is marked in --help and refused in one
    line that names the install it needs (no traceback)."""
    res = run_light(light_kface, "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    marked = [line.split()[0] for line in res.stdout.splitlines()
              if "[needs the full install]" in line]
    assert {"run", "status", "server", "serve", "experiments", "evaluate", "export",
            "config"} <= set(marked) and "predict" not in marked and "video" not in marked
    for args in (["run", "--data-root", str(tmp_path)], ["status", "--out", str(tmp_path)],
                 ["server"], ["config"], ["evaluate", "--data-root", str(tmp_path)],
                 ["predict", str(tmp_path), "--workers", "2"]):
        res = run_light(light_kface, *args, cwd=tmp_path)
        lines = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()]
        assert res.returncode == 2 and len(lines) == 1, (args, lines)
        assert "full install" in lines[0] and "pip install -e . in the kface repository" \
            in lines[0], lines
        assert "pip install kface-pipeline" not in lines[0]  # no index serves that name


def test_light_install_says_a_keras_model_needs_the_full_install(light_kface, tiny_run,
                                                                 scenes_dir, tmp_path):
    res = run_light(light_kface, "predict", str(scenes_dir / "insightface_t1.jpg"),
                    "--model", str(tiny_run["model_dir"]), "--out", str(tmp_path / "p"),
                    cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "kface export --format onnx" in res.stderr
