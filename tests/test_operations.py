"""Runs that survive real operations, with the real CLI, a real Prefect run and the real
detector: the dataset reached through another path, new subjects, a removed photo, a
changed shard size, a passing read error, stale and leftover shards."""

import json
import os
import re
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_kface

from flows.pipeline import STAGES

pytestmark = pytest.mark.slow

SPEC = {"lights": ("L1",), "cameras": ("C4", "C7")}
TINY = ["--set", "crops.size=32", "--set", "model.backbone=small_cnn", "--set",
        "train.epochs=1", "--set", "train.batch_size=8", "--workers", "2"]


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory, aaf_dir):
    """8 subjects x 2 photos (ids 19062410-19062417), with their metadata CSV."""
    from tasks.sample_data import TreeSpec, build_kface_tree

    root = tmp_path_factory.mktemp("ops-tree")
    build_kface_tree(aaf_dir, root, 8, TreeSpec(**SPEC), seed=5, first_id=19062410)
    return root


def _summary(out, stage: str) -> dict:
    folder = out / "experiments" / "default" if stage in ("train", "evaluate") else out
    return json.loads((folder / "stages" / f"{stage}.json").read_text())


def _shard_mtimes(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}


def _ok(res):
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_moved_and_respelled_roots_recompute_nothing(small_tree, tmp_path, prefect_env):
    out = tmp_path / "run"
    meta = small_tree / "KFace_metadata.csv"
    _ok(run_kface("run", "--data-root", str(small_tree), "--metadata", str(meta), "--out",
                  str(out), *TINY, env=prefect_env))
    files = {str(p): p.stat().st_mtime_ns for p in out.rglob("*")
             if p.is_file() and "stages" not in p.parts and p.name not in ("config.yaml",
                                                                             ".lock")}
    # the same data through a symlink, a copy of the metadata elsewhere, relative paths
    link = tmp_path / "mounted-elsewhere"
    link.symlink_to(small_tree)
    shutil.copy(meta, tmp_path / "meta-copy.csv")
    rel_root = os.path.relpath(link, REPO)  # the CLI runs in the repository folder
    rel_meta = os.path.relpath(tmp_path / "meta-copy.csv", REPO)
    status = _ok(run_kface("status", "--data-root", str(link), "--metadata",
                           str(tmp_path / "meta-copy.csv"), "--out", str(out), *TINY[:-2]))
    states = dict(re.findall(r"│ (\w+)\s+│ (done|cached|stale|missing)", status.stdout))
    assert states == dict.fromkeys(STAGES, "done"), status.stdout
    res = _ok(run_kface("run", "--data-root", rel_root, "--metadata", rel_meta, "--out",
                        str(out), *TINY, env=prefect_env))
    for stage in STAGES:
        assert _summary(out, stage)["reused"] is True, (stage, res.stderr[-2000:])
    assert {f: os.stat(f).st_mtime_ns for f in files} == files  # nothing rewritten


