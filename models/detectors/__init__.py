"""Face detector kinds: one module per kind in this package, each a ``DetectorKind``
subclass registered with ``@register`` (``base``). Every module here is imported, so
adding a kind is one file here plus its tests; ``models.detector`` builds the
``detector.kind`` setting, thresholds, cache-key settings and the detector from ``KIND``.
"""

from __future__ import annotations

import importlib
import pkgutil

from models.detectors.base import KIND, DetectorError, DetectorKind, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["KIND", "DetectorError", "DetectorKind", "register"]
