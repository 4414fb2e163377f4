"""Checks made before a run starts: before the Prefect server, before any photo is read.

``check_run(config, stages)`` raises ``InputError`` with one line that names the file or
setting and the fix: unknown stage names, a missing or empty dataset root, a K-Face root
without its ``<Res>_Resolution`` folder, a metadata or labels CSV that is missing or
malformed (encoding, columns, values, duplicate IDs: the whole file is parsed, 400 rows
for K-Face), missing detector or backbone weight files (each stage's row names its own
check: ``flows/stages/``), a run folder that cannot be written, and the inputs of
requested stages whose producing stage is not requested.
Everything here is cheap (no scan of the photo tree): a bad K-Face metadata file is
refused in about a second.

``check_inputs_current(config, stages)`` refuses a ``--stages`` run whose inputs are
stale (the stage that writes them would recompute them), naming the input and the stages
to add; it reads ``kface status``'s answer, so it scans the selected folders.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flows.config import PipelineConfig
from flows.stages import STAGE, STAGES, StageConfig, output_path, stage_inputs


class InputError(ValueError):
    """A run's input or setting is unusable; the message says which and what to do."""


def missing_input(config: PipelineConfig, stage: str, available: set[str] = frozenset()
                  ) -> str | None:
    """The first input of ``stage`` that is not on disk and that no stage in ``available``
    produces, as a one-line message; None when the stage can run."""
    for name, producer in stage_inputs(stage):
        path = output_path(config.folder, name)
        if producer not in available and not path.exists():
            return (f"stage '{stage}' needs {path}, which stage '{producer}' writes: run "
                    f"with --stages {producer},{stage} (or without --stages)")
    return None


def check_stage_names(stages: list[str]) -> list[str]:
    """Return ``stages`` unless one of them is not a stage name (InputError)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise InputError(f"--stages: unknown stage(s) {', '.join(unknown)}; known: "
                         f"{', '.join(STAGES)}")
    return list(stages)


def parse_stages(text: str | None) -> list[str] | None:
    """``"select, detect"`` -> ``["select", "detect"]``; unknown names are refused."""
    if not text:
        return None
    return check_stage_names([s.strip() for s in text.split(",") if s.strip()])


def check_run(config: PipelineConfig, stages: list[str] | None = None) -> None:
    """Raise InputError unless a run of ``stages`` (default: all) can start: each requested
    stage's own check (its row's ``check``), its inputs, and the run folder."""
    stages = check_stage_names(stages or list(STAGES))
    for name in stages:
        stage = STAGE[name]
        try:
            if stage.check:
                stage.check(StageConfig(config, stage, writing=False))
        except stage.errors as exc:  # (the row declares them)
            raise InputError(str(exc)) from None
    for stage in stages:
        problem = missing_input(config, stage, set(stages))
        if problem:
            raise InputError(problem)
    check_writable(Path(config.out))


def check_inputs_current(config: PipelineConfig, stages: list[str]) -> None:
    """Raise InputError when a requested stage would read an output of a stage that is not
    requested and is not up to date (``kface status`` says stale)."""
    from flows.stages import input_errors, pipeline_status

    wanted = set(stages)
    needed = {producer for stage in stages for _, producer in stage_inputs(stage)}
    if needed <= wanted:
        return
    try:
        states = {row.stage: row for row in pipeline_status(config)}
    except input_errors() as exc:  # e.g. the rescan now selects no photo
        raise InputError(str(exc)) from exc
    for stage in stages:
        for name, producer in stage_inputs(stage):
            row = states[producer]
            if producer in wanted or row.state in ("done", "cached"):
                continue
            first = next(s for s in STAGES if states[s].state not in ("done", "cached"))
            last = max(STAGES.index(s) for s in stages)
            rebuild = ",".join(s for s in STAGES[STAGES.index(first):last + 1])
            raise InputError(
                f"stage '{stage}' reads {output_path(config.folder, name)}, which is "
                f"{row.state} ({row.detail or 'not up to date'}): run with --stages "
                f"{rebuild} (or --allow-stale to use it as it is)")


def check_writable(folder: Path) -> None:
    """Raise InputError unless ``folder`` (or its first existing parent) can be written."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"--out {folder}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise InputError(f"--out {folder}: cannot write in {probe} ({exc.strerror}): choose "
                         "another run folder") from exc
