"""The machinery every pipeline's stages run on; it names no stage.

A pipeline (``Pipeline``) is a table of rows, one per stage, each row one module of the
pipeline's package (the training pipeline's: ``flows/stages/``). A row is one of two
kinds:

* ``Stage``, single-output: one file (or folder) keyed by ``Stage.key``: the digests of
  the outputs it reads, the settings its row names, what it reads from outside the run
  folder (``source``) and its code version. Its ``run(c, key)`` writes the output.
* ``ShardedStage``: many shard files, each keyed on its own. The row declares its unit
  (``unit``: the shards), what its keys and calls need besides a shard (``context``),
  the key per shard (``shard_key``), the stored-file check (``stored``: a shard file
  complete for its key) and one shard's call (``shard_call``). The plan, its record for
  ``kface status`` (``stages/<stage>.plan.json``) and the status shortcut that reads it
  come from here, for every sharded row.

Everything else is derived from the rows: the run order (the reads, topologically;
at a tie, single-output rows first, as they are quick and fail early, then by name),
``--stages`` checks, the pre-run checks (``flows.preflight``: each row's ``check`` and the
``errors`` it declares), the reuse decision the flow makes before it starts any worker
(``flows.pipeline``), ``kface status`` (``Pipeline.status``), the deployments' stage lists
and the docs' stage table (``Pipeline.markdown``).

A stage's functions receive a ``StageConfig``: the run folder, only the config sections
its row declares, and the outputs (with their producers' summaries) of the stages its row
says it reads (anything else is an error naming the row's module).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from core.run_folder import RunFolder
from core.sharding import Shard, ShardPlan, ShardResult
from core.storage import (
    content_digest,
    file_sha256,
    fingerprint,
    read_cache_key,
    readers_digest,
    write_json_atomic,
)


class MissingInputError(RuntimeError):
    """A requested stage's input does not exist (its upstream stage has not run)."""


def in_run() -> bool:
    """Whether this is inside a Prefect flow or task run."""
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(TaskRunContext.get() or FlowRunContext.get())


