"""The classifier behind every inference path, Keras or ONNX Runtime, behind one call.

A model folder holds ``labels.json`` and the network: ``model.keras`` (what training
writes; needs Keras and its backend) or ``model.onnx`` (what ``kface export --format
onnx`` writes; needs only ``onnxruntime`` and NumPy, see the light install in
docs/operations.md). Both are called the same way, on a batch of RGB 0..255 float32 crops,
and return per head (``gender``, ``age_band`` and, when trained, ``age``) the class
probabilities as float64; a folder holding both uses ``model.keras``. Large batches go
through in chunks of ``BATCH`` crops so memory stays bounded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from core.labels import AGES

MODEL_FILES = ("model.keras", "model.onnx")  # in order of preference
BATCH = 64  # crops per network call


class ModelFolderError(FileNotFoundError):
    """The model folder lacks a file the analyser needs, or its files disagree."""


class Classifier(Protocol):
    path: Path

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def model_file(folder: Path, prefer_onnx: bool = False) -> Path | None:
    """The network file of a model folder (``model.keras`` before ``model.onnx``; with
    ``prefer_onnx``, ``model.onnx`` first where ONNX Runtime is installed), or None when
    the folder is not a model folder (no ``labels.json`` or no network)."""
    folder = Path(folder)
    if not (folder / "labels.json").is_file():
        return None
    order = MODEL_FILES
    if prefer_onnx and importlib.util.find_spec("onnxruntime") is not None:
        order = tuple(reversed(MODEL_FILES))
    return next((folder / f for f in order if (folder / f).is_file()), None)


def _chunked(run, batch: np.ndarray) -> dict[str, np.ndarray]:
    batch = np.asarray(batch, dtype=np.float32)
    parts = [run(batch[i:i + BATCH]) for i in range(0, len(batch), BATCH)]
    if not parts:
        return {}
    return {k: np.concatenate([np.asarray(p[k], np.float64) for p in parts])
            for k in parts[0]}


class KerasClassifier:
    """``model.keras`` on the Keras backend that ``KERAS_BACKEND`` names."""

    def __init__(self, path: Path):
        if importlib.util.find_spec("keras") is None:
            raise ModelFolderError(
                f"{path} is a Keras model and Keras is not installed here (the light "
                "install runs ONNX models): run kface export --format onnx where it was "
                "trained and use that folder, or install the full kface-pipeline")
        from models.classifier import load_classifier

        self.path = Path(path)
        self.model = load_classifier(self.path)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return _chunked(self.model.predict_on_batch, batch)


class OnnxClassifier:
    """``model.onnx`` on ONNX Runtime's CPU provider (``threads``: its intra-op threads,
    0 = ONNX Runtime's choice)."""

    def __init__(self, path: Path, threads: int = 0):
        if importlib.util.find_spec("onnxruntime") is None:
            raise ModelFolderError(f"{path} is an ONNX model and onnxruntime is not "
                                   "installed: pip install onnxruntime")
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        # ONNX Runtime's threads busy-wait after each run by default; between two runs the
        # detector needs those cores (measured here, 2 cores: 21 -> 33.5 photos/s when
        # classifying photo by photo, 32 -> 35 in batches of 16)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelFolderError(f"{path} is not a readable ONNX model "
                                   f"({str(exc).splitlines()[0][:200]}): export it again "
                                   "with kface export --format onnx") from None
        self.input = self.session.get_inputs()[0].name
        self.heads = [o.name for o in self.session.get_outputs()]

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        def run(chunk: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(self.heads, self.session.run(None, {self.input: chunk}),
                            strict=True))

        return _chunked(run, batch)


def load_backend(folder: Path, threads: int = 0, prefer_onnx: bool = False
                 ) -> tuple[Classifier, dict]:
    """The classifier of a model folder (``model_file``) and its ``labels.json``; checks
    that the two agree (every head labels.json names, with as many classes), else
    ModelFolderError."""
    folder = Path(folder)
    path = model_file(folder, prefer_onnx)
    if path is None:
        raise ModelFolderError(f"{folder} is not a model folder: it needs labels.json and "
                               "model.keras or model.onnx")
    try:
        labels = json.loads((folder / "labels.json").read_text())
        widths = {"gender": len(labels["gender"]), "age_band": len(labels["age_band"])}
        size = int(labels.get("crop", {}).get("size", labels["input_size"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(f"{folder / 'labels.json'} is not a kface labels file "
                               f"({type(exc).__name__}: {exc}): copy the one the model "
                               "was trained with") from None
    model = OnnxClassifier(path, threads) if path.suffix == ".onnx" else KerasClassifier(path)
    got = model(np.zeros((1, size, size, 3), np.float32))
    wrong = [f"{head}: labels.json has {n} classes, {path.name} "
             f"{got[head].shape[-1] if head in got else 'no such output'}"
             for head, n in widths.items() if head not in got or got[head].shape[-1] != n]
    ages = labels.get("ages", AGES)
    if "age" in got and got["age"].shape[-1] != len(ages):
        wrong.append(f"age: {got['age'].shape[-1]} outputs, labels.json has {len(ages)} ages")
    if wrong:
        raise ModelFolderError(f"{folder}: labels.json does not match {path.name} "
                               f"({'; '.join(wrong)}): keep each model's own labels.json")
    return model, labels

