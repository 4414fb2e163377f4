"""Training as a user runs it, with the real CLI: experiments over one prepared run folder,
the JAX backend beside TensorFlow, a retraining killed mid-way that neither harms the
previous model nor loses its best checkpoint when resumed."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, run_kface

pytestmark = pytest.mark.slow

TINY = ["--set", "crops.size=32", "--set", "model.backbone=small_cnn", "--set",
        "train.batch_size=4", "--set", "train.early_stopping_patience=0", "--workers", "2"]


def _summary(out, experiment: str, stage: str) -> dict:
    return json.loads((out / "experiments" / experiment / "stages" / f"{stage}.json")
                      .read_text())


def _ok(res):
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_experiments_backends_and_a_killed_retraining(kface_tree, tmp_path, prefect_env):
    out = tmp_path / "run"
    common = ["--data-root", str(kface_tree), "--metadata",
              str(kface_tree / "KFace_metadata.csv"), "--out", str(out), *TINY]
    # the exact-age recipe on K-Face, which gives bands only: falls back to the band head
    _ok(run_kface("run", *common, "--set", "train.epochs=2", "--set", "model.exact_age=true",
                  env=prefect_env))
    default_model = out / "experiments" / "default" / "model" / "model.keras"
    first_mtime = default_model.stat().st_mtime_ns
    train = _summary(out, "default", "train")
    assert train["backend"] == "tensorflow" and train["heads"] == ["gender", "age_band"]
    report = (out / "experiments" / "default" / "reports" / "report.md").read_text()
    assert "age bands only" in report

    # a second recipe on the JAX backend, reusing the prepared data untouched
    data_files = {p: p.stat().st_mtime_ns for p in (out / "crops").glob("*.parquet")}
    res = _ok(run_kface("run", *common, "--set", "train.epochs=1", "--experiment", "jax",
                        "--stages", "train,evaluate", env={**prefect_env,
                                                           "KERAS_BACKEND": "jax"}))
    train = _summary(out, "jax", "train")
    assert train["backend"] == "jax" and train["epochs_run"] == 1, res.stderr[-2000:]
    report = (out / "experiments" / "jax" / "reports" / "report.md").read_text()
    assert "Scored on **test**" in report
    assert {p: p.stat().st_mtime_ns for p in data_files} == data_files
    assert default_model.stat().st_mtime_ns == first_mtime
    listing = _ok(run_kface("experiments", "--out", str(out))).stdout
    rows = {m[0]: m for m in re.findall(r"│ (\w+)\s+│ small_cnn\s+│ 32\s+│ (\S+)\s+│ "
                                        r"([\d.]+)\s+│ ([\d.]+)", listing)}
    assert set(rows) == {"default", "jax"}, listing
    assert rows["default"][1] == "2/2" and rows["jax"][1] == "1/1"

    # retrain 'default' with 6 epochs, killed after its second: the old model stays
    args = [sys.executable, "-m", "cli", "run", *common, "--set", "train.epochs=6"]
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, **prefect_env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline, done = time.time() + 400, 0
    while time.time() < deadline and done < 2:
        assert proc.poll() is None, "the training finished before it could be killed"
        history = list((out / "experiments" / "default").glob(".training-*/history.csv"))
        done = len(history[0].read_text().splitlines()) - 1 if history else 0
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert default_model.stat().st_mtime_ns == first_mtime  # not replaced, not deleted
    listing = _ok(run_kface("experiments", "--out", str(out))).stdout
    assert "a newer training unfinished" in listing

    # the rerun resumes after the finished epochs and keeps the best checkpoint
    _ok(run_kface("run", *common, "--set", "train.epochs=6", env=prefect_env))
    train = _summary(out, "default", "train")
    killed_after = train["resumed_after_epochs"]
    assert 2 <= killed_after < 6 and train["epochs_run"] == 6
    history = json.loads((out / "experiments" / "default" / "model" / "history.json")
                         .read_text())
    assert len(history["epoch"]) == 6
    # the saved model is the best of all epochs, before and after the kill, and the
    # reported best epoch and accuracy are that model's (measured again here)
    best = train["val_age_band_accuracy"]
    assert best >= max(history["val_age_band_accuracy"]) - 1e-9
    # (whether the best epoch came before the kill or after it)
    assert best == pytest.approx(history["val_age_band_accuracy"][train["best_epoch"] - 1],
                                 abs=1e-6)
    assert not list((out / "experiments" / "default").glob(".training-*"))
    assert _val_age_accuracy(out) == pytest.approx(best, abs=1e-6)


def _val_age_accuracy(out) -> float:
    from flows.config import load_config
    from flows.stages.crops import crop_files
    from models.classifier import load_classifier
    from tasks.crop_stream import load_index
    from tasks.evaluate import predict_frame

    cfg = load_config(out / "config.yaml")
    crops = load_index(crop_files(cfg), out / "faces.parquet", out / "split.parquet")
    model = load_classifier(out / "experiments" / "default" / "model" / "model.keras")
    val = crops.splits["val"]
    probs = predict_frame(model, val, crops.files, cfg.crops.size)
    return float(np.mean(probs["age_band"].argmax(1) == val.age_idx.to_numpy()))