def stage_log() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside a flow run (the UI shows the lines), else the stages'
    (a stage called directly, as its tests do)."""
    if not in_run():
        return logging.getLogger("flows.stages")
    from prefect import get_run_logger

    return get_run_logger()


@dataclass(frozen=True, kw_only=True)
class BaseStage:
    """What every row declares (see the module docstring)."""

    name: str
    work: Callable  # the function in tasks/ that does the work (the docs' table names it)
    reads: tuple[str, ...]  # run-folder outputs (``RunFolder.output`` names) it reads
    writes: str  # the output it writes
    sections: tuple[str, ...]  # the config sections it sees
    code_version: str
    scope: Literal["data", "experiment"]
    stale_detail: str = "inputs or settings changed"
    check: Callable[[StageConfig], None] | None = None  # its inputs, before a run starts
    # what its check (and its work, on bad input) raises that is the user's to fix: said
    # in one line (``flows.preflight``), never a traceback
    errors: tuple[type[Exception], ...] = ()
    # its failed rows by status and reason (``kface status``)
    problems: Callable[[StageConfig], dict[str, dict[str, int]]] | None = None

    sharded: ClassVar[bool] = False

    def output(self, folder: RunFolder) -> Path:
        """Its output's path: the run folder's name for it, else ``<writes>.parquet``
        (a sharded row's: the folder ``<writes>``) in the run folder (data stages) or the
        experiment's folder."""
        if hasattr(RunFolder, self.writes):
            return folder.output(self.writes)
        where = folder.out if self.scope == "data" else folder.experiment_dir
        return where / (self.writes if self.sharded else f"{self.writes}.parquet")

    def summary_file(self, folder: RunFolder) -> Path:
        """``stages/<name>.json``: the run folder's for data stages, the experiment's for
        experiment stages."""
        where = folder.stages if self.scope == "data" else folder.experiment_stages
        return where / f"{self.name}.json"

    def stored_summary(self, folder: RunFolder) -> dict:
        path = self.summary_file(folder)
        return json.loads(path.read_text()) if path.exists() else {}

    def keyed_on(self) -> list[str]:
        """What its key reads besides its inputs, for the docs' table."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Stage(BaseStage):
    """A single-output row."""

    # what its key reads besides its inputs: a section ('split'; its ``key_settings()``
    # where it has one) or one setting ('data.layout'; a file's by the file's sha256)
    key_settings: tuple[str, ...] = ()
    # what it reads from outside the run folder (a digest), where its stored key is
    # (Parquet metadata or stages/<name>.json), and the work
    source: Callable[[StageConfig], str] | None = None
    key_in: Literal["output", "summary"] = "output"
    run: Callable[[StageConfig, str], dict] | None = None
    # columns of its output that the stages reading it do not key on (the manifest's
    # mtimes: a photo's content is its sha256), and, when the output is stale, whether a
    # run now would change only those (a detail for status: its readers stay current)
    readers_leave_out: tuple[str, ...] = ()
    same_for_readers: Callable[[StageConfig], str | None] | None = None
    # settings a run applies to the output it has without redoing the work (the train
    # stage's calibration: refitted on the kept network in seconds): the stored summary
    # keeps the key without them (``base_key``), and when that is the current one a run
    # calls ``partial_run`` instead of ``run``
    partial_settings: tuple[str, ...] = ()
    partial_run: Callable[[StageConfig, str], dict] | None = None
    # what ``partial_run`` needs of the output beyond its existence (else a full run)
    partial_needs: Callable[[RunFolder], bool] | None = None
    partial_detail: str = "applies them to its output without redoing the work"

    def key(self, c: StageConfig, leave_out: tuple[str, ...] = ()) -> str:
        """Its cache key: the digests of the outputs it reads, the settings its row names
        (but the ``section.field`` settings of ``leave_out``), what it reads from outside
        the run folder, and its code version (never a path: a moved dataset or run folder
        keeps its keys)."""
        def setting(name: str) -> Any:
            value = c.key_setting(name)
            left = {s.partition(".")[2] for s in leave_out if s.partition(".")[0] == name}
            return ({k: v for k, v in value.items() if k not in left}
                    if left and isinstance(value, dict) else value)

        return fingerprint(*(c.read_digest(name) for name in self.reads),
                           *(setting(name) for name in self.key_settings),
                           *([self.source(c)] if self.source else []), self.code_version)

    def base_key(self, c: StageConfig) -> str | None:
        """The key without the ``partial_settings`` (None for a stage without them)."""
        return self.key(c, self.partial_settings) if self.partial_settings else None

    def runs_partly(self, c: StageConfig) -> bool:
        """Whether a run would only apply changed ``partial_settings`` to the output it
        has (its stored base key is the current one)."""
        return (self.partial_run is not None and self.output(c.folder).exists()
                and (self.partial_needs is None or self.partial_needs(c.folder))
                and self.stored_summary(c.folder).get("base_key") == self.base_key(c))

    def stored_key(self, folder: RunFolder) -> str | None:
        """The key the stage's output holds (None when there is none)."""
        output = self.output(folder)
        if not output.exists():
            return None
        if self.key_in == "output":
            return read_cache_key(output)
        return self.stored_summary(folder).get("cache_key")

    def exists(self, folder: RunFolder) -> bool:
        return self.output(folder).exists()

    def digest(self, c: StageConfig) -> Any:
        """What its output holds, as the stages reading it key on it (``c``: its view)."""
        path = self.output(c.folder)
        if self.key_in == "summary":
            return self.stored_summary(c.folder).get("cache_key")
        return c.readers_digest(self) if self.readers_leave_out else content_digest(path)

    def state(self, c: StageConfig) -> tuple[bool, bool, str, bool]:
        """``(exists, current, detail, readers current)`` for ``kface status``, its
        inputs current."""
        exists = self.output(c.folder).exists()
        current = exists and self.stored_key(c.folder) == self.key(c)
        if current or not exists:
            return exists, current, "", current
        same = self.same_for_readers(c) if self.same_for_readers else None
        if same:  # stale, but what its readers key on is unchanged: judge them alone
            return exists, False, same, True
        if self.runs_partly(c):
            return exists, False, (f"only settings among {', '.join(self.partial_settings)} "
                                   f"changed: the run {self.partial_detail}"), False
        return exists, False, self.stale_detail, False

    def keyed_on(self) -> list[str]:
        keyed = [*self.key_settings, *(["(the scan)"] if self.source else [])]
        if self.partial_settings:
            keyed.append(f"(applied without redoing the work: "
                         f"{', '.join(self.partial_settings)})")
        return keyed


@dataclass(frozen=True, kw_only=True)
class ShardedStage(BaseStage):
    """A sharded row: its output is a folder of ``shard-<name>.parquet`` files."""

    unit: Callable[[StageConfig], list[Shard]]  # the planned shards (cheap: no work)
    # one shard's key, given what ``context`` computed (None: no context)
    shard_key: Callable[[StageConfig, Any, Shard], str]
    # a shard file complete for its key: its summary, else None (the shard needs work);
    # context is None when the shards and keys came from the recorded plan (status)
    stored: Callable[[StageConfig, Shard, str, Any], ShardResult | None]
    # one shard's call in a worker: (function, arguments)
    shard_call: Callable[[StageConfig, ShardPlan, Shard], tuple[Callable, tuple]]
    # what the keys and calls need besides a shard (the crop boxes, chip landmarks)
    context: Callable[[StageConfig, list[Shard]], Any] | None = None
    # the summary's additions once all shards are done
    finish: Callable[[StageConfig, ShardPlan, dict], None] | None = None

    sharded: ClassVar[bool] = True

    def shards(self, c: StageConfig) -> list[Shard]:
        """The planned shards (status: by name, from the recorded plan while what it is
        made of is unchanged)."""
        indexed = self._indexed_plan(c)
        if indexed is not None:
            return indexed[0]
        return c.memo_get(f"shards:{self.name}", lambda: self.unit(c))

    def plan(self, c: StageConfig) -> ShardPlan:
        """The shards, each with the stored summary of a file complete for its key
        (None: to compute), and the context; a run records the shards' names and keys."""
        def make() -> ShardPlan:
            indexed = self._indexed_plan(c)
            if indexed is not None:
                shards, keys = indexed
                context = None
            else:
                shards = self.shards(c)
                context = self.context(c, shards) if self.context else None
                keys = [self.shard_key(c, context, s) for s in shards]
                self._record_plan(c, shards, keys)
            return ShardPlan(shards, [self.stored(c, s, k, context)
                                      for s, k in zip(shards, keys, strict=True)], context)

        return c.memo_get(f"plan:{self.name}", make)

    def digest(self, c: StageConfig) -> Any:
        """Its planned shards' stored keys (``c``: its view)."""
        return [read_cache_key(self.output(c.folder) / s.filename) for s in self.shards(c)]

    def state(self, c: StageConfig) -> tuple[bool, bool, str, bool]:
        output = self.output(c.folder)
        plan = self.plan(c)
        return (any(output.glob("shard-*.parquet")), not plan.todo,
                shard_detail(plan, output), not plan.todo)

    def exists(self, folder: RunFolder) -> bool:
        return any(self.output(folder).glob("shard-*.parquet"))

    def keyed_on(self) -> list[str]:
        return ["(per shard: its row's shard_key)"]

    # -- the plans' record: kface status reads it instead of planning (K-Face size:
    # about 8 s for the crop keys of 583,200 faces, a read of one file instead)

    def _plan_inputs(self, c: StageConfig) -> str:
        """What the plan (its shards and their keys) is made of: the digests of the
        outputs its row reads, its sections as keys see them (not ``sharding``: it
        changes no file) and its code version."""
        return fingerprint(self.name, self.code_version,
                           *(c.read_digest(name) for name in self.reads),
                           *(c.key_setting(name) for name in self.sections
                             if name != "sharding"))

    def plan_record(self, folder: RunFolder) -> Path:
        return self.summary_file(folder).with_suffix(".plan.json")

    def _indexed_plan(self, c: StageConfig) -> tuple[list[Shard], list[str]] | None:
        """``kface status`` only: the shards (by name; status reads their files, never
        the photos) and keys the last run planned, when what the plan is made of is the
        same now; None otherwise and in a run, which plans."""
        if c.writing or not self.reads:  # (a row reading nothing here reads the outside:
            return None  # its unit is planned anew)

        def read() -> tuple[list[Shard], list[str]] | None:
            try:
                index = json.loads(self.plan_record(c.folder).read_text())
            except (OSError, ValueError):
                return None
            if not isinstance(index, dict) or index.get("inputs") != self._plan_inputs(c):
                return None
            return ([Shard(name, (), ()) for name, _ in index["shards"]],
                    [key for _, key in index["shards"]])

        return c.memo_get(f"index:{self.name}", read)

    def _record_plan(self, c: StageConfig, shards: list[Shard], keys: list[str]) -> None:
        if not c.writing:
            return
        index = {"inputs": self._plan_inputs(c),
                 "shards": [[s.name, k] for s, k in zip(shards, keys, strict=True)]}
        path = self.plan_record(c.folder)
        try:
            if json.loads(path.read_text()) == index:
                return
        except (OSError, ValueError):
            pass
        write_json_atomic(path, index)


def shard_detail(plan: ShardPlan, folder: Path) -> str:
    """``"k/n shards current"`` and the files no plan contains (dropped by the next run)."""
    detail = f"{len(plan.shards) - len(plan.todo)}/{len(plan.shards)} shards current"
    planned = {s.filename for s in plan.shards}
    extra = sum(p.name not in planned for p in Path(folder).glob("shard-*.parquet"))
    if extra:  # never read (the stages after it read the planned files)
        detail += f", {extra} shard files no longer planned"
    return detail


class StageConfig:
    """What one stage sees: its run folder, the config sections its row declares, the
    outputs its row reads (``read_digest``, ``upstream_summary``), and a memo for what its
    key computed and its work reuses (the scan, a plan), shared with the stages it reads
    from. Anything undeclared is an AttributeError naming the row's module."""

    def __init__(self, config: Any, stage: BaseStage, writing: bool = True,
                 memo: dict[str, Any] | None = None):
        self.stage = stage.name
        self.folder: RunFolder = config.folder
        self.writing = writing  # False for kface status, which only reads
        self.memo: dict[str, Any] = {} if memo is None else memo
        self._config = config  # for recipe_yaml and the stages this one reads
        self._row = stage
        for name in stage.sections:
            setattr(self, name, getattr(config, name))

    def __getattr__(self, name: str):  # called only for attributes that are not set
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"stage '{self.stage}' reads the config section '{name}', which "
                             "its row does not declare")

    def upstream(self, output: str) -> tuple[BaseStage, StageConfig]:
        """The row and the view of the stage that writes ``output``, one this stage's row
        reads (the memo shared)."""
        if output not in self._row.reads:
            raise AttributeError(f"stage '{self.stage}' reads the output '{output}', which "
                                 "its row does not declare")
        producer = pipeline_of(self._row).producer_of(output)
        return producer, StageConfig(self._config, producer, self.writing, self.memo)

    def read_digest(self, output: str) -> Any:
        """What ``output`` holds, as this stage's key sees it (its producer's ``digest``),
        once per view (a key and a base key read the same; a stage's work writes only its
        own output)."""
        producer, c = self.upstream(output)
        return self.memo_get(f"digest:{output}", lambda: producer.digest(c))

    def upstream_summary(self, output: str) -> dict:
        """The stored summary of the stage that writes ``output`` (one this stage reads)."""
        producer, _ = self.upstream(output)
        return producer.stored_summary(self.folder)

    def key_setting(self, name: str) -> Any:
        """A setting as keys see it: a section's ``key_settings()`` (else all of it), one
        field's value, a file's sha256 (None when unset or missing), never its path."""
        section, _, field_name = name.partition(".")
        settings = getattr(self, section)
        if not field_name:
            return (settings.key_settings() if hasattr(settings, "key_settings")
                    else settings.model_dump(mode="json"))
        value = getattr(settings, field_name)
        if isinstance(value, Path):
            return file_sha256(value) if value.is_file() else None
        return value

    def recipe_yaml(self) -> str:
        """The whole config as YAML: the recipe an experiment's model was trained with."""
        from flows.config import dump_config

        return dump_config(self._config)

    def readers_digest(self, stage: Stage) -> str | None:
        """``stage``'s output as the stages reading it key on: without its
        ``readers_leave_out`` columns (once per view: ~2 s for a K-Face manifest of a kface
        before 2026-12-04, which has it unstored)."""
        return self.memo_get(f"readers:{stage.writes}", lambda: readers_digest(
            stage.output(self.folder), stage.readers_leave_out))

    def memo_get(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self.memo:
            self.memo[name] = compute()
        return self.memo[name]


@dataclass
class StageStatus:
    """One stage's state for a config: done / cached / stale / missing (see
    ``Pipeline.status``)."""

    stage: str
    state: str
    detail: str
    errors: dict[str, dict[str, int]] | None = None  # failed rows (the row's ``problems``)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "state": self.state, "detail": self.detail,
                "errors": self.errors}