def test_growth_shrink_and_shard_size_touch_only_their_subjects(small_tree, tmp_path,
                                                                 aaf_dir, prefect_env):
    from tasks.labels import read_metadata
    from tasks.sample_data import TreeSpec, build_kface_tree, write_metadata_csv

    root = tmp_path / "tree"
    shutil.copytree(small_tree, root)
    out = tmp_path / "run"
    args = ["run", "--data-root", str(root), "--metadata", str(root / "KFace_metadata.csv"),
            "--out", str(out), "--stages", "select,detect,merge", "--workers", "2"]
    _ok(run_kface(*args, "--shard-size", "4", env=prefect_env))
    before = _shard_mtimes(out / "detections")
    assert len(before) == 8

    # the next delivery: one subject sorting first, one sorting last; one photo removed;
    # and another shard size
    extra = tmp_path / "extra"
    new = build_kface_tree(aaf_dir, extra, 2, TreeSpec(**SPEC), seed=9, first_id=19062300)
    moves = {"19062300": "19062300", "19062301": "19099999"}
    for old, sid in moves.items():
        shutil.move(extra / "High_Resolution" / old, root / "High_Resolution" / sid)
    removed = "High_Resolution/19062413/S001/L1/E01/C7.jpg"
    (root / removed).unlink()
    labels = read_metadata(root / "KFace_metadata.csv")
    rows = list(zip(labels.subject_id, labels.age_band, labels.gender, strict=True))
    rows += [(moves[s], b, g) for s, b, g in zip(new.subject_id, new.age_band, new.gender,
                                                  strict=True)]
    write_metadata_csv(root / "KFace_metadata.csv", rows)
    _ok(run_kface(*args, "--shard-size", "7", env=prefect_env))
    detect = _summary(out, "detect")
    assert (detect["shards"], detect["shards_computed"]) == (10, 3)
    after = _shard_mtimes(out / "detections")
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"shard-19062300.parquet", "shard-19099999.parquet",
                       "shard-19062413.parquet"}
    faces = pq.read_table(out / "faces.parquet").to_pandas()
    assert removed not in set(faces.path) and {"19062300", "19099999"} <= set(faces.subject_id)

    # a leftover shard file of an earlier plan is never merged
    shutil.copy(out / "detections" / "shard-19062410.parquet",
                out / "detections" / "shard-00000.parquet")
    (out / "faces.parquet").unlink()
    _ok(run_kface(*args[:-4], "--stages", "merge", env=prefect_env))
    again = pq.read_table(out / "faces.parquet").to_pandas()
    assert len(again) == len(faces) and not again.path.duplicated().any()

    # a photo changed since detection: a --stages merge run is refused before any work
    os.utime(root / "High_Resolution/19062411/S001/L1/E01/C4.jpg", ns=(1, 1))
    res = run_kface(*args[:-4], "--stages", "merge", env=prefect_env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "manifest.parquet, which is stale" in res.stderr
    assert "--stages select,detect,merge" in res.stderr and "Prefect API" not in res.stderr
    assert "Traceback" not in res.stderr


FAULTS = '''
import builtins, errno, os

_open = builtins.open
_target = os.environ.get("KFACE_TEST_EIO_FILE")
_tokens = os.environ.get("KFACE_TEST_EIO_TOKENS")


def _take_token() -> bool:
    for name in sorted(os.listdir(_tokens)):
        try:
            os.unlink(os.path.join(_tokens, name))
            return True
        except FileNotFoundError:
            continue
    return False


def open(file, *args, **kwargs):
    if _target and isinstance(file, (str, os.PathLike)) and os.fspath(file).endswith(
            _target) and _take_token():
        raise OSError(errno.EIO, "Input/output error", os.fspath(file))
    return _open(file, *args, **kwargs)


builtins.open = open
'''


def test_passing_read_error_is_retried_in_the_task_and_on_the_next_run(
        small_tree, tmp_path, prefect_env):
    """The disk read of one photo fails with EIO (a ``sitecustomize`` in the run's
    processes, workers included, fails its ``open`` once per token); everything else is
    the real run."""
    hooks, tokens = tmp_path / "hooks", tmp_path / "tokens"
    hooks.mkdir()
    tokens.mkdir()
    (hooks / "sitecustomize.py").write_text(FAULTS)
    target = "High_Resolution/19062412/S001/L1/E01/C4.jpg"
    env = {**prefect_env, "PYTHONPATH": f"{hooks}{os.pathsep}{REPO}",
           "KFACE_TEST_EIO_FILE": target, "KFACE_TEST_EIO_TOKENS": str(tokens)}
    out = tmp_path / "run"
    args = ["run", "--data-root", str(small_tree), "--out", str(out), "--stages",
            "select,detect", "--workers", "2"]

    for i in range(4):  # fails the select stage's hash read and all 3 detect attempts
        (tokens / str(i)).touch()
    _ok(run_kface(*args, env=env))
    assert _summary(out, "detect")["status_counts"]["unreadable"] == 1
    status = _ok(run_kface("status", "--out", str(out), env=env))
    assert "unreadable (a passing read error: the next run retries them): io 1" in status.stdout
    states = dict(re.findall(r"│ (\w+)\s+│ (done|cached|stale|missing)", status.stdout))
    assert states["detect"] == "stale", status.stdout  # the next run has work to do

    for i in range(3):  # the next run: the hash and two detect reads fail, the third reads
        (tokens / str(i)).touch()
    before = _shard_mtimes(out / "detections")
    _ok(run_kface(*args, env=env))
    detect = _summary(out, "detect")
    assert detect["rows_retried"] == 1 and "unreadable" not in detect["status_counts"]
    assert detect["shards_computed"] == 1 and not list(tokens.iterdir())
    after = _shard_mtimes(out / "detections")
    assert {n for n in after if after[n] != before[n]} == {"shard-19062412.parquet"}
    row = pq.read_table(out / "detections" / "shard-19062412.parquet").to_pandas().set_index(
        "path").loc[target]
    assert row.status == "ok"
