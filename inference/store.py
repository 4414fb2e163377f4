"""The visitors store: one row per visitor, one row per camera outage, in an SQLite file
(the default: nothing to install) or a PostgreSQL database (by URL, where several
cameras, services or shops write to one place).

What is kept, and only this (docs/data-contracts.md, "Visitors store"): per visitor the
camera, when they entered and left (seconds since 1970-01-01 UTC), the seconds in view,
whether they were in view long enough to count, the age in years and the age-band and
gender probabilities the model gave, and the model's id. No face image, no thumbnail, no
embedding, no track of positions. ``visitor_key`` makes a write idempotent: a visitor
written twice (a retried commit, a recordings run resumed) is stored once.

The schema is versioned (``kface_schema``): a store of an older version is upgraded in
place when opened (``UPGRADES``); one of a newer kface is refused with one line. SQLite
runs in WAL mode with a busy timeout, so several processes (cameras, a recordings run,
the dashboard) read and write the same file.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from core.labels import AGE_BANDS, GENDERS

# 2: heartbeats (when each camera's service was last running); 3: recordings (one row
# per recorded video counted: when it starts, how that was found, its status)
SCHEMA_VERSION = 3
GENDER_COLUMNS = tuple(f"p_{g.lower()}" for g in GENDERS)
BAND_COLUMNS = tuple(f"p_{b}" for b in AGE_BANDS)
STORE_ENV = "KFACE_STORE_URL"
BUSY_SECONDS = 30  # an SQLite writer waits this long for another's lock


class StoreError(ValueError):
    """The store cannot be opened or written (one line: which store, and what to do)."""


def expand_env(value: str) -> str:
    """``${NAME}`` replaced by the environment variable NAME (a password kept out of
    config files and command lines); a missing one is a StoreError."""
    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise StoreError(f"environment variable {name} (named in a URL as ${{{name}}}) "
                             "is not set")
        return os.environ[name]
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, value)


def store_url(value: str | Path | None) -> str:
    """The SQLAlchemy URL of ``value``: a file path (SQLite), or a ``postgresql://`` URL
    (``${NAME}`` parts read from the environment); None: ``$KFACE_STORE_URL``, else
    ``visitors.db`` here."""
    value = str(value) if value is not None else os.environ.get(STORE_ENV, "visitors.db")
    value = expand_env(value)
    if value.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + value.split("://", 1)[1]
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser().resolve()}"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (what may be printed or logged)."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", str(url))


def _tables():
    from sqlalchemy import (
        Boolean,
        Column,
        Float,
        Index,
        Integer,
        MetaData,
        String,
        Table,
    )

    metadata = MetaData()
    Table("kface_schema", metadata, Column("version", Integer, nullable=False))
    Table("visitors", metadata,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("visitor_key", String(200), nullable=False, unique=True),
          Column("camera", String(100), nullable=False),
          Column("source", String(20), nullable=False),  # live or recording
          Column("entered_at", Float, nullable=False),
          Column("left_at", Float, nullable=False),
          Column("seconds_in_view", Float, nullable=False),
          Column("counted", Boolean, nullable=False),
          Column("age", Float),
          *(Column(c, Float, nullable=False) for c in GENDER_COLUMNS + BAND_COLUMNS),
          Column("model_id", String(80)),
          Column("written_at", Float, nullable=False),
          Index("visitors_by_time", "entered_at"),
          Index("visitors_by_camera_time", "camera", "entered_at"))
    Table("downtime", metadata,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("downtime_key", String(200), nullable=False, unique=True),
          Column("camera", String(100), nullable=False),
          Column("started_at", Float, nullable=False),
          Column("ended_at", Float),  # None while the camera is still down
          Column("reason", String(300), nullable=False),
          Index("downtime_by_camera_time", "camera", "started_at"))
    Table("heartbeats", metadata,  # one row per camera: its service's latest sign of life
          Column("camera", String(100), primary_key=True),
          Column("run_id", String(64), nullable=False),
          Column("started_at", Float, nullable=False),
          Column("seen_at", Float, nullable=False))
    Table("recordings", metadata,  # one row per recorded video counted (kface recordings)
          Column("recording_key", String(200), primary_key=True),  # camera/<path's hash>
          Column("camera", String(100), nullable=False),
          Column("path", String(1000), nullable=False),  # below the recordings folder
          Column("content_key", String(64), nullable=False),  # its content + model + settings
          Column("started_at", Float),  # None for a file that is not a video
          Column("seconds", Float),
          Column("time_from", String(20), nullable=False),  # name, container or mtime
          Column("status", String(20), nullable=False),  # ok or error
          Column("reason", String(300)),
          Column("visitors", Integer, nullable=False),
          Column("model_id", String(80)),
          Column("written_at", Float, nullable=False))
    return metadata


def _add_heartbeats(conn) -> None:
    _tables().tables["heartbeats"].create(conn)


def _add_recordings(conn) -> None:
    _tables().tables["recordings"].create(conn)


# version -> the function that upgrades a store of that version to the next (a
# connection in a transaction)
UPGRADES: dict[int, object] = {1: _add_heartbeats, 2: _add_recordings}


class Store:
    """An open visitors store (``store_url``); ``add_visitors``, ``start_downtime`` /
    ``end_downtime``, ``visitors_between``, ``downtime_between``, ``forget_before``."""

    def __init__(self, value: str | Path | None = None):
        from sqlalchemy import create_engine, event
        from sqlalchemy.exc import SQLAlchemyError

        self.url = store_url(value)
        self.shown = redact(self.url)
        self.sqlite = self.url.startswith("sqlite")
        if self.sqlite:
            _check_sqlite_folder(Path(self.url.split("///", 1)[1]))
        try:
            self.engine = create_engine(self.url, pool_pre_ping=True)
        except ModuleNotFoundError as exc:
            raise StoreError(f"store {self.shown}: its driver is not installed ({exc.name}): "
                             "pip install 'psycopg[binary]'") from None
        if self.sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(connection, _record):
                cursor = connection.cursor()
                cursor.execute(f"PRAGMA busy_timeout={BUSY_SECONDS * 1000}")
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()
        self.metadata = _tables()
        self.visitors = self.metadata.tables["visitors"]
        self.downtime = self.metadata.tables["downtime"]
        self.heartbeats = self.metadata.tables["heartbeats"]
        self.recordings = self.metadata.tables["recordings"]
        try:
            self._open_schema()
        except SQLAlchemyError as exc:
            raise StoreError(f"store {self.shown} cannot be opened: "
                             f"{short_error(exc)}") from None

    def _open_schema(self) -> None:
        from sqlalchemy import inspect, select
        from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

        schema = self.metadata.tables["kface_schema"]
        for attempt in range(3):  # two processes creating one store: the second re-reads
            try:
                with self.engine.begin() as conn:
                    if not inspect(conn).has_table("kface_schema"):
                        self.metadata.create_all(conn)
                        conn.execute(schema.insert().values(version=SCHEMA_VERSION))
                        return
                    version = conn.execute(select(schema.c.version)).scalar_one_or_none()
                    if version is None:
                        raise StoreError(f"store {self.shown} has no schema version: it "
                                         "was not made by kface; give another --store")
                    if version > SCHEMA_VERSION:
                        raise StoreError(
                            f"store {self.shown} has schema version {version}, newer than "
                            f"this kface's {SCHEMA_VERSION}: upgrade kface (a newer "
                            "checkout or wheel of it) or give another --store")
                    while version < SCHEMA_VERSION:
                        UPGRADES[version](conn)  # type: ignore[operator]
                        version += 1
                        conn.execute(schema.update().values(version=version))
                return
            except (IntegrityError, OperationalError, ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(0.2)

    def _insert(self, table):
        """An INSERT of ``table`` in this database's dialect (SQLite's or PostgreSQL's:
        both take ON CONFLICT)."""
        if self.sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    def _insert_new(self, table, key: str):
        """An INSERT of ``table`` that skips a row whose unique ``key`` is stored already
        (ON CONFLICT DO NOTHING)."""
        return self._insert(table).on_conflict_do_nothing(index_elements=[key])

    def add_visitors(self, rows: Iterable[dict]) -> int:
        """Insert visitor rows (``visitor_row``); a row whose ``visitor_key`` is already
        stored is left as it is. Returns how many were new. One transaction."""
        rows = list(rows)
        if not rows:
            return 0
        statement = self._insert_new(self.visitors, "visitor_key")
        with self.engine.begin() as conn:
            return max(0, conn.execute(statement, rows).rowcount or 0)

    def replace_recording(self, recording: dict, visitors: list[dict]) -> None:
        """A recorded video counted: its row in ``recordings`` and its visitors replace
        what an earlier count of the same file stored (the visitors whose key starts with
        its ``recording_key``), in one transaction: a recount after a change of the file
        or the model never doubles a visitor, and a killed one leaves the earlier count."""
        key = recording["recording_key"]
        with self.engine.begin() as conn:
            conn.execute(self.visitors.delete().where(
                self.visitors.c.visitor_key.startswith(f"{key}/", autoescape=True)))
            conn.execute(self.recordings.delete().where(
                self.recordings.c.recording_key == key))
            conn.execute(self.recordings.insert().values(**recording))
            if visitors:
                conn.execute(self.visitors.insert(), visitors)

    def recordings_rows(self, camera: str | None = None) -> list[dict]:
        """The recordings counted into this store (of ``camera``), by start time."""
        from sqlalchemy import select

        r = self.recordings
        query = select(r).order_by(r.c.started_at, r.c.path)
        if camera is not None:
            query = query.where(r.c.camera == camera)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def start_downtime(self, camera: str, key: str, started_at: float, reason: str) -> None:
        """Record that ``camera`` went down at ``started_at`` (``key``: unique per outage)."""
        with self.engine.begin() as conn:
            conn.execute(self._insert_new(self.downtime, "downtime_key").values(
                downtime_key=key, camera=camera, started_at=started_at,
                reason=reason[:300]))

    def beat(self, cameras: Iterable[str], run_id: str, started_at: float,
             at: float) -> None:
        """The service of run ``run_id`` (started at ``started_at``) is counting
        ``cameras`` at ``at``: each camera's heartbeat row, replaced."""
        rows = [{"camera": c, "run_id": run_id, "started_at": started_at, "seen_at": at}
                for c in cameras]
        if not rows:
            return
        statement = self._insert(self.heartbeats)
        statement = statement.on_conflict_do_update(
            index_elements=["camera"], set_={"run_id": statement.excluded.run_id,
                                             "started_at": statement.excluded.started_at,
                                             "seen_at": statement.excluded.seen_at})
        with self.engine.begin() as conn:
            conn.execute(statement, rows)

    def heartbeat(self, camera: str) -> dict | None:
        """``camera``'s latest heartbeat (``run_id``, ``started_at``, ``seen_at``), or
        None when no service has counted it into this store since heartbeats exist."""
        from sqlalchemy import select

        h = self.heartbeats
        with self.engine.connect() as conn:
            row = conn.execute(select(h.c.run_id, h.c.started_at, h.c.seen_at).where(
                h.c.camera == camera)).first()
        return None if row is None else {"run_id": row[0], "started_at": row[1],
                                         "seen_at": row[2]}

    def end_downtime(self, key: str, ended_at: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.downtime.update().where(
                self.downtime.c.downtime_key == key).values(ended_at=ended_at))

    def visitors_between(self, start: float, end: float, camera: str | None = None,
                         counted: bool = True) -> dict[str, np.ndarray]:
        """The visitors who entered in [start, end) (of ``camera``; counted ones only by
        default) as arrays: ``id``, ``camera``, ``entered_at``, ``gender`` (n x genders),
        ``age_band`` (n x bands), ``age``, ``model_id``."""
        from sqlalchemy import select

        v = self.visitors
        query = select(v.c.id, v.c.camera, v.c.entered_at, v.c.age, v.c.model_id,
                       *(v.c[c] for c in GENDER_COLUMNS + BAND_COLUMNS)).where(
            v.c.entered_at >= start, v.c.entered_at < end).order_by(v.c.entered_at)
        if camera is not None:
            query = query.where(v.c.camera == camera)
        if counted:
            query = query.where(v.c.counted.is_(True))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        g = len(GENDER_COLUMNS)
        probs = np.array([r[5:] for r in rows], np.float64).reshape(
            len(rows), g + len(BAND_COLUMNS))  # (an empty store, or period, too)
        return {"id": np.array([r[0] for r in rows], np.int64),
                "camera": np.array([r[1] for r in rows], object),
                "entered_at": np.array([r[2] for r in rows], np.float64),
                "age": np.array([np.nan if r[3] is None else r[3] for r in rows]),
                "model_id": np.array([r[4] for r in rows], object),
                "gender": probs[:, :g], "age_band": probs[:, g:]}

    def downtime_between(self, start: float, end: float, camera: str | None = None,
                         now: float | None = None) -> list[dict]:
        """The outages that overlap [start, end) (an open one lasts until ``now``)."""
        from sqlalchemy import or_, select

        d = self.downtime
        query = select(d.c.camera, d.c.started_at, d.c.ended_at, d.c.reason).where(
            d.c.started_at < end, or_(d.c.ended_at.is_(None), d.c.ended_at > start))
        if camera is not None:
            query = query.where(d.c.camera == camera)
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            return [{"camera": r[0], "started_at": r[1],
                     "ended_at": r[2], "until": r[2] if r[2] is not None else now,
                     "reason": r[3]} for r in conn.execute(query.order_by(d.c.started_at))]

    def cameras(self, start: float, end: float) -> list[str]:
        """The cameras with a visitor who entered, or an outage, in [start, end) (through
        the time indexes: not a scan of every visitor ever stored)."""
        from sqlalchemy import or_, select, union

        v, d = self.visitors, self.downtime
        with self.engine.connect() as conn:
            names = conn.execute(union(
                select(v.c.camera).where(v.c.entered_at >= start, v.c.entered_at < end),
                select(d.c.camera).where(d.c.started_at < end, or_(
                    d.c.ended_at.is_(None), d.c.ended_at > start)))).scalars()
            return sorted(set(names))

    def count_visitors(self) -> int:
        from sqlalchemy import func, select

        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(self.visitors))
                       .scalar_one())

    def forget_before(self, before: float) -> int:
        """Retention: delete the visitors who entered, and the outages that ended, before
        ``before``. Returns how many visitors were deleted."""
        with self.engine.begin() as conn:
            gone = conn.execute(self.visitors.delete().where(
                self.visitors.c.entered_at < before)).rowcount
            conn.execute(self.downtime.delete().where(self.downtime.c.ended_at < before))
        return int(gone or 0)

    def close(self) -> None:
        self.engine.dispose()


