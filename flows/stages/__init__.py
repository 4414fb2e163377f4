"""The training pipeline: one module per stage in this package, each holding its row
(``ROW``: a ``flows.machinery.Stage`` or ``ShardedStage``), its glue to ``tasks/`` and its
plan. Every module here is imported and the table assembled from their rows (the run
order from what each reads: ``flows.machinery.Pipeline``), so adding a stage is one file
here plus its tests; ``register_stage`` adds one from outside (a plugin, a test).

The names below are this pipeline's lookups, for the flow, the CLI, the preflight and
the deployments.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from core.run_folder import RunFolder
from flows.machinery import (
    BaseStage,
    MissingInputError,
    Pipeline,
    ShardedStage,
    Stage,
    StageConfig,
    StageStatus,
    work_seconds,
)

TRAINING = Pipeline("kface-pipeline", [
    importlib.import_module(f"{__name__}.{m.name}").ROW for m in pkgutil.iter_modules(__path__)])

STAGE_TABLE = TRAINING.rows
STAGE = TRAINING.stage
STAGES = TRAINING.order  # the run order
DATA_STAGES = TRAINING.data_stages
PRODUCER = TRAINING.producer  # output -> the stage that writes it
register_stage = TRAINING.register
unregister_stage = TRAINING.unregister
input_errors = TRAINING.input_errors
pipeline_status = TRAINING.status
stage_table_markdown = TRAINING.markdown
stage_inputs = TRAINING.stage_inputs


def output_path(folder: RunFolder, output: str) -> Path:
    """Where the output ``output`` of a run folder is."""
    return TRAINING.output_path(folder, output)


__all__ = ["DATA_STAGES", "PRODUCER", "STAGE", "STAGES", "STAGE_TABLE", "TRAINING",
           "BaseStage", "MissingInputError", "ShardedStage", "Stage", "StageConfig",
           "StageStatus", "input_errors", "output_path", "pipeline_status",
           "register_stage", "stage_inputs", "stage_table_markdown", "unregister_stage",
           "work_seconds"]
