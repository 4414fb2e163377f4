"""Sharding, shared by every sharded job (the detect and crops stages, batch predict).

Photos are grouped into shards (one file each: by subject in the pipeline, by path order
in batch predict) and shards into task-sized batches. One plan type (``ShardPlan``: the
shards and, per shard, the summary of its file when it is complete) and one resume rule
(``holds_key``: a shard file is complete when its Parquet metadata holds the shard's
key; files written under the previous key rule are adopted) serve them all, and
``tidy_shards`` clears what a killed run left before any worker starts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from core.content import stat_digest
from core.storage import fingerprint, read_cache_key, remove_temporaries, write_parquet_atomic

if TYPE_CHECKING:
    import pyarrow as pa

HASH_BUCKETS = 256  # shards of a layout without many photos per subject


@dataclass(frozen=True)
class ShardResult:
    """One shard of a sharded stage (detect, crops), computed now or found complete on
    disk: what the stage's summary adds up."""

    shard: str  # the shard's name (its file is shard-<name>.parquet)
    file: str
    rows: int
    reused: bool  # found complete for its key: nothing computed
    status_counts: dict[str, int]
    retried: int = 0  # rows computed again (detect: photos unreadable last time)
    ran_on: str | None = None  # host:pid of the process that computed it

    @classmethod
    def on_disk(cls, final: os.PathLike, rows: int, counts: dict[str, int]) -> ShardResult:
        """A shard file complete for its key."""
        name = os.path.basename(final).removeprefix("shard-").removesuffix(".parquet")
        return cls(name, str(final), rows, True, counts)

    @classmethod
    def done_here(cls, shard: Shard, final: os.PathLike, rows: int, counts: dict[str, int],
                  reused: bool = False, retried: int = 0) -> ShardResult:
        """A shard this process computed (or found complete)."""
        return cls(shard.name, str(final), rows, reused, counts, retried, worker_id())


def worker_id() -> str:
    """``host:pid`` of the process doing a shard (the stage summary lists them)."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


class ShardingConfig(BaseModel):
    """How sharded stages split their work over worker processes."""

    model_config = ConfigDict(extra="forbid")

    shard_size: int = Field(
        250, ge=1, description="Images per task run: consecutive shards (one per K-Face "
        "subject) are grouped into one task up to about this many images. A performance "
        "setting only: it changes no file and no cache key.")
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1,
        description="Worker processes (ProcessPoolTaskRunner, spawn).",
    )
    opencv_threads: int = Field(1, ge=0, description="cv2.setNumThreads in each worker.")
    dask_address: str | None = Field(
        None, description="Run the sharded tasks on this existing Dask cluster "
        "(e.g. tcp://scheduler:8786) instead of local worker processes; every Dask worker "
        "must see data.root and out at the same paths.")


@dataclass(frozen=True)
class Shard:
    """One unit of sharded work and one file: the photos of one partition (see
    ``partition_name``), sorted by path, with their sizes, and their mtimes and sha256
    where the table it was planned from has them."""

    name: str
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    mtimes: tuple[int, ...] = ()
    hashes: tuple[str | None, ...] = ()

    @property
    def filename(self) -> str:
        return f"shard-{self.name}.parquet"

    def content_fingerprint(self) -> str:
        """What the shard's photos are: their paths and sha256 (``core.content``; an
        unreadable file's stat stands in), so that a copy with new mtimes keeps the key;
        without hashes (a table of a kface before 2026-12, or a caller that took none),
        the paths, sizes and mtimes (``stat_fingerprint``)."""
        if not self.hashes:
            return self.stat_fingerprint()
        return fingerprint(self.paths, [h or stat_digest(s, m) for h, s, m in zip(
            self.hashes, self.sizes, self.mtimes or [0] * len(self.paths), strict=True)])

    def stat_fingerprint(self) -> str | None:
        """Paths, sizes and mtimes: what shard keys were made of before content hashes
        (their files are adopted, not recomputed); None without mtimes."""
        return fingerprint(self.paths, self.sizes, self.mtimes) if self.mtimes else None


@dataclass(frozen=True)
class ShardPlan:
    """A sharded job's plan: its shards and, per shard, the stored summary of a file
    complete for the shard's key (None: the shard needs work)."""

    shards: list[Shard]
    stored: list[ShardResult | None]
    extra: Any = None  # what the job's calls need besides the shard (the crop plan)

    @property
    def todo(self) -> list[Shard]:
        return [s for s, done in zip(self.shards, self.stored, strict=True) if done is None]


