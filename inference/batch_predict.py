"""Resumable, sharded batch prediction over photo archives (the ``kface-predict`` flow).

The photos under the inputs are listed once, in path order, into ``OUT/plan.parquet``
(path, size, mtime, shard number; ``shard_size`` consecutive photos a shard) with each
shard's cache key: its photos' paths, sizes and mtimes, the model's digest (sha256 of its
network file and ``labels.json``), the inference settings and ``CODE_VERSION``. A shard
is ``OUT/shards/shard-NNNNN.parquet``, written atomically with its key in the file's
metadata: one row per face (path, photo size, box, score, landmarks when the detector
gives them, per-class probabilities, the classes, the age in years when the model has
that head) and one row with an empty face for a photo without faces or that could not
be read (its ``error``). A rerun reads the plan and the shards' keys before any worker
starts and sends out only the shards whose key differs or whose file is missing, so a
killed run resumes where it stopped and an unchanged rerun costs the listing. Adding
photos whose names sort after the existing ones leaves the earlier shards' keys as they
were; a photo inserted in the middle moves the shards after it. ``predictions.json`` /
``.csv`` (the format of a single-process ``kface predict``) are merged from the shards on
request.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.storage import (
    file_sha256,
    fingerprint,
    read_cache_key,
    remove_temporaries,
    write_bytes_atomic,
    write_parquet_atomic,
)
from inference.predict import iter_images, predict_entries, predictions_csv, write_predictions
from models.analyzer import FaceAnalyzer
from models.backends import model_file
from models.detector import LANDMARK_COLUMNS

CODE_VERSION = "batch-predict-1"
PLAN = "plan.parquet"
SHARDS = "shards"
BOX = ("left", "top", "right", "bottom")


def model_digest(model_dir: Path) -> str:
    """sha256 of the model folder's network file and ``labels.json``."""
    model_dir = Path(model_dir)
    return fingerprint(file_sha256(model_file(model_dir)),
                       file_sha256(model_dir / "labels.json"))


def shard_path(out: Path, index: int) -> Path:
    return Path(out) / SHARDS / f"shard-{index:05d}.parquet"


