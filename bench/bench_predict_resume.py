"""The batch flow at archive scale: ``kface predict --workers 2`` on a folder of N photos
(real All-Age-Faces photos, repeated under new names), killed with SIGKILL (CLI,
temporary server and workers) once about half of the shards are written, then run again.
Prints: photos/s before the kill, the shards finished at the kill and whether the rerun
left every one of them untouched, the rerun's photos/s on the rest, the rows in the end
(every photo once), and the size of the flow's parameters.

``python bench/bench_predict_resume.py [--photos 100000] [--shard-size 500]
[--detector yunet]`` (an ONNX export of the quality recipe's network, untrained: speed
only; res10 by default).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from bench.bench_predict import SHARED, save_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--detector", choices=["res10", "yunet"], default="res10")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    folder = work / "photos"
    folder.mkdir()
    sources = sorted((SHARED / "faces" / "aaf").glob("*.jpg"))
    for i in range(args.photos):
        (folder / f"{i:07d}.jpg").symlink_to(sources[i % len(sources)].resolve())
    save_model(work / "keras", 160)
    from models.export import export_model

    export_model(work / "keras", work / "model", "onnx")
    out = work / "out"
    cli = [sys.executable, "-m", "cli", "predict", str(folder), "--model",
           str(work / "model"), "--out", str(out), "--workers", str(args.workers),
           "--shard-size", str(args.shard_size), "--detector", args.detector]
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": ""}
    shards = -(-args.photos // args.shard_size)
    start = time.perf_counter()
    proc = subprocess.Popen(cli, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = None
    while proc.poll() is None:
        written = list((out / "shards").glob("shard-*.parquet"))
        if written and first is None:
            first = time.perf_counter()
        if len(written) >= shards // 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = time.perf_counter() - start
    done = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard-*.parquet")}
    rerun_start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c",
                          "import json, sys; from pathlib import Path\n"
                          "from flows.server import prefect_api\n"
                          "from flows.predict import kface_predict\n"
                          "with prefect_api():\n"
                          "    s = kface_predict(Path(sys.argv[1]), [Path(sys.argv[2])], "
                          "Path(sys.argv[3]), int(sys.argv[4]), workers=int(sys.argv[5]), "
                          "detector=sys.argv[6])\n"
                          "print('RESULT', json.dumps(s))\n",
                          str(work / "model"), str(folder), str(out), str(args.shard_size),
                          str(args.workers), args.detector],
                         cwd=REPO, env=env, capture_output=True, text=True)
    rerun = time.perf_counter() - rerun_start
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    summary = json.loads(next(x for x in res.stdout.splitlines()
                              if x.startswith("RESULT "))[7:])
    untouched = all((out / "shards" / n).stat().st_mtime_ns == m for n, m in done.items())
    table = pq.read_table(sorted((out / "shards").glob("shard-*.parquet")),
                          columns=["path", "face"])
    paths = table.column("path").unique()
    before = len(done) * args.shard_size
    print(json.dumps({
        "photos": args.photos, "shards": shards, "workers": args.workers,
        "detector": args.detector,
        "cpus": os.cpu_count(), "killed_after_s": round(killed_after, 1),
        "shards_done_at_kill": len(done),
        "photos_per_s_before_kill": round(before / killed_after, 1),  # start-up included
        "first_shard_after_s": round(first - start, 1) if first else None,
        "rerun": summary, "rerun_s": round(rerun, 1),
        "rerun_photos_per_s": round((args.photos - before) / rerun, 1),
        "finished_shards_untouched": untouched,
        "every_photo_once": len(paths) == args.photos, "rows": table.num_rows,
        "flow_parameter_bytes": summary["parameter_bytes"],
    }, indent=2))


if __name__ == "__main__":
    main()
