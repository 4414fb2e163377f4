"""The classifier behind every inference path, Keras or ONNX Runtime, behind one call.

A model folder holds ``labels.json`` and the network: ``model.keras`` (what training
writes; needs Keras and its backend) or ``model.onnx`` (what ``kface export --format
onnx`` writes; needs only ``onnxruntime`` and NumPy, see the light install in
docs/operations.md). Both are called the same way, on a batch of RGB 0..255 float32 crops,
and return per head (``gender``, ``age_band`` and, when trained, ``age``) the class
probabilities as float64; a folder holding both uses ``model.keras``. Large batches go
through in chunks of ``BATCH`` crops so memory stays bounded.

The mirror pass (``mirror``): a model trained with ``model.flip_average`` can average its
answers with those on the mirror images, at twice the cost. Whether it does is the
analyser's choice, by default labels.json's ``mirror`` (else its ``flip_average``): the
shipped model says false, because on the 955 held-out people the answers without it
score the same (docs/model.md, "Speed"). ``model.keras`` holds the averaging network
(training's); without the mirror its inner network answers alone. An ONNX export holds
the single-view network (labels.json ``onnx_mirror: runtime``) and the mirror images go
through it in the same call; an ONNX file exported before 2026-12-07 holds the averaging
network and always mirrors.
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
MIRROR_AT_RUN_TIME = "runtime"  # labels.json onnx_mirror: the file is the single-view net


class ModelFolderError(FileNotFoundError):
    """The model folder lacks a file the analyser needs, or its files disagree."""


class Classifier(Protocol):
    path: Path
    mirror: bool  # its answers average the image's and its mirror image's


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


def wants_mirror(labels: dict, mirror: bool | None = None) -> bool:
    """Whether answers should average the mirror image's: ``mirror`` when given, else
    labels.json's ``mirror``, else its ``flip_average`` (what training evaluated)."""
    if mirror is not None:
        return mirror
    return bool(labels.get("mirror", labels.get("flip_average", False)))


def single_view_file(labels: dict) -> bool:
    """Whether a folder's ``model.onnx`` is the single-view network (an export since
    2026-12-07, or of a model without flip averaging); an older export of a
    flip-averaged model mirrors in its graph."""
    return labels.get("onnx_mirror") == MIRROR_AT_RUN_TIME or not labels.get("flip_average")


def answers_mirror(labels: dict, network: Path, mirror: bool | None = None) -> bool:
    """Whether the answers of ``network`` (a folder's model.keras or model.onnx) average
    the mirror image's, with the mirror pass ``mirror`` asked for (``wants_mirror``)."""
    if Path(network).suffix == ".onnx" and not single_view_file(labels):
        return True
    return wants_mirror(labels, mirror)


def mirrored(run):
    """``run`` (one network call on a batch) averaged with its answers on the mirror
    images, both views in one call (as ``models.classifier.flip_averaged`` does)."""
    def both(batch: np.ndarray) -> dict[str, np.ndarray]:
        answers = run(np.concatenate([batch, batch[:, :, ::-1]]))
        n = len(batch)
        return {head: (np.asarray(v[:n], np.float32) + np.asarray(v[n:], np.float32)) / 2
                for head, v in answers.items()}
    return both


def _chunked(run, batch: np.ndarray) -> dict[str, np.ndarray]:
    batch = np.asarray(batch, dtype=np.float32)
    parts = [run(batch[i:i + BATCH]) for i in range(0, len(batch), BATCH)]
    if not parts:
        return {}
    return {k: np.concatenate([np.asarray(p[k], np.float64) for p in parts])
            for k in parts[0]}


class KerasClassifier:
    """``model.keras`` on the Keras backend that ``KERAS_BACKEND`` names; ``mirror``
    (None: as saved) chooses the averaging network or its inner single-view one."""

    def __init__(self, path: Path, mirror: bool | None = None):
        if importlib.util.find_spec("keras") is None:
            raise ModelFolderError(
                f"{path} is a Keras model and Keras is not installed here (the light "
                "install runs ONNX models): run kface export --format onnx where it was "
                "trained and use that folder, or install the full kface-pipeline")
        from models.classifier import load_classifier, single_view_network

        self.path = Path(path)
        self.model = load_classifier(self.path)
        inner = single_view_network(self.model)
        averaging = inner is not None
        self.mirror = averaging if mirror is None else mirror
        if averaging and not self.mirror:
            self.run = inner.predict_on_batch
        elif self.mirror and not averaging:
            self.run = mirrored(self.model.predict_on_batch)
        else:
            self.run = self.model.predict_on_batch

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return _chunked(self.run, batch)


class OnnxClassifier:
    """``model.onnx`` on ONNX Runtime's CPU provider (``threads``: its intra-op threads,
    0 = ONNX Runtime's choice); ``mirror``: average with the mirror images (a single-view
    file, ``single_view``, only: an older export mirrors in its graph, always)."""

    def __init__(self, path: Path, threads: int = 0, mirror: bool = False,
                 single_view: bool = True):
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
        self.mirror = mirror or not single_view
        self.run = mirrored(self._run) if mirror and single_view else self._run

    def _run(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.heads, self.session.run(None, {self.input: chunk}), strict=True))

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return _chunked(self.run, batch)


def load_backend(folder: Path, threads: int = 0, prefer_onnx: bool = False,
                 mirror: bool | None = None) -> tuple[Classifier, dict]:
    """The classifier of a model folder (``model_file``) and its ``labels.json``; checks
    that the two agree (every head labels.json names, with as many classes), else
    ModelFolderError. ``mirror``: the mirror pass (None: ``wants_mirror``'s default)."""
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
    mirror = wants_mirror(labels, mirror)
    if path.suffix == ".onnx":
        model = OnnxClassifier(path, threads, mirror, single_view_file(labels))
    else:
        model = KerasClassifier(path, mirror)
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

