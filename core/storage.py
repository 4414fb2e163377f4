"""Atomic writes and content fingerprints: the two things every stage output relies on.

Every file a stage produces is written to a temporary name in the same folder and then
renamed over the final name (``os.replace`` is atomic on POSIX and Windows), so a crash
never leaves a half-written file at a final path. Fingerprints are sha256 hex digests of
canonical JSON, so they are stable across processes and machines.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pyarrow is imported where used: the light inference install has none
    import pyarrow as pa

CACHE_KEY_META = b"kface.cache_key"
DIGEST_META = b"kface.content_digest"
READERS_META = b"kface.readers_digest"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()  # what open() would give: 0644 under umask 022


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it to ``final``.

    The file gets the mode a plain ``open()`` would (0666 less the umask), not
    ``mkstemp``'s 0600. On an exception the temporary file is removed and ``final`` is left
    untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp made it 0600 (and a writer may have replaced the file): readers such as a
        # web server or a container need the usual mode
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def remove_temporaries(folder: Path, pattern: str = ".*.tmp") -> int:
    """Delete the temporary files a killed writer left in ``folder`` (``atomic_path``'s
    ``.NAME.XXXX.tmp``; never a final file). Call it only while no writer of this folder
    runs, e.g. before a run submits its workers. Returns how many were removed."""
    leftovers = list(Path(folder).glob(pattern))
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)
    return len(leftovers)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(final: Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``final`` atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"
    write_bytes_atomic(final, text.encode("utf-8"))


def write_parquet_atomic(final: Path, table: pa.Table, cache_key: str | None = None,
                         row_group_size: int | None = None, digest: bool = True,
                         readers_leave_out: tuple[str, ...] = ()) -> None:
    """Write ``table`` to ``final`` atomically. The schema metadata gets ``cache_key``
    (what the file was computed from) and, with ``digest``, the table's ``table_digest``
    (what it holds), which downstream keys use instead of the file's bytes; with
    ``readers_leave_out``, also the digest without those columns (``readers_digest``).
    Shard files pass ``digest=False``: their own keys stand for them, and hashing every
    crop's bytes again would cost a copy of the shard."""
    meta = dict(table.schema.metadata or {})
    for name in (CACHE_KEY_META, DIGEST_META, READERS_META):
        meta.pop(name, None)
    if digest:
        meta[DIGEST_META] = table_digest(table).encode()
    if readers_leave_out:
        meta[READERS_META] = readers_table_digest(table, readers_leave_out).encode()
    if cache_key is not None:
        meta[CACHE_KEY_META] = cache_key.encode()
    with atomic_path(final) as tmp:
        import pyarrow.parquet as pq

        pq.write_table(table.replace_schema_metadata(meta), tmp, compression="zstd",
                       row_group_size=row_group_size)


def _meta(path: Path, name: bytes) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        value = (pq.read_schema(path).metadata or {}).get(name)
    except (OSError, pa.ArrowException):
        return None
    return value.decode() if value else None


def read_cache_key(path: Path) -> str | None:
    """Return the cache key stored in a Parquet file's metadata, or None if absent/unreadable."""
    return _meta(path, CACHE_KEY_META)


def table_digest(table: pa.Table) -> str:
    """sha256 of a table's columns and values (schema metadata and chunking left out)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    table = table.replace_schema_metadata(None).combine_chunks()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def readers_table_digest(table: pa.Table, leave_out: tuple[str, ...]) -> str:
    """The ``table_digest`` of ``table`` without the columns ``leave_out``."""
    return table_digest(table.drop_columns([c for c in leave_out if c in table.column_names]))


def readers_digest(path: Path, leave_out: tuple[str, ...]) -> str | None:
    """What the stages that read a Parquet file key on: its digest without the columns
    ``leave_out`` (stored at write time, else computed: a file of a kface before
    2026-12-04, about 2 s for the 583,200-photo manifest), or None when it does not
    exist."""
    if not Path(path).exists():
        return None
    import pyarrow.parquet as pq

    return (_meta(path, READERS_META)
            or readers_table_digest(pq.read_table(path), leave_out))


def store_readers_digest(path: Path, leave_out: tuple[str, ...]) -> None:
    """Add the readers' digest to a Parquet file written without one (the same table and
    cache key, rewritten atomically); nothing when it has one."""
    if _meta(path, READERS_META) is not None:
        return
    import pyarrow.parquet as pq

    write_parquet_atomic(path, pq.read_table(path), _meta(path, CACHE_KEY_META),
                         readers_leave_out=leave_out)


def content_digest(path: Path) -> str | None:
    """The ``table_digest`` of a Parquet file (stored at write time, else computed), or
    None when the file does not exist. Unlike the file's sha256 it does not change when
    only the cache key in the file's metadata does."""
    if not Path(path).exists():
        return None
    import pyarrow.parquet as pq

    return _meta(path, DIGEST_META) or table_digest(pq.read_table(path))


def fingerprint(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (dicts sorted by key)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def replace_folder(new: Path, final: Path) -> None:
    """Put the finished folder ``new`` at ``final``: the previous ``final`` is renamed
    aside first and deleted only after ``new`` is in place (two renames on one file
    system; the previous folder is never deleted before its replacement exists)."""
    new, final = Path(new), Path(final)
    old = final.with_name(f".{final.name}.previous")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_outputs(out: Path, owns: Collection[str] = ()) -> Iterator[Path]:
    """A command's outputs, replaced only by a complete, successful result.

    Yields a staging folder inside ``out`` (``.staging-XXXX``) for the command to write
    everything into. When the block ends without an error, each staged file replaces the
    file of the same name in ``out`` (a rename each) and each staged folder replaces the
    folder of that name whole (``replace_folder``: no annotated image of an earlier run
    is left among the new ones). Of the names the command ``owns`` (every file and folder
    it can write), those this run did not write (a ``predictions.csv``, an ``annotated/``
    of an earlier run with those options) are removed, so the folder holds one run of
    the command; other commands' files and yours are left alone. On any error, or a
    kill, ``out`` is as it was: the staging folder is deleted (a killed command's is
    removed by the next one), and an ``out`` this command created is removed again."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    os.chmod(stage, 0o777 & ~_current_umask())
    done = False
    try:
        yield stage
        names = sorted(item.name for item in stage.iterdir())
        for name in names:
            item = stage / name
            if item.is_dir():
                replace_folder(item, out / name)
            else:
                os.replace(item, out / name)
        for name in sorted(set(owns) - set(names)):  # an earlier run's, not rewritten
            old = out / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done and created and not any(out.iterdir()):
            out.rmdir()


class FolderBusyError(RuntimeError):
    """Another run holds the run folder's lock."""


@contextmanager
def folder_lock(folder: Path, owner: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``folder/.lock`` (``flock``) for one run, so two runs
    never write the same run folder at once; the second fails at once and says who holds
    it. The lock goes with the process: a killed run leaves no stale lock."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / ".lock", "a+")  # noqa: SIM115 - closed below
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise FolderBusyError(
                f"{folder} is in use by another run ({holder}): wait for it to finish, or "
                "give this run another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} {owner}".strip())
        fh.flush()
        yield
    finally:
        fh.close()
