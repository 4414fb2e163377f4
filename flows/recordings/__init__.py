"""The recordings pipeline (``kface recordings``): a folder of recorded videos counted
into the visitors store, on the same machinery as the training pipeline
(``flows.machinery``): one module per stage in this package, the table assembled from
their rows. Today one stage: ``count`` (sharded: one unit per video)."""

from __future__ import annotations

import importlib
import pkgutil

from flows.machinery import Pipeline

RECORDINGS = Pipeline("kface-recordings", [
    importlib.import_module(f"{__name__}.{m.name}").ROW for m in pkgutil.iter_modules(__path__)])
