"""What an unchanged rerun costs against ``kface status`` on the same run folder (issue 21:
the run decides reuse before it starts workers, so a rerun that has nothing to do should
cost about what status costs).

Builds a K-Face-layout tree of ``--subjects`` subjects (AAF faces, ``--photos`` camera
folders each: one detection shard and one crop shard per subject), runs the data stages
once, then times, on the same folder in the same run: ``kface status``, and
``kface run --stages select,detect,merge,split,crops`` with nothing changed (the CLI with
its temporary Prefect server, as a user runs it). With ``--baseline DIR`` (a checkout of
an earlier commit, e.g. ``git worktree add /tmp/before 6f95cef``), the same unchanged
rerun is also timed with that code, on the same folder in the same run (the keys are
the same, so it too reuses everything). Prints the figures and the ratios.
``python bench/bench_rerun.py [--subjects 96] [--photos 4] [--baseline DIR]``
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

CAMERAS = ("C4", "C5", "C6", "C7", "C8", "C9", "C10", "C19", "C20")


def kface(*args: str, env: dict, repo: Path = REPO
          ) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "cli", *args], cwd=repo,
                         env={**env, "PYTHONPATH": str(repo)}, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"kface {args[0]} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - start, res


def main() -> None:
    from tasks.sample_data import TreeSpec, build_kface_tree

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=96)
    parser.add_argument("--photos", type=int, default=4, help="cameras per subject (<= 9)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier commit")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-rerun-"))
    tree, out = work / "tree", work / "run"
    build_kface_tree(REPO.parent / "shared" / "data" / "faces" / "aaf", tree, args.subjects,
                     TreeSpec(cameras=CAMERAS[:args.photos]), ground_truth=False)
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": "",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    common = ["--data-root", str(tree), "--metadata", str(tree / "KFace_metadata.csv"),
              "--out", str(out), "--workers", str(args.workers),
              # one subject's shard a task, as K-Face's 486 photos a subject are with the
              # default shard_size of 200
              "--shard-size", str(args.photos)]
    data = ["--stages", "select,detect,merge,split,crops"]
    first, _ = kface("run", *common, *data, env=env)
    status, res = kface("status", *common, "--json", env=env)
    states = {s["stage"]: s["state"] for s in json.loads(res.stdout)["stages"]}
    rerun, _ = kface("run", *common, *data, env=env)
    summaries = {s: json.loads((out / "stages" / f"{s}.json").read_text())
                 for s in ("detect", "crops")}
    result = {
        "subjects": args.subjects, "photos": args.subjects * args.photos,
        "shards": summaries["detect"]["shards"] + summaries["crops"]["shards"],
        "first_run_s": round(first, 1), "status_s": round(status, 1),
        "unchanged_rerun_s": round(rerun, 1), "rerun_over_status": round(rerun / status, 2),
        "shard_tasks_in_rerun": summaries["detect"]["tasks"] + summaries["crops"]["tasks"],
        "all_cached": all(v["reused"] for v in summaries.values()),
        "status_before_rerun": states,
    }
    if args.baseline:
        before, _ = kface("run", *common, *data, env=env, repo=args.baseline)
        summaries = {s: json.loads((out / "stages" / f"{s}.json").read_text())
                     for s in ("detect", "crops")}
        result.update(baseline=str(args.baseline), baseline_rerun_s=round(before, 1),
                      baseline_shard_tasks=sum(v["tasks"] for v in summaries.values()),
                      baseline_over_now=round(before / rerun, 2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