def holds_key(final: Path, key: str, old_key: Callable[[], str | None] | None = None,
              adopt: bool = False) -> bool:
    """The resume rule: whether the shard file ``final`` is complete for ``key`` (its
    Parquet metadata holds it; files are written atomically, so a file that is there is
    whole). A file holding ``old_key()`` (the key the same inputs had under the previous
    key rule; computed only when the key differs) is complete too, and with ``adopt``
    (a run, never ``kface status``) it is re-keyed in place, its rows kept."""
    stored = read_cache_key(final)
    if stored == key:
        return True
    if stored is None or old_key is None or stored != old_key():
        return False
    if adopt:
        import pyarrow.parquet as pq

        write_parquet_atomic(final, pq.read_table(final).replace_schema_metadata(None), key,
                             digest=False)
    return True


def tidy_shards(out_dir: Path, shards: Sequence[Shard]) -> list[str]:
    """Delete the temporary files a killed worker left in ``out_dir`` and the shard
    files the plan does not contain (the inputs shrank), so readers of
    ``shard-*.parquet`` see exactly this plan's shards. Call it only while no worker of
    this folder runs. Returns the names of the shard files removed."""
    remove_temporaries(Path(out_dir), ".shard-*.tmp")
    wanted = {s.filename for s in shards}
    removed = []
    for path in sorted(Path(out_dir).glob("shard-*.parquet")):
        if path.name not in wanted:
            path.unlink()
            removed.append(path.name)
    return removed


def partition_name(subject_id: str, layout: str) -> str:
    """The shard a subject's photos go to: the K-Face ID itself (486 photos a subject),
    else one of ``HASH_BUCKETS`` buckets by the sha256 of the ID (a labelled folder
    often has one photo a subject). Depends on nothing but the ID."""
    if layout == "kface":
        return subject_id  # 8 digits (select matched it with \d{8})
    bucket = int(hashlib.sha256(subject_id.encode()).hexdigest()[:8], 16) % HASH_BUCKETS
    return f"h{bucket:03d}"


def plan_shards(table: pa.Table, layout: str) -> list[Shard]:
    """Partition manifest-like rows (``path``, ``subject_id``, ``file_size``, and
    ``mtime_ns`` and ``sha256`` where present) into shards by subject, sorted by shard
    name, paths sorted inside."""
    table = table.sort_by("path")
    names = table.column_names
    n = table.num_rows

    def column(name: str) -> list:
        return table.column(name).to_pylist() if name in names else [None] * n

    groups: dict[str, list[tuple]] = {}
    for path, subject, size, mtime, digest in zip(
            column("path"), column("subject_id"), column("file_size"), column("mtime_ns"),
            column("sha256"), strict=True):
        groups.setdefault(partition_name(subject, layout), []).append(
            (path, size, mtime, digest))
    shards = []
    for name, rows in sorted(groups.items()):
        paths, sizes, mtimes, hashes = (tuple(col) for col in zip(*rows, strict=True))
        shards.append(Shard(name, paths, sizes,
                            mtimes if "mtime_ns" in names else (),
                            hashes if "sha256" in names else ()))
    return shards


def consecutive_shards(table: pa.Table, size: int) -> list[Shard]:
    """Batch predict's partition: ``size`` consecutive rows of ``table`` (``path``,
    ``file_size``, ``mtime_ns``, ``sha256``; in the order given) a shard, named by number
    (``00000``, ``00001``, ...). Photos whose names sort after the existing ones leave the
    earlier shards as they were; a photo inserted in the middle moves the shards after
    it."""
    columns = [table.column(name).to_pylist()
               for name in ("path", "file_size", "mtime_ns", "sha256")]
    return [Shard(f"{i // size:05d}", *(tuple(col[i:i + size]) for col in columns))
            for i in range(0, table.num_rows, size)]


def batch_shards(shards: Sequence[Shard], shard_size: int) -> list[list[Shard]]:
    """Group consecutive shards into task-sized batches of about ``shard_size`` photos
    (a shard is never split; a batch closes once it holds ``shard_size`` or more)."""
    batches: list[list[Shard]] = []
    size = shard_size
    for shard in shards:
        if size >= shard_size:
            batches.append([])
            size = 0
        batches[-1].append(shard)
        size += len(shard.paths)
    return batches


def shard_runner(sharding: ShardingConfig):
    """Where sharded tasks run: local spawn worker processes, or an existing Dask cluster
    (Prefect's task runners, imported here only: this layer needs no Prefect otherwise)."""
    if sharding.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=sharding.dask_address)
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=sharding.workers)
