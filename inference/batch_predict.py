"""Resumable, sharded batch prediction over photo archives (the ``kface-predict`` flow).

Batch predict shards as the pipeline does (``core.sharding``: one plan type, one resume
rule). The photos under the inputs are listed once, in path order, with their sha256
(``core.content``: a stat cache in ``OUT/file_hashes.parquet``, so only new or changed
files are read) into ``OUT/plan.parquet`` (path, size, mtime, sha256, shard number;
``shard_size`` consecutive photos a shard) with each shard's cache key: its photos'
paths and content, the model's digest (sha256 of its network file and ``labels.json``),
the inference settings and ``CODE_VERSION``. A shard is
``OUT/shards/shard-NNNNN.parquet``, written atomically with its key in the file's
metadata: one row per face (path, photo size, box, score, landmarks when the detector
gives them, per-class probabilities, the classes, the age in years when the model has
that head) and one row with an empty face for a photo without faces or that could not
be read (its ``error``). A rerun reads the plan and the shards' keys before any worker
starts and sends out only the shards whose file is missing or holds another key, so a
killed run resumes where it stopped, an unchanged rerun costs the listing, and a copy of
the archive with new mtimes costs one read of the files and no prediction. Shard files
written before content keys (paths, sizes and mtimes) are adopted. Adding photos whose
names sort after the existing ones leaves the earlier shards' keys as they were; a photo
inserted in the middle moves the shards after it. ``predictions.json`` / ``.csv`` (the
format of a single-process ``kface predict``) are merged from the shards on request.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.sharding import Shard, ShardPlan, ShardResult, consecutive_shards, holds_key
from core.storage import file_sha256, fingerprint, write_bytes_atomic, write_parquet_atomic
from inference.predict import iter_images, predict_entries, predictions_csv, write_predictions
from models.analyzer import FaceAnalyzer
from models.backends import model_file
from models.detector import LANDMARK_COLUMNS

CODE_VERSION = "batch-predict-1"
PLAN = "plan.parquet"
SHARDS = "shards"
HASHES = "file_hashes.parquet"  # the stat cache of the photos' sha256 (core.content)
BOX = ("left", "top", "right", "bottom")


def model_digest(model_dir: Path) -> str:
    """sha256 of the model folder's network file and ``labels.json``."""
    model_dir = Path(model_dir)
    return fingerprint(file_sha256(model_file(model_dir)),
                       file_sha256(model_dir / "labels.json"))


def list_photos(inputs: Iterable[Path]) -> pa.Table:
    """The photos under ``inputs`` in path order: path, file_size, mtime_ns (-1 for an
    entry that cannot be stat'ed: its shard reads it and records the error)."""
    paths, sizes, mtimes = [], [], []
    for path in iter_images(inputs):
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # a broken link
            size, mtime = -1, -1
        paths.append(str(path))
        sizes.append(size)
        mtimes.append(mtime)
    return pa.table({"path": pa.array(paths, pa.string()),
                     "file_size": pa.array(sizes, pa.int64()),
                     "mtime_ns": pa.array(mtimes, pa.int64())})


def shard_key(shard: Shard, digest: str, settings: dict) -> str:
    """A shard's cache key: its photos' paths and content, the model, the settings."""
    return fingerprint(shard.content_fingerprint(), digest, settings, CODE_VERSION)


def stat_key(shard: Shard, digest: str, settings: dict) -> str:
    """The key the same shard had before content keys (paths, sizes, mtimes)."""
    return fingerprint(shard.paths, shard.sizes, shard.mtimes, digest, settings,
                       CODE_VERSION)


def plan_batch(inputs: Iterable[Path], out: Path, shard_size: int, digest: str,
               settings: dict) -> ShardPlan:
    """List the photos under ``inputs`` into ``out/plan.parquet`` (their shard and the
    shard's key) and return the plan: the shards and, per shard, its file's summary when
    it is complete for its key (``core.sharding.holds_key``; files of the stat key rule
    are re-keyed in place)."""
    from core.content import content_hashes

    out = Path(out)
    photos = list_photos(inputs)
    hashes, _ = content_hashes(photos.to_pandas(), Path, out / HASHES)
    photos = photos.append_column("sha256", pa.array(hashes, pa.string()))
    shards = consecutive_shards(photos, shard_size)
    keys = [shard_key(s, digest, settings) for s in shards]
    plan = photos.append_column("number", pa.array(range(photos.num_rows), pa.int64()))
    plan = plan.append_column("shard", pa.array(
        [int(s.name) for s in shards for _ in s.paths], pa.int32()))
    plan = plan.append_column("key", pa.array(
        [k for s, k in zip(shards, keys, strict=True) for _ in s.paths], pa.string()))
    # a row group per shard: a shard's task reads its own rows only (row-group statistics)
    write_parquet_atomic(out / PLAN, plan, digest=False, row_group_size=shard_size)
    stored = []
    for shard, key in zip(shards, keys, strict=True):
        final = out / SHARDS / shard.filename
        done = holds_key(final, key, lambda s=shard: stat_key(s, digest, settings),
                         adopt=True)
        stored.append(ShardResult.on_disk(final, pq.read_metadata(final).num_rows, {})
                      if done else None)
    return ShardPlan(shards, stored)


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


def predict_shard(analyzer: FaceAnalyzer, out: Path, index: int, annotated: bool
                  ) -> ShardResult:
    """Analyse shard ``index`` of ``out/plan.parquet`` into its shard file (skipped when
    the file already holds the plan's key). Returns the shard's result (its counts:
    ``faces``, ``no_face``, ``unreadable`` photos)."""
    out = Path(out)
    rows = pq.read_table(out / PLAN, filters=[("shard", "=", index)])
    key = rows.column("key")[0].as_py()
    shard = Shard(f"{index:05d}", tuple(rows.column("path").to_pylist()), ())
    target = out / SHARDS / shard.filename
    if holds_key(target, key):
        return ShardResult.done_here(shard, target, pq.read_metadata(target).num_rows, {},
                                     reused=True)
    start = rows.column("number")[0].as_py()  # annotated files: numbered across shards
    entries = predict_entries(analyzer, list(shard.paths),
                              out / "annotated" if annotated else None, start)
    table = entries_table(entries, analyzer.labels)
    write_parquet_atomic(target, table, cache_key=key, digest=False)
    unreadable = sum(bool(e["error"]) for e in entries)
    return ShardResult.done_here(shard, target, table.num_rows, {
        "faces": sum(len(e["faces"]) for e in entries), "unreadable": unreadable,
        "no_face": sum(not e["faces"] and not e["error"] for e in entries)})


def merge(out: Path, labels: dict, shards: list[Shard], write_json: bool,
          write_csv: bool, provenance: dict | None = None) -> dict:
    """Counts over all shards; ``predictions.json``/``.csv`` merged when asked (with the
    ``provenance`` of ``models.analyzer.provenance``)."""
    out = Path(out)
    merging = write_json or write_csv
    columns = None if merging else ["path", "face", "error"]  # counts need only these
    table = pa.concat_tables([pq.read_table(out / SHARDS / s.filename, columns=columns)
                              for s in shards]) if shards else entries_table([], labels)
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
