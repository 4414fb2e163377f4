"""Scale-out: the detect tasks run unchanged on a real Dask cluster (a LocalCluster this
test starts) and give the same shards as the local process pool."""

import json
import os

import pyarrow.parquet as pq
import pytest
from conftest import detections_table, run_kface

from tasks.storage import read_cache_key

pytestmark = pytest.mark.slow


def test_dask_cluster_gives_the_same_shards(full_run, kface_tree, tmp_path, prefect_env):
    from distributed import Client, LocalCluster

    reference, _ = full_run
    out = tmp_path / "dask"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        res = run_kface("run", "--data-root", str(kface_tree), "--out", str(out), "--stages",
                        "select,detect", "--shard-size", "4", "--dask-address",
                        cluster.scheduler_address, env=prefect_env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "Connecting to an existing Dask cluster" in res.stderr
        cluster_pids = set(client.run(os.getpid).values())
    detect = json.loads((out / "stages" / "detect.json").read_text())
    ran_on = {int(w.rsplit(":", 1)[1]) for w in detect["ran_on"]}
    assert ran_on and ran_on <= cluster_pids  # every shard ran in a Dask worker process
    assert detect["shards_computed"] == 11 and detect["dask_address"]
    names = sorted(p.name for p in (out / "detections").glob("shard-*.parquet"))
    assert names == sorted(p.name for p in (reference / "detections").glob("shard-*.parquet"))
    for name in names:  # same cache keys: same inputs, settings and code
        assert read_cache_key(out / "detections" / name) == read_cache_key(
            reference / "detections" / name)
        assert pq.read_table(out / "detections" / name).equals(
            pq.read_table(reference / "detections" / name))
    assert detections_table(out).equals(detections_table(reference))
