"""FaceAnalyzer: detector + trained classifier, for images, folders and video frames.

Built from a trained model folder (``model.keras`` + ``labels.json``). Faces are cut
exactly as the training crops were (the margin settings recorded in labels.json,
``tasks.crops.crop_face``), and all faces of an image go through the classifier as one
batch. Its detector settings are its own (``inference_detector_config``): threshold 0.8
(training data keeps 0.9; between 0.5 and 0.8 the detector's extra boxes on single-person
photos are mostly toys, signs and decorations, which would inflate visitor counts) and
the square 300x300 input (wide camera frames keep more pixels on the short side, where
small faces are); phantoms and overlapping boxes are removed by the detector.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.detector import DetectorConfig, get_detector
from tasks.crops import crop_face

MODEL_FILES = ("model.keras", "labels.json")
INFERENCE_CONFIDENCE = 0.8


def inference_detector_config(confidence: float = INFERENCE_CONFIDENCE,
                              base: DetectorConfig | None = None) -> DetectorConfig:
    """Detector settings for predict, video and webcam: ``base`` with ``confidence``; without
    ``base``, the default settings with the square input (see the module docstring)."""
    base = base or DetectorConfig(input_aspect="square")
    return base.model_copy(update={"confidence": confidence})


class ModelFolderError(FileNotFoundError):
    """The model folder lacks a file the analyser needs."""


def check_model_folder(model_dir: Path) -> Path:
    """Raise ModelFolderError naming the missing files unless ``model_dir`` is usable."""
    model_dir = Path(model_dir)
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ModelFolderError(
            f"model folder {model_dir} lacks {', '.join(missing)}: point --model at the "
            "'model' folder of a finished run (kface run ... --stages train)")
    return model_dir


@dataclass
class FacePrediction:
    box: tuple[int, int, int, int]
    score: float
    gender: str
    gender_probs: dict[str, float]
    age_band: str
    age_band_probs: dict[str, float]

    def as_dict(self) -> dict:
        return {"box": list(self.box), "score": round(self.score, 4), "gender": self.gender,
                "gender_probs": self.gender_probs, "age_band": self.age_band,
                "age_band_probs": self.age_band_probs}


class FaceAnalyzer:
    """``analyze(bgr_image) -> list[FacePrediction]`` (best detector score first)."""

    def __init__(self, model_dir: Path, confidence: float = INFERENCE_CONFIDENCE,
                 detector: DetectorConfig | None = None):
        model_dir = check_model_folder(model_dir)
        self.labels = json.loads((model_dir / "labels.json").read_text())
        crop = self.labels.get("crop", {})
        self.size = int(crop.get("size", self.labels["input_size"]))
        base = inference_detector_config(confidence, detector)
        self.detector_cfg = base.model_copy(update={
            "margin": crop.get("margin", base.margin),
            "margin_mode": crop.get("margin_mode", base.margin_mode)})
        self.detector = get_detector(self.detector_cfg)
        from models.classifier import load_classifier

        self.model = load_classifier(model_dir / "model.keras")

    def crops(self, image: np.ndarray) -> tuple[list, np.ndarray]:
        """Detected faces and their classifier inputs (RGB, size x size, float32)."""
        faces = self.detector.detect(image)
        batch = np.stack([crop_face(image, f.box_margin, self.size) for f in faces]
                         ) if faces else np.zeros((0, self.size, self.size, 3))
        return faces, batch.astype(np.float32)

    def classify(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Class probabilities for a batch of crops (one model call)."""
        if len(batch) == 0:
            return {"gender": np.zeros((0, 2)), "age_band": np.zeros((0, 4))}
        out = self.model.predict_on_batch(batch)
        return {k: np.asarray(out[k], dtype=np.float64) for k in ("gender", "age_band")}

    def analyze(self, image: np.ndarray) -> list[FacePrediction]:
        faces, batch = self.crops(image)
        probs = self.classify(batch)
        return [self._prediction(f.box, f.score, probs["gender"][i], probs["age_band"][i])
                for i, f in enumerate(faces)]

    def _prediction(self, box, score, gender_p, age_p) -> FacePrediction:
        g_names, a_names = self.labels["gender"], self.labels["age_band"]
        return FacePrediction(
            tuple(int(v) for v in box), float(score),
            g_names[int(np.argmax(gender_p))],
            {n: round(float(p), 4) for n, p in zip(g_names, gender_p, strict=True)},
            a_names[int(np.argmax(age_p))],
            {n: round(float(p), 4) for n, p in zip(a_names, age_p, strict=True)})
