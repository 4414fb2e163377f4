"""FaceAnalyzer: detector + trained classifier, for images, folders and video frames.

Built from a model folder: ``labels.json`` with ``model.keras`` (training's) or
``model.onnx`` (``kface export --format onnx``; runs on ONNX Runtime without TensorFlow,
see ``models.backends``). Faces are found by
the detector kind the model was trained on and cut exactly as the training crops were
(the settings recorded in labels.json' ``crop``: margin, aligned or not, by the one crop
function ``models.face_crop.face_crop``), and faces go through the classifier in
batches: all faces of an image, or of many images with ``analyze_many``. Another
detector kind can be asked for; the analyser then says,
in ``notes``, that the faces differ from the training crops. Its other detector settings
are its own (``inference_detector_config``): threshold 0.8 for res10, 0.7 for YuNet
(training data keeps 0.9 and 0.8; with res10, between 0.5 and 0.8 the detector's extra
boxes on single-person photos are mostly toys, signs and decorations, which would inflate
visitor counts; YuNet scores faces lower, and cut ones lower still) and the square
300x300 input (wide camera frames keep more pixels on the short side, where
small faces are); phantoms and overlapping boxes are removed by the detector.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.labels import AGES, expected_age
from core.run_folder import RunFolder
from core.storage import file_sha256
from models.backends import MODEL_FILES, ModelFolderError, load_backend, model_file
from models.calibration import calibrate_heads, model_calibration
from models.detector import (
    DEFAULT_KIND,
    LANDMARK_KINDS,
    DetectorConfig,
    Face,
    FaceDetector,
    get_detector,
    gives_landmarks,
    inference_confidence,
)
from models.face_crop import CropSpec, face_crop


def inference_detector_config(confidence: float | None = None,
                              base: DetectorConfig | None = None,
                              kind: str = DEFAULT_KIND) -> DetectorConfig:
    """Detector settings for predict, video and webcam: ``base`` with ``confidence``
    (default: the network's ``inference_confidence``); without ``base``, the default
    settings of ``kind`` with the square input (see the module docstring)."""
    base = base or DetectorConfig(kind=kind, input_aspect="square")
    return base.model_copy(update={
        "confidence": confidence or inference_confidence(base.kind)})


def _is_model_folder(folder: Path) -> bool:
    return model_file(folder) is not None


DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "default"  # shipped in the package


def default_model_note(folder: Path = DEFAULT_MODEL) -> str:
    """One line saying which shipped model answers and where its card is."""
    import json

    labels = json.loads((folder / "labels.json").read_text())
    card = labels.get("card", {})
    return (f"no --model: using the shipped model {card.get('name', folder.name)} "
            f"({labels.get('backbone')}, {card.get('summary', 'see docs/model.md')}; "
            "docs/model.md; --model chooses another)")


def resolve_model_dir(path: Path | None) -> tuple[Path, str | None]:
    """The model folder that ``path`` means, and a note when it is not ``path`` itself.

    None: the model shipped in the package (``DEFAULT_MODEL``). Accepted: a model folder
    (``labels.json`` + ``model.keras`` or ``model.onnx``); its network file; an
    experiment folder (``OUT/experiments/NAME``); a run folder (``OUT``) with one
    trained experiment, or with several of which one is ``default``. Anything else raises
    ModelFolderError naming what was looked for and where the models are."""
    if path is None:
        if not _is_model_folder(DEFAULT_MODEL):
            raise ModelFolderError(
                f"no --model given and the shipped model is not in {DEFAULT_MODEL}: "
                "reinstall kface-pipeline (or build it: python bench/build_default_model.py), "
                "or give --model OUT/experiments/NAME/model")
        return DEFAULT_MODEL, default_model_note()
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"--model {path} not found: give a trained model folder, "
                               "e.g. OUT/experiments/default/model")
    if path.is_file():
        if path.name in (*MODEL_FILES, "labels.json") and _is_model_folder(path.parent):
            return path.parent, f"using the model folder {path.parent}"
        raise ModelFolderError(f"--model {path} is a file: give the folder that holds "
                               "labels.json and model.keras or model.onnx")
    if _is_model_folder(path):
        return path, None
    if _is_model_folder(path / RunFolder.MODEL):  # an experiment folder
        return path / RunFolder.MODEL, f"using {path / RunFolder.MODEL}"
    run = RunFolder(path)
    trained = [RunFolder(path, name) for name in run.experiment_names()
               if _is_model_folder(RunFolder(path, name).model)]
    if len(trained) == 1 or run.experiment in [t.experiment for t in trained]:
        chosen = trained[0] if len(trained) == 1 else run
        return chosen.model, (f"{path} is a run folder: using experiment "
                              f"{chosen.experiment!r}, {chosen.model}")
    if trained:
        names = ", ".join(str(t.model) for t in trained)
        raise ModelFolderError(f"{path} is a run folder with several trained experiments: "
                               f"give one of {names}")
    missing = [f for f in ("labels.json",) if not (path / f).is_file()]
    if not any((path / f).is_file() for f in MODEL_FILES):
        missing.insert(0, " (or ".join(MODEL_FILES) + ")")
    raise ModelFolderError(
        f"model folder {path} lacks {', '.join(missing)}: point --model at the 'model' "
        "folder of a finished run, OUT/experiments/NAME/model (kface run ... trains it)")



def model_detector(labels: dict, confidence: float | None = None,
                   detector: DetectorConfig | None = None,
                   detector_kind: str | None = None) -> DetectorConfig:
    """The detector settings a model's answers use: the kind it was trained on (unless
    another is asked for), the inference threshold, and the crop margin it was trained
    with (``labels.json``)."""
    crop = labels.get("crop", {})
    kind = detector_kind or (detector.kind if detector else crop.get("detector", DEFAULT_KIND))
    base = inference_detector_config(
        confidence, detector.model_copy(update={"kind": kind}) if detector else None, kind)
    return base.model_copy(update={"margin": crop.get("margin", base.margin),
                                   "margin_mode": crop.get("margin_mode", base.margin_mode)})


def provenance(model_dir: Path, labels: dict, network: Path, detector: DetectorConfig
               ) -> dict:
    """What made a set of answers, as every output file records it: ``model`` (its name:
    the shipped model's, else its folder; its id: labels.json's ``model_id``, one for a
    model and its ONNX export, or for a model trained before ids existed its labels.json's
    sha256; the network file and that file's sha256; the analyser adds ``mirror``,
    whether the answers average the mirror image's) and ``detector`` (kind, threshold)."""
    return {"model": {"name": labels.get("card", {}).get("name", str(model_dir)),
                      "id": labels.get("model_id") or file_sha256(Path(model_dir) /
                                                                  "labels.json"),
                      "file": Path(network).name, "sha256": file_sha256(network)},
            "detector": {"kind": detector.kind, "confidence": detector.confidence}}


@dataclass
class FacePrediction:
    box: tuple[int, int, int, int]
    score: float
    gender: str
    gender_probs: dict[str, float]
    age_band: str
    age_band_probs: dict[str, float]
    landmarks: tuple[tuple[float, float], ...] | None = None
    age: float | None = None  # years, from the exact-age head when the model has one

    def as_dict(self) -> dict:
        return {"box": list(self.box), "score": round(self.score, 4), "gender": self.gender,
                "gender_probs": self.gender_probs, "age_band": self.age_band,
                "age_band_probs": self.age_band_probs, "age": self.age,
                "landmarks": [list(p) for p in self.landmarks] if self.landmarks else None}


class FaceAnalyzer:
    """``analyze(bgr_image) -> list[FacePrediction]`` (best detector score first)."""

    def __init__(self, model_dir: Path | None, confidence: float | None = None,
                 detector: DetectorConfig | None = None, detector_kind: str | None = None,
                 threads: int = 0, mirror: bool | None = None):
        model_dir, note = resolve_model_dir(model_dir)
        # the shipped model holds both forms: ONNX Runtime where it is installed (faster);
        # mirror: the mirror pass (None: as labels.json says, models.backends)
        self.model, self.labels = load_backend(model_dir, threads,
                                               prefer_onnx=model_dir == DEFAULT_MODEL,
                                               mirror=mirror)
        self.model_dir = model_dir
        # models trained before calibration have none: their probabilities as they come
        self.calibration = model_calibration(self.labels)
        crop = self.labels.get("crop", {})
        # models from before YuNet: the original's detector
        trained_kind = crop.get("detector", DEFAULT_KIND)
        self.detector_cfg = model_detector(self.labels, confidence, detector, detector_kind)
        kind = self.detector_cfg.kind
        self.spec = CropSpec(int(crop.get("size", self.labels["input_size"])),
                             bool(crop.get("align", False)), self.detector_cfg.margin)
        self.size = self.spec.size
        self.notes: list[str] = [note] if note else []  # one line each: what it chose
        if kind != trained_kind:
            self.notes.append(
                f"the model was trained on {trained_kind} detections; detecting with {kind} "
                "gives faces cut somewhat differently (accuracy may drop)")
        if self.spec.align and not gives_landmarks(kind):
            self.notes.append(
                f"the model expects landmark-aligned faces; {kind} finds no landmarks, so "
                "faces are box-cropped (accuracy may drop): use a detector with landmarks "
                f"({', '.join(LANDMARK_KINDS)})")
        get_detector(self.detector_cfg)  # missing or bad weights fail here

    @functools.cached_property
    def _provenance(self) -> dict:
        made_by = provenance(self.model_dir, self.labels, Path(self.model.path),
                             self.detector_cfg)
        made_by["model"]["mirror"] = self.model.mirror
        return made_by

    def provenance(self) -> dict:
        """What made the answers (``provenance``), for every output file."""
        return self._provenance

    @property
    def detector(self) -> FaceDetector:
        """This thread's detector (each reader thread of ``inference.predict`` has its own)."""
        return get_detector(self.detector_cfg)

    def crops(self, image: np.ndarray) -> tuple[list[Face], np.ndarray]:
        """Detected faces and their classifier inputs (RGB, size x size, float32), cut by
        the one crop function the training crops were cut by. Safe to call from several
        threads at once."""
        faces = self.detector.detect(image)
        batch = np.stack([face_crop(image, f.box_margin, f.landmarks, self.spec)[0]
                          for f in faces]) if faces else np.zeros((0, self.size, self.size, 3))
        return faces, batch.astype(np.float32)

    def classify(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Class probabilities per head for a batch of crops (``BATCH`` crops a call)."""
        if len(batch) == 0:
            return {"gender": np.zeros((0, 2)), "age_band": np.zeros((0, 4))}
        probs = self.model(batch)
        return calibrate_heads(probs, self.calibration)  # (models.calibration)

    def analyze(self, image: np.ndarray) -> list[FacePrediction]:
        return self.analyze_many([image])[0]

    def analyze_many(self, images: list[np.ndarray]) -> list[list[FacePrediction]]:
        """The faces of each image, their crops classified together (one network call per
        ``BATCH`` crops, not one per image)."""
        return self.predictions([self.crops(image) for image in images])

    def predictions(self, found: list[tuple[list[Face], np.ndarray]]
                    ) -> list[list[FacePrediction]]:
        """Classify the crops of several images (each ``crops``' answer) together."""
        batches = [batch for _, batch in found if len(batch)]
        probs = self.classify(np.concatenate(batches) if batches
                              else np.zeros((0, self.size, self.size, 3), np.float32))
        ages = (expected_age(probs["age"], self.labels.get("ages", AGES),
                             self.labels.get("age_calibration")) if "age" in probs else None)
        results, row = [], 0
        for faces, _ in found:
            results.append([self._prediction(f.box, f.score, probs["gender"][row + i],
                                              probs["age_band"][row + i], f.landmarks,
                                              None if ages is None else ages[row + i])
                             for i, f in enumerate(faces)])
            row += len(faces)
        return results

    def _prediction(self, box, score, gender_p, age_p, landmarks=None,
                    age=None) -> FacePrediction:
        g_names, a_names = self.labels["gender"], self.labels["age_band"]
        return FacePrediction(
            tuple(int(v) for v in box), float(score),
            g_names[int(np.argmax(gender_p))],
            {n: round(float(p), 4) for n, p in zip(g_names, gender_p, strict=True)},
            a_names[int(np.argmax(age_p))],
            {n: round(float(p), 4) for n, p in zip(a_names, age_p, strict=True)},
            landmarks, None if age is None else round(float(age), 1))
