"""What a photo holds, not when it was written: sha256 of each file, with a stat cache.

Shard keys made of paths, sizes and mtimes (what the scan sees for free) break on a copy
that does not keep mtimes (``cp -r``, many restores and syncs): every shard would be
detected again, hours at K-Face size. So the select stage records each photo's sha256
(the manifest's ``sha256``) and the shards are keyed on paths and content. Hashing every
file on every run would cost a read of the dataset each time, so, as git's index does,
``content_hashes`` keeps a stat cache in the run folder (``file_hashes.parquet``: path,
size, mtime, sha256): a file whose size and mtime are the cached ones is not read; any
other (new, changed, or copied with new times) is read and hashed once, in threads
(hashlib releases the GIL). A copied dataset therefore costs one read of its files and
no detection; an unchanged rerun reads none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from core.storage import file_sha256

if TYPE_CHECKING:
    import pandas as pd

HASH_THREADS = 4
HASH_CHUNK = 4096  # files hashed per batch of futures
CACHE_COLUMNS = ("path", "file_size", "mtime_ns", "sha256")


def _sha256(path: Path | None) -> str | None:
    """The file's sha256, or None when it cannot be read (the stages report why)."""
    if path is None:
        return None
    try:
        return file_sha256(path)
    except OSError:
        return None


def content_hashes(files: pd.DataFrame, resolve: Callable[[str], Path], cache: Path,
                   threads: int = HASH_THREADS, save: bool = True
                   ) -> tuple[list[str | None], int]:
    """The sha256 of each of ``files``' rows (``path``, ``file_size``, ``mtime_ns``;
    ``resolve(path)`` is where the file is), taken from the stat cache ``cache`` where
    the size and mtime match, else read and hashed; with ``save`` the cache is rewritten
    (atomically) when something was hashed. Returns the hashes and how many files were
    read."""
    import pandas as pd
    import pyarrow as pa

    from core.storage import write_parquet_atomic

    known: dict[str, tuple[int, int, str]] = {}
    if Path(cache).exists():
        stored = pd.read_parquet(cache, columns=list(CACHE_COLUMNS))
        known = dict(zip(stored.path, zip(stored.file_size, stored.mtime_ns, stored.sha256,
                                          strict=True), strict=True))
        del stored
    hashes: list[str | None] = []
    todo: list[int] = []
    file_paths = files.path.tolist()
    for i, (path, size, mtime) in enumerate(zip(file_paths, files.file_size, files.mtime_ns,
                                                strict=True)):
        hit = known.get(path)
        hashes.append(hit[2] if hit and hit[0] == size and hit[1] == mtime else None)
        if hashes[-1] is None:
            todo.append(i)
    if todo:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            # in chunks: a future per file at once would hold ~1 KB each (600 MB for K-Face)
            for start in range(0, len(todo), HASH_CHUNK):
                chunk = todo[start:start + HASH_CHUNK]
                paths = [_resolved(resolve, file_paths[i]) for i in chunk]
                for i, digest in zip(chunk, pool.map(_sha256, paths), strict=True):
                    hashes[i] = digest
        rows = pd.DataFrame({"path": files.path, "file_size": files.file_size,
                             "mtime_ns": files.mtime_ns, "sha256": hashes})
        rows = rows[rows.sha256.notna()]
        if not save:
            return hashes, len(todo)
        if known:  # keep the entries of files this scan did not see (another selection)
            seen = set(rows.path)
            rows = pd.concat([rows, pd.DataFrame(
                [(p, *v) for p, v in known.items() if p not in seen],
                columns=list(CACHE_COLUMNS))], ignore_index=True)
        write_parquet_atomic(cache, pa.Table.from_pandas(rows, preserve_index=False),
                             digest=False)
    return hashes, len(todo)


def _resolved(resolve: Callable[[str], Path], rel: str) -> Path | None:
    try:
        return resolve(rel)
    except ValueError:  # (ImageError: a path of no known folder; reported later)
        return None


def stat_digest(size: int, mtime: int) -> str:
    """What stands for an unreadable file's content in a key: its stat (the stages give
    such a file an error row, and a fixed file a new key)."""
    return "stat:" + hashlib.sha256(f"{size}:{mtime}".encode()).hexdigest()