_PIPELINES: list[Pipeline] = []


def pipeline_named(name: str) -> Pipeline:
    """The pipeline called ``name`` (its package imported)."""
    for pipeline in _PIPELINES:
        if pipeline.name == name:
            return pipeline
    raise LookupError(f"no pipeline {name!r}")


def pipeline_of(row: BaseStage) -> Pipeline:
    """The pipeline whose table holds ``row``."""
    for pipeline in _PIPELINES:
        if pipeline.stage.get(row.name) is row:
            return pipeline
    raise LookupError(f"stage {row.name!r} is in no pipeline's table")


@dataclass
class Pipeline:
    """A pipeline's table of rows and the lookups derived from it (updated in place, so
    importers keep their references)."""

    name: str
    rows: list[BaseStage] = field(default_factory=list)
    stage: dict[str, BaseStage] = field(default_factory=dict, init=False)
    order: list[str] = field(default_factory=list, init=False)  # the run order
    data_stages: list[str] = field(default_factory=list, init=False)
    producer: dict[str, str] = field(default_factory=dict, init=False)  # output -> stage

    def __post_init__(self) -> None:
        rows, self.rows = self.rows, []
        for row in self._ordered(rows):
            self.register(row)
        _PIPELINES.append(self)

    @staticmethod
    def _ordered(rows: Iterable[BaseStage]) -> list[BaseStage]:
        """Topologically by their reads; at a tie single-output rows first, then by name
        (outputs no row here writes are left to ``register`` to refuse)."""
        left = {row.name: row for row in rows}
        writers = {row.writes: row.name for row in left.values()}
        done: list[BaseStage] = []
        while left:
            ready = [row for row in left.values()
                     if all(writers.get(r) not in left for r in row.reads)]
            if not ready:
                raise ValueError(f"stages {sorted(left)} read each other's outputs in a circle")
            row = min(ready, key=lambda r: (r.sharded, r.name))
            done.append(left.pop(row.name))
        return done

    def register(self, row: BaseStage) -> None:
        """Add a row (a plugin's, a test's) where its reads put it in the run order."""
        if row.name in self.stage or row.writes in self.producer:
            raise ValueError(f"stage {row.name!r} or its output {row.writes!r} exists")
        unknown = [name for name in row.reads if name not in self.producer]
        if unknown:
            raise ValueError(f"stage {row.name!r} reads {unknown}, which no stage writes")
        self._derive([*self.rows, row])

    def unregister(self, name: str) -> None:
        self._derive([s for s in self.rows if s.name != name])

    def _derive(self, rows: list[BaseStage]) -> None:
        self.rows[:] = self._ordered(rows)
        self.stage.clear()
        self.stage.update((s.name, s) for s in self.rows)
        self.order[:] = [s.name for s in self.rows]
        self.data_stages[:] = [s.name for s in self.rows if s.scope == "data"]
        self.producer.clear()
        self.producer.update((s.writes, s.name) for s in self.rows)

    def producer_of(self, output: str) -> BaseStage:
        return self.stage[self.producer[output]]

    def input_errors(self) -> tuple[type[Exception], ...]:
        """Every row's ``errors``: what is said in one line wherever a stage runs or is
        checked."""
        return tuple({e: None for s in self.rows for e in s.errors})

    def output_path(self, folder: RunFolder, output: str) -> Path:
        """Where the output ``output`` of a run folder is."""
        return self.producer_of(output).output(folder)

    def stage_inputs(self, stage: str) -> tuple[tuple[str, str], ...]:
        """``(output, the stage that writes it)`` for each output ``stage`` reads."""
        return tuple((name, self.producer[name]) for name in self.stage[stage].reads)

    def markdown(self) -> str:
        """The table as Markdown: a Mermaid graph of what flows where, and one row per
        stage (the docs hold this text; a test keeps them equal)."""
        folder = RunFolder(Path("OUT"), "NAME")
        graph = ["```mermaid", "flowchart LR"]
        for stage in self.rows:
            for name in stage.reads:
                graph.append(f"    o_{name} --> s_{stage.name}")
            where = stage.output(folder).as_posix()
            if stage.sharded:
                where += "/shard-*.parquet"
            graph.append(f"    s_{stage.name}[{stage.name}] --> o_{stage.writes}[(\"{where}\")]")
        rows = ["| stage | work | reads | writes | config sections | key settings | code version "
                "| scope | shards |", "|---|---|---|---|---|---|---|---|---|"]
        for s in self.rows:
            work = f"`{s.work.__module__}.{s.work.__name__}`"
            rows.append(f"| {s.name} | {work} | {', '.join(s.reads) or '(the dataset)'} "
                        f"| {s.writes} | {', '.join(s.sections)} "
                        f"| {', '.join(s.keyed_on()) or '-'} "
                        f"| {s.code_version} | {s.scope} | {'yes' if s.sharded else 'no'} |")
        return "\n".join([*graph, "```", "", *rows]) + "\n"

    def status(self, config: Any) -> list[StageStatus]:
        """Per stage, what the next run with ``config`` would do, read from the run folder
        with the same keys and plans the run uses.

        * ``missing``: no output yet; the run computes it.
        * ``stale``: an output exists but its inputs, config or code changed (or a stage
          it reads from is stale or missing); the run recomputes it (sharded stages: only
          the shards that changed).
        * ``done``: up to date, computed by the last run that ran the stage.
        * ``cached``: up to date, and the last run reused it instead of recomputing.

        A sharded row takes its shards' keys from the plan the last run recorded while
        what the plan is made of is unchanged, and reads every shard file's key.
        """
        result: list[StageStatus] = []
        current_outputs: set[str] = set()
        memo: dict[str, Any] = {}  # one view of the run folder: a plan is made once
        for stage in self.rows:
            upstream_ok = all(name in current_outputs for name in stage.reads)
            c = StageConfig(config, stage, writing=False, memo=memo)
            errors = stage.problems(c) if stage.problems else None
            if upstream_ok:
                exists, current, detail, readers_current = stage.state(c)
            else:
                exists, current, detail = stage.exists(c.folder), False, ""
                readers_current = False
            unreadable = sum((errors or {}).get("unreadable", {}).values())
            if upstream_ok and unreadable:
                detail += f", {unreadable} photo(s) could not be read last time (retried)"
            if not exists:
                state, detail = "missing", "not run yet"
            elif not upstream_ok:
                state, detail = "stale", "a stage it reads from is stale or missing"
            elif not current:
                state = "stale"
            else:
                state = "cached" if stage.stored_summary(c.folder).get("reused") else "done"
            if exists and readers_current:  # (also stale, but what its readers read holds)
                current_outputs.add(stage.writes)
            result.append(StageStatus(stage.name, state, detail, errors))
        return result


def work_seconds(summary: dict) -> float | None:
    """What computing a single-output stage's output took, kept while the output is
    reused or only its partial settings are applied: ``work_seconds``, or ``seconds`` in
    a summary written before it was kept (2026-12-05)."""
    return summary.get("work_seconds", summary.get("seconds"))
