"""Shards keyed on what the photos hold (issue 31): a copy with new mtimes costs one read
of the files and no detection; a touched file keeps its shard; changed content recomputes
only its shard; shards keyed the earlier way (paths, sizes, mtimes) are adopted."""

import json
import os
import shutil

import pandas as pd
import pyarrow.parquet as pq
from conftest import run_kface

from core.content import content_hashes
from core.storage import file_sha256, read_cache_key


def test_the_stat_cache_reads_only_new_or_changed_files(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(bytes([i]) * 1000)
    cache = tmp_path / "file_hashes.parquet"

    def scan(root):
        rows = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.iterdir())]
        return content_hashes(pd.DataFrame(rows, columns=["path", "file_size", "mtime_ns"]),
                              lambda rel: root / rel, cache)

    first, read = scan(folder)
    assert read == 3 and first == [file_sha256(folder / f"{i}.jpg") for i in range(3)]
    assert scan(folder) == (first, 0)  # nothing new: nothing read
    os.utime(folder / "1.jpg", ns=(1, 1))  # touched: read again, the same content
    assert scan(folder) == (first, 1)
    (folder / "2.jpg").write_bytes(b"other")  # new content: a new hash
    hashes, read = scan(folder)
    assert read == 1 and hashes[:2] == first[:2] and hashes[2] != first[2]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copy)  # new mtimes, same bytes
    assert scan(copy) == (hashes, 3)


def _run(tree, out, env):
    res = run_kface("run", "--data-root", str(tree), "--out", str(out), "--stages",
                    "select,detect", "--workers", "1", "--shard-size", "8", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return (json.loads((out / "stages" / "detect.json").read_text()),
            json.loads((out / "stages" / "select.json").read_text()))


def test_a_copied_dataset_is_read_once_and_not_detected_again(kface_tree, tmp_path,
                                                              prefect_env):
    tree = tmp_path / "tree"
    shutil.copytree(kface_tree, tree, symlinks=False)
    out = tmp_path / "run"
    detect, select = _run(tree, out, prefect_env)
    shards = detect["shards"]
    assert detect["shards_computed"] == shards and select["files_hashed"] == select["rows_out"]
    keys = {p.name: read_cache_key(p) for p in (out / "detections").glob("shard-*")}
    copy = tmp_path / "copy"  # a copy that does not keep the files' times
    shutil.copytree(tree, copy, copy_function=shutil.copy)
    detect, select = _run(copy, out, prefect_env)
    assert detect["shards_reused"] == shards and detect["shards_computed"] == 0
    assert select["files_hashed"] == select["rows_out"]  # one read of the files
    photos = sorted(pq.read_table(out / "manifest.parquet").column("path").to_pylist())
    touched, changed = copy / photos[0], copy / photos[-1]
    os.utime(touched, ns=(2, 2))  # a new mtime, the same content: its shard stays
    changed.write_bytes((copy / photos[1]).read_bytes())  # other content: recomputed
    detect, select = _run(copy, out, prefect_env)
    assert select["files_hashed"] == 2 and detect["shards_computed"] == 1
    after = {p.name: read_cache_key(p) for p in (out / "detections").glob("shard-*")}
    assert [n for n in keys if keys[n] != after[n]] == [
        f"shard-{photos[-1].split('/')[1]}.parquet"]


def test_shards_keyed_the_earlier_way_are_adopted(kface_tree, tmp_path, prefect_env):
    """A run folder from before content hashes: detection shards keyed on paths, sizes and
    mtimes are re-keyed by the next run, their detections kept, none recomputed."""
    from core.sharding import plan_shards
    from models.detector import DetectorConfig
    from tasks.detect import detect_shard
    from tasks.select import DataConfig, SelectionConfig, select_images

    manifest, _ = select_images(DataConfig(root=kface_tree), SelectionConfig())
    out = tmp_path / "run"
    for shard in plan_shards(manifest, "kface"):  # (no hashes: the earlier keys)
        detect_shard(kface_tree, shard, DetectorConfig(), out / "detections")
    before = {p.name: pq.read_table(p) for p in (out / "detections").glob("shard-*")}
    old_keys = {p.name: read_cache_key(p) for p in (out / "detections").glob("shard-*")}
    status = run_kface("status", "--data-root", str(kface_tree), "--out", str(out), "--json",
                       env=prefect_env)
    assert status.returncode == 0, status.stderr[-2000:]
    assert {p.name: read_cache_key(p) for p in (out / "detections").glob("shard-*")
            } == old_keys  # status only reads
    detect, _ = _run(kface_tree, out, prefect_env)
    assert detect["shards_computed"] == 0 and detect["shards_reused"] == len(before)
    for path in (out / "detections").glob("shard-*"):
        assert read_cache_key(path) != old_keys[path.name]  # re-keyed on content ...
        assert pq.read_table(path).equals(before[path.name])  # ... detections kept
