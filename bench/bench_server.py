"""Prefect API set-ups for the same select+detect run: ``python bench/bench_server.py``.

1. Prefect's default with no server configured: the flow called in a plain Python process,
   so the parent and every spawned worker process start their own temporary server
   (ephemeral mode). This is what the pipeline did before ``kface run`` started one.
2. ``kface run`` with no server configured (ours): one temporary server for the whole run,
   its URL exported to the workers.
3. ``kface run`` against a running ``prefect server start`` (SQLite).

Same tree (real AAF faces, 864x576), same shards, 2 workers; each run in a fresh output
folder so all shards are computed. Prints wall seconds and the ratios as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench_detect import make_tree  # noqa: E402
from conftest import start_prefect_server, stop_process  # noqa: E402

PLAIN = """
import sys
from flows.config import load_config
from flows.pipeline import kface_pipeline
cfg = load_config(None, {"data.root": sys.argv[1], "out": sys.argv[2], "sharding.workers": 2,
                         "sharding.shard_size": int(sys.argv[3])})
kface_pipeline(config=cfg, stages=["select", "detect"])
"""


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=2, help="81 photos each")
    parser.add_argument("--shard-size", type=int, default=10)
    args = parser.parse_args()
    root = REPO / "bench" / "out" / f"server-tree-{args.subjects}"
    n = len(make_tree(root, args.subjects))
    work = Path(tempfile.mkdtemp(prefix="kface-bench-server-"))
    base = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": "",
            "PREFECT_HOME": str(work / "home"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    shard = str(args.shard_size)
    kface = [sys.executable, "-m", "cli", "run", "--data-root", str(root), "--stages",
             "select,detect", "--workers", "2", "--shard-size", shard, "--out"]
    results = {"images": n, "shards": -(-n // args.shard_size), "workers": 2}
    results["prefect_default_s"] = timed(
        [sys.executable, "-c", PLAIN, str(root), str(work / "plain"), shard], base)
    results["kface_run_one_temporary_server_s"] = timed([*kface, str(work / "ours")], base)
    (work / "srv").mkdir()
    proc, url, env = start_prefect_server(work / "srv")
    try:
        results["kface_run_running_server_s"] = timed([*kface, str(work / "running")], env)
    finally:
        stop_process(proc)
    results["speedup_ours_vs_default"] = round(
        results["prefect_default_s"] / results["kface_run_one_temporary_server_s"], 2)
    results["speedup_running_server_vs_default"] = round(
        results["prefect_default_s"] / results["kface_run_running_server_s"], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
