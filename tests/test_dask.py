"""Scale-out: the sharded tasks (detect, crops) run unchanged on a real Dask cluster (a
LocalCluster this test starts) and give the same shards as the local process pool."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import detections_table, run_kface

from core.storage import read_cache_key

pytestmark = pytest.mark.slow


def _same_shards(folder_a, folder_b) -> int:
    names = sorted(p.name for p in folder_a.glob("shard-*.parquet"))
    assert names and names == sorted(p.name for p in folder_b.glob("shard-*.parquet"))
    for name in names:  # same cache keys (same inputs, settings, code) and same rows
        assert read_cache_key(folder_a / name) == read_cache_key(folder_b / name)
        assert pq.read_table(folder_a / name).equals(pq.read_table(folder_b / name))
    return len(names)


def _ran_on(out, stage: str) -> set[int]:
    summary = json.loads((out / "stages" / f"{stage}.json").read_text())
    assert summary["shards_computed"] == summary["shards"] and summary["dask_address"]
    return {int(w.rsplit(":", 1)[1]) for w in summary["ran_on"]}


def test_dask_cluster_gives_the_same_shards(full_run, kface_tree, tmp_path, prefect_env):
    from distributed import Client, LocalCluster

    reference = tmp_path / "pool"  # the process-pool run of select+detect, then crops
    shutil.copytree(full_run[0], reference)
    metadata = str(kface_tree / "KFace_metadata.csv")
    common = ["--data-root", str(kface_tree), "--metadata", metadata, "--shard-size", "4"]
    res = run_kface("run", *common, "--out", str(reference), "--stages",
                    "merge,split,crops", "--workers", "2", env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "dask"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        res = run_kface("run", *common, "--out", str(out), "--stages",
                        "select,detect,merge,split,crops", "--dask-address",
                        cluster.scheduler_address, env=prefect_env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "Connecting to an existing Dask cluster" in res.stderr
        cluster_pids = set(client.run(os.getpid).values())
    for stage in ("detect", "crops"):  # every shard ran in a Dask worker process
        assert _ran_on(out, stage) and _ran_on(out, stage) <= cluster_pids
    assert _same_shards(out / "detections", reference / "detections") == 20
    assert detections_table(out).equals(detections_table(reference))
    assert _same_shards(out / "crops", reference / "crops") >= 8
