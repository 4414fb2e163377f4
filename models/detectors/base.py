"""What a detector kind is: ``DetectorKind``, and the registry of kinds.

A kind declares its weights (where the default files are, their published sha256), its
thresholds, whether it gives the five landmarks, its roles, the ``DetectorConfig``
settings it owns (their types and defaults: ``settings``), how its network loads and
how it turns a photo into raw rows. Everything that is the same for every kind
(threshold, clipping, NMS, margin, landmarks in pixels) lives in ``models.detector``;
nothing outside ``models/detectors/`` asks which kind it has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

# a ``models.detector.DetectorConfig`` (not imported here: it is built from this registry)
DetectorConfig = Any


MAX_SQUASH = 2.0  # the square input squashes a photo at most this much (its aspect ratio)
STRIP_LONG = 3  # a wider strip's long side, at most this many times input_size


def strip_scale(width: int, height: int, input_size: int) -> float | None:
    """For the square input (``input_aspect: square``): None for a photo whose aspect
    ratio is at most ``MAX_SQUASH`` (it is squashed square, as before); for a wider or
    taller one (a strip of portraits, a panorama: squashed square, its faces would be
    flattened and missed) the scale that keeps its aspect with the short side
    ``input_size``, the long side at most ``STRIP_LONG`` times that."""
    short, long = min(width, height), max(width, height)
    if long <= MAX_SQUASH * short:
        return None
    return min(input_size / short, STRIP_LONG * input_size / long)


class DetectorError(RuntimeError):
    """The detector's files are missing, corrupt or of an unknown format."""


class DetectorKind:
    """One face detector network (subclass it, and register the subclass)."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line for the config's help
    landmarks: ClassVar[bool] = False  # gives the five landmarks (crops.align needs them)
    original: ClassVar[bool] = False  # the original notebook's detector: the default kind
    # the kind that measures where a folder of face chips puts the five landmarks
    # (``tasks.detect.measure_chip_landmarks``: it enters the detect keys); one kind has it
    measures_chips: ClassVar[bool] = False
    training_confidence: ClassVar[float]  # threshold for the training data
    inference_confidence: ClassVar[float]  # threshold for predict, video and camera
    # the ``DetectorConfig`` settings this kind declares: name -> (type, pydantic Field);
    # ``models.detector`` builds the config from every kind's (a name declared twice is
    # an error)
    settings: ClassVar[dict[str, tuple[Any, Any]]] = {}
    # the kind-specific settings it reads (its keys read them, no other kind's): its own
    # ``settings`` unless it names others (one another kind declares, too)
    own_settings: ClassVar[tuple[str, ...]] = ()
    key_without_kind: ClassVar[bool] = False  # its cache keys predate the 'kind' setting
    known_sha256: ClassVar[dict[str, str]] = {}  # file name -> published sha256

    def weights(self, cfg: DetectorConfig) -> tuple[Path, ...]:
        """The weight files ``cfg`` names (or the defaults), checked to exist."""
        raise NotImplementedError

    def load(self, weights: tuple[Path, ...]) -> Any:
        """The network, from ``weights``."""
        raise NotImplementedError

    def rows(self, net: Any, image: np.ndarray, cfg: DetectorConfig) -> np.ndarray:
        """Raw rows ``[score, x1, y1, x2, y2]`` normalised to the image, followed by the
        ten normalised landmark coordinates for a kind with landmarks."""
        raise NotImplementedError

    def keep_rows(self, rows: np.ndarray, cfg: DetectorConfig) -> np.ndarray:
        """The kind's own rule for rows before the threshold (default: keep all)."""
        return rows


KIND: dict[str, DetectorKind] = {}


def register(cls: type[DetectorKind]) -> type[DetectorKind]:
    """Class decorator: add a kind to the registry under its ``name``."""
    if not cls.own_settings:
        cls.own_settings = tuple(cls.settings)
    KIND[cls.name] = cls()
    return cls


def missing_file(path: Path, default: bool) -> DetectorError:
    return DetectorError(f"detector file {path} not found" + (
        ": the package was installed without its data; reinstall kface-pipeline"
        if default else ""))
