"""Evaluate stage: the trained model on the held-out test split -> ``reports/``.

The headline numbers are on the test people (never trained on, never used to choose the
checkpoint); the validation split's numbers are shown apart, named as such. Without a
test split (``split.test_fraction: 0``) the report scores validation and says that this
is optimistic.

Writes ``metrics.json`` (per head: accuracy, macro-F1, per-class precision/recall/F1,
confusion matrix; age-band accuracy within one band; 95% intervals by bootstrap over
subjects; the majority-class and class-prior baselines; accuracy per joint class and per
K-Face attribute), confusion-matrix PNGs, the original's three training-curve plots, and
a readable ``report.md`` whose first lines say when the labels are synthetic or the test
people too few to trust the numbers. The scoring and the report are
``models.scoring``'s, which ``kface evaluate`` on a labelled folder shares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.labels import AGE_BANDS, AGES, GENDERS, expected_age
from models.calibration import calibrate_heads
from models.scoring import (
    FEW_SUBJECTS,
    calibration_metrics,
    compute_metrics,
    degenerate_warnings,
    score_split,
)
from tasks.crop_stream import CropSet, has_exact_ages

CODE_VERSION = "evaluate-3"  # 3: the exact-age head scored


def predict_frame(model, frame: pd.DataFrame, files: list[Path], size: int,
                  batch_size: int = 32) -> dict[str, np.ndarray]:
    """Class probabilities of every head of the model (``gender``, ``age_band`` and, from
    an exact-age model, ``age``) for every crop in ``frame`` (a split of the crop index),
    in ``frame``'s order, streamed from the crop shards ``files``."""
    from tasks.crop_stream import crop_batches

    data = crop_batches(frame, files, size, batch_size, labels=False)
    return {head: np.asarray(p) for head, p in model.predict(data, verbose=0).items()}


def age_error(frame: pd.DataFrame, age_probs: np.ndarray, train_ages: np.ndarray,
              ages: tuple[int, ...] = AGES, line: dict | None = None) -> dict:
    """Mean absolute error in years of the exact-age head's expected age (over its
    classes ``ages``, through the model's age ``line``), beside always answering the
    training split's median age."""
    true = frame.age.to_numpy(np.float64)
    predicted = expected_age(age_probs, ages, line)
    return {"mae_years": float(np.mean(np.abs(predicted - true))),
            "baseline_median_mae_years": float(np.mean(np.abs(np.median(train_ages) - true)))}


def evaluation_metrics(model, crops: CropSet, size: int, synthetic_labels: bool = False,
                       calibration: dict[str, tuple[float, list[float] | None]] | None = None,
                       ages: tuple[int, ...] = AGES, age_line: dict | None = None) -> dict:
    """The report's metrics: the test split scored (validation when there is none), with
    intervals and baselines; validation summarised apart; the report's warnings; with the
    model's ``calibration`` (``models.calibration.model_calibration`` of its labels.json),
    the splits are scored as every inference path sees them (calibrated), and the
    calibration of the scored split is measured before and after it (ECE, reliability
    bins); ``ages`` and ``age_line``: the exact-age head's
    classes and age calibration (labels.json).
    Reads the crops of the scored splits only."""
    examples = crops.splits
    scored = "test" if len(examples.get("test", ())) else "val"
    train = examples["train"]
    train_counts = {"gender": np.bincount(train.gender_idx, minlength=len(GENDERS)),
                    "age_band": np.bincount(train.age_idx, minlength=len(AGE_BANDS))}
    frame = examples[scored]
    raw = predict_frame(model, frame, crops.files, size)
    probs = calibrate_heads(raw, calibration or {})
    metrics = score_split(frame, probs, train_counts)
    metrics["scored_split"] = scored
    metrics["heads"] = sorted(probs)
    metrics["labels_have_ages"] = has_exact_ages(frame)
    if calibration:
        metrics["calibration"] = calibration_metrics(frame, raw, calibration)
    if "age" in probs and metrics["labels_have_ages"]:
        metrics["age"] = age_error(frame, probs["age"], train.age.to_numpy(), ages, age_line)
    warnings = []
    if synthetic_labels:
        warnings.append("the labels of this dataset are SYNTHETIC (made up by the sample "
                        "generator): the numbers below only show that the pipeline runs")
    warnings += degenerate_warnings(metrics)
    if scored == "val":
        warnings.append("no test split (split.test_fraction is 0): these are validation "
                        "numbers, and validation chose the checkpoint, so they are optimistic")
    if metrics["subjects"] < FEW_SUBJECTS:
        lo, hi = metrics["age_band"]["ci95"]["accuracy"]
        warnings.append(f"only {metrics['subjects']} people are scored: the age-band "
                        f"accuracy's 95% interval spans {lo:.2f}-{hi:.2f}; use more subjects "
                        "for numbers that mean much")
    metrics["warnings"] = warnings
    if scored == "test" and len(examples["val"]):
        val = examples["val"]
        val_metrics = compute_metrics(val, calibrate_heads(
            predict_frame(model, val, crops.files, size), calibration or {}))
        metrics["validation"] = {
            "examples": val_metrics["examples"], "subjects": val_metrics["subjects"],
            "gender_accuracy": val_metrics["gender"]["accuracy"],
            "age_band_accuracy": val_metrics["age_band"]["accuracy"],
            "age_band_within_one": val_metrics["age_band"]["accuracy_within_one_band"]}
    return metrics