def write_plan(inputs: Iterable[Path], out: Path, shard_size: int, digest: str,
               settings: dict) -> pa.Table:
    """List the photos under ``inputs`` into ``out/plan.parquet`` with their shard and
    the shard's key; returns the plan (one row per photo)."""
    paths, sizes, mtimes = [], [], []
    for path in iter_images(inputs):
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # a broken link: the shard reads it and records the error
            size, mtime = -1, -1
        paths.append(str(path))
        sizes.append(size)
        mtimes.append(mtime)
    shards = [i // shard_size for i in range(len(paths))]
    keys = []
    for index in range(0, len(paths), shard_size):
        part = slice(index, index + shard_size)
        keys.append(fingerprint(paths[part], sizes[part], mtimes[part], digest, settings,
                                CODE_VERSION))
    plan = pa.table({"path": paths, "file_size": pa.array(sizes, pa.int64()),
                     "mtime_ns": pa.array(mtimes, pa.int64()),
                     "number": pa.array(range(len(paths)), pa.int64()),
                     "shard": pa.array(shards, pa.int32()),
                     "key": [keys[s] for s in shards]})
    # a row group per shard: a shard's task reads its own rows only (row-group statistics)
    write_parquet_atomic(Path(out) / PLAN, plan, digest=False, row_group_size=shard_size)
    return plan


def shards_to_do(plan: pa.Table, out: Path) -> tuple[list[int], list[int]]:
    """(shards to compute, shards whose file is there with the plan's key)."""
    firsts = plan.group_by("shard").aggregate([("key", "min")])
    todo, done = [], []
    for index, key in zip(firsts.column("shard").to_pylist(),
                          firsts.column("key_min").to_pylist(), strict=True):
        (done if read_cache_key(shard_path(out, index)) == key else todo).append(index)
    return sorted(todo), sorted(done)


def remove_stale(out: Path, shard_count: int) -> list[str]:
    """Delete shard files beyond the plan (the inputs shrank) and the temporary files a
    killed worker left (call before any worker starts)."""
    remove_temporaries(Path(out) / SHARDS)
    stale = [p for p in (Path(out) / SHARDS).glob("shard-*.parquet")
             if int(p.stem.split("-")[1]) >= shard_count]
    for p in stale:
        p.unlink()
    return [p.name for p in stale]


def entries_table(entries: list[dict], labels: dict) -> pa.Table:
    """predictions.json entries -> the shard table (one row per face, one per photo
    without faces)."""
    g_names, a_names = labels["gender"], labels["age_band"]
    cols: dict[str, list] = {name: [] for name in (
        "path", "width", "height", "error", "face", *BOX, "score", "gender",
        *(f"p_{n}" for n in g_names), "age_band", *(f"p_{n}" for n in a_names), "age",
        *LANDMARK_COLUMNS)}
    for e in entries:
        for i, f in enumerate(e["faces"] or [None]):
            row = {"path": e["path"], "width": e["width"], "height": e["height"],
                   "error": e["error"], "face": None if f is None else i}
            if f is not None:
                row.update(zip(BOX, f["box"], strict=True))
                row.update(score=f["score"], gender=f["gender"], age_band=f["age_band"],
                           age=f.get("age"))
                row.update({f"p_{n}": f["gender_probs"][n] for n in g_names})
                row.update({f"p_{n}": f["age_band_probs"][n] for n in a_names})
                points = [v for point in f.get("landmarks") or () for v in point]
                row.update(zip(LANDMARK_COLUMNS, points, strict=False))
            for name, values in cols.items():
                values.append(row.get(name))
    types = {"width": pa.int32(), "height": pa.int32(), "face": pa.int16(),
             **dict.fromkeys(BOX, pa.int32()), "path": pa.string(), "error": pa.string(),
             "gender": pa.string(), "age_band": pa.string()}
    return pa.table({name: pa.array(values, types.get(name, pa.float64()))
                     for name, values in cols.items()})


def table_entries(table: pa.Table, labels: dict) -> list[dict]:
    """The shard table back into predictions.json entries (the inverse of
    ``entries_table``)."""
    g_names, a_names = labels["gender"], labels["age_band"]
    entries: list[dict] = []
    for row in table.to_pylist():
        if not entries or entries[-1]["path"] != row["path"]:
            entries.append({"path": row["path"], "width": row["width"],
                            "height": row["height"], "faces": [], "error": row["error"]})
        if row["face"] is None:
            continue
        points = [row[c] for c in LANDMARK_COLUMNS]
        entries[-1]["faces"].append({
            "box": [row[c] for c in BOX], "score": row["score"], "gender": row["gender"],
            "gender_probs": {n: row[f"p_{n}"] for n in g_names},
            "age_band": row["age_band"],
            "age_band_probs": {n: row[f"p_{n}"] for n in a_names}, "age": row["age"],
            "landmarks": ([points[i:i + 2] for i in range(0, len(points), 2)]
                          if points[0] is not None else None)})
    return entries


def predict_shard(analyzer: FaceAnalyzer, out: Path, index: int, annotated: bool) -> dict:
    """Analyse shard ``index`` of ``out/plan.parquet`` into its shard file (skipped when
    the file already holds the plan's key). Returns the shard's counts."""
    out = Path(out)
    rows = pq.read_table(out / PLAN, filters=[("shard", "=", index)])
    key = rows.column("key")[0].as_py()
    target = shard_path(out, index)
    if read_cache_key(target) == key:
        return {"shard": index, "photos": rows.num_rows, "reused": True}
    start = rows.column("number")[0].as_py()  # annotated files: numbered across shards
    entries = predict_entries(analyzer, rows.column("path").to_pylist(),
                              out / "annotated" if annotated else None, start)
    write_parquet_atomic(target, entries_table(entries, analyzer.labels), cache_key=key,
                         digest=False)
    return {"shard": index, "photos": len(entries), "reused": False,
            "faces": sum(len(e["faces"]) for e in entries),
            "unreadable": sum(bool(e["error"]) for e in entries)}


def merge(out: Path, labels: dict, shard_count: int, write_json: bool,
          write_csv: bool, provenance: dict | None = None) -> dict:
    """Counts over all shards; ``predictions.json``/``.csv`` merged when asked (with the
    ``provenance`` of ``models.analyzer.provenance``)."""
    out = Path(out)
    merging = write_json or write_csv
    columns = None if merging else ["path", "face", "error"]  # counts need only these
    table = pa.concat_tables([pq.read_table(shard_path(out, i), columns=columns)
                              for i in range(shard_count)]
                             ) if shard_count else entries_table([], labels)
    photos = pc.count_distinct(table.column("path")).as_py() if table.num_rows else 0
    counts = {"photos": photos, "faces": table.num_rows - table.column("face").null_count,
              "unreadable": pc.count_distinct(
                  table.filter(pc.is_valid(table.column("error"))).column("path")).as_py()
              if table.num_rows else 0}
    if merging:
        entries = table_entries(table, labels)
        if write_json:
            write_predictions(entries, out, provenance=provenance)
        if write_csv:
            write_bytes_atomic(out / "predictions.csv", predictions_csv(entries).encode())
    return counts