def short_error(exc: BaseException) -> str:
    """The database's own message, first line, without SQLAlchemy's statement dump."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return redact(text[0] if text else type(exc).__name__)


def _check_sqlite_folder(path: Path) -> None:
    """One line before SQLite's own "unable to open database file": the folder exists
    and this process can create files in it (SQLite keeps its journal beside the file;
    tried, not read from the mode bits, which root ignores)."""
    import tempfile

    folder = path.parent
    if not folder.is_dir():
        raise StoreError(f"store {path}: folder {folder} does not exist: create it or give "
                         "another --store")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise StoreError(f"store {path}: cannot write in folder {folder} ({exc.strerror}; "
                         "SQLite keeps its journal beside the file): give a --store in a "
                         "writable folder") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise StoreError(f"store {path} is read-only: give a store file you can write")


def visitor_row(record: dict, camera: str, key: str, entered_at: float, left_at: float,
                source: str) -> dict:
    """The store's row for one visitor ``record`` (``inference.video.visitor_record``)
    seen by ``camera`` from ``entered_at`` to ``left_at`` (epoch seconds); ``key`` is
    unique to this visitor (see the module docstring)."""
    gender, band = record["gender_probs"], record["age_band_probs"]
    return {"visitor_key": key, "camera": camera, "source": source,
            "entered_at": float(entered_at), "left_at": float(left_at),
            "seconds_in_view": record["seconds_in_view"], "counted": record["counted"],
            "age": record.get("age"),
            **{c: float(gender[g]) for c, g in zip(GENDER_COLUMNS, GENDERS, strict=True)},
            **{c: float(band[b]) for c, b in zip(BAND_COLUMNS, AGE_BANDS, strict=True)},
            "model_id": record.get("model_id"), "written_at": time.time()}
