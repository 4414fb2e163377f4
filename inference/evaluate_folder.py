"""``kface evaluate``: a trained (or exported) model scored on any labelled photo folder.

What a user runs to check a model on their own customers' photos: the folder is read as
the pipeline's labelled layout (images + a labels CSV with ``file``, ``gender`` and
``age`` or ``age_band``, optionally ``subject_id``), every photo goes through the same
inference path as ``kface predict`` (the model's detector, crop and calibration), the
best-scoring face of each photo is scored against its labels, and the same honest report
as the pipeline's evaluate stage is written: accuracy and macro-F1 with 95% intervals by
person, baselines, confusion matrices, per class and per joint class, the exact-age
head's MAE and signed error per band, calibration before and after the model's
temperature. The baselines use the folder's own class shares (the model's training
shares are not recorded), which favours them. Photos without a face or unreadable are
counted and left out. Beside the report, ``soft_confusion.json``: per true class, the mean
and covariance of the model's probabilities, with which ``kface stats --reference``
corrects a shop's counts for its mix (``inference.stats``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.labelled import DatasetError, ScanReport, labels_file, read_labels_file, scan_folder
from core.labels import AGE_BANDS, BAND_AGES, GENDERS
from core.storage import write_json_atomic
from core.threads import READERS
from inference.predict import predict_entries
from inference.stats import REFERENCE_FILE, reference
from models.analyzer import FaceAnalyzer
from models.calibration import uncalibrate_heads
from models.scoring import (
    FEW_SUBJECTS,
    calibration_metrics,
    degenerate_warnings,
    score_split,
    write_report,
)


def folder_predictions(analyzer: FaceAnalyzer, root: Path, labels: Path | None = None,
                       batch: int = 16) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict]:
    """The labelled photos of the folder ``root`` (its ``labels`` CSV, default
    ``root/labels.csv``) with a face (their labels and indices), the calibrated
    probabilities of each one's best face, and counts of what was left out."""
    scan = ScanReport()
    csv = labels_file(root, labels)
    manifest = scan_folder(root, labels, BAND_AGES, None, scan).sort_values(
        "path", kind="stable").reset_index(drop=True)
    if manifest.empty:
        missing = f" ({scan.unrecognised} listed files not found under {root}, e.g. " \
                  f"{scan.unrecognised_examples[0]})" if scan.unrecognised else ""
        raise DatasetError(f"{csv}: no usable labelled photo{missing}: the 'file' column "
                           f"holds paths relative to {root}")
    entries = predict_entries(analyzer, [Path(root) / p for p in manifest.path],
                              batch=batch, readers=READERS)
    best = [e["faces"][0] if e["faces"] else None for e in entries]
    found = np.array([f is not None for f in best])
    left_out = {"photos": len(manifest), "unreadable": sum(bool(e["error"]) for e in entries),
                "no_face": int(sum(not e["faces"] and not e["error"] for e in entries)),
                "excluded_labels": scan.excluded_labels, "not_found": scan.unrecognised}
    if not found.any():
        raise DatasetError(f"no face found in any of the {len(manifest)} labelled photos "
                           f"under {root} ({left_out['unreadable']} unreadable)")
    faces = [f for f in best if f is not None]
    frame = manifest[found].reset_index(drop=True)
    frame = frame.assign(gender_idx=frame.gender.map(GENDERS.index).astype("int32"),
                         age_idx=frame.age_band.map(AGE_BANDS.index).astype("int32"),
                         joint_class=frame.age_band + "_" + frame.gender)
    probs = {"gender": np.array([[f["gender_probs"][n] for n in GENDERS] for f in faces]),
             "age_band": np.array([[f["age_band_probs"][n] for n in AGE_BANDS]
                                   for f in faces])}
    if all(f.get("age") is not None for f in faces):
        probs["age_years"] = np.array([f["age"] for f in faces], np.float64)
    return frame, probs, left_out


def age_metrics(frame: pd.DataFrame, years: np.ndarray) -> dict:
    """MAE of the predicted years on the photos with a true age, beside always answering
    their median, and the signed error (predicted - true) per true band."""
    known = frame.age.notna().to_numpy()
    true, pred = frame.age.to_numpy(np.float64)[known], years[known]
    bands = frame.age_band.to_numpy()[known]
    return {"mae_years": float(np.mean(np.abs(pred - true))),
            "baseline_median_mae_years": float(np.mean(np.abs(np.median(true) - true))),
            "examples": int(known.sum()),
            "signed_error_by_band": {b: float(np.mean(pred[bands == b] - true[bands == b]))
                                     for b in AGE_BANDS if (bands == b).any()}}


def evaluate_folder(analyzer: FaceAnalyzer, root: Path, labels: Path | None = None,
                    batch: int = 16) -> tuple[dict, dict]:
    """The report's metrics for the labelled folder ``root`` (its ``labels`` CSV; see the
    module docstring), and the soft confusion of its people (``inference.stats.reference``:
    what ``kface stats --reference`` corrects a shop's counts with)."""
    frame, probs, left_out = folder_predictions(analyzer, root, labels, batch)
    counts = {"gender": np.bincount(frame.gender_idx, minlength=len(GENDERS)),
              "age_band": np.bincount(frame.age_idx, minlength=len(AGE_BANDS))}
    metrics = score_split(frame, probs, counts)
    metrics.update(scored_split="folder", left_out=left_out,
                   heads=sorted(["gender", "age_band", *(["age"] if "age_years" in probs
                                                         else [])]),
                   labels_have_ages=bool(frame.age.notna().any()))
    if "age_years" in probs and metrics["labels_have_ages"]:
        metrics["age"] = age_metrics(frame, probs["age_years"])
    if analyzer.calibration:  # the probabilities came calibrated: undone for "before"
        metrics["calibration"] = calibration_metrics(
            frame, uncalibrate_heads(probs, analyzer.calibration), analyzer.calibration)
    has_subjects = "subject_id" in read_labels_file(labels_file(root, labels)).columns
    if not has_subjects:
        metrics["subjects_are"] = "photos (the labels have no subject_id)"
    warnings = degenerate_warnings(metrics)
    if metrics["subjects"] < FEW_SUBJECTS:
        lo, hi = metrics["age_band"]["ci95"]["accuracy"]
        warnings.append(f"only {metrics['subjects']} people are scored: the age-band "
                        f"accuracy's 95% interval spans {lo:.2f}-{hi:.2f}")
    if left_out["no_face"] or left_out["unreadable"]:
        warnings.append(f"{left_out['no_face']} photos without a face and "
                        f"{left_out['unreadable']} unreadable ones are left out of the scores")
    metrics["warnings"] = warnings
    if not has_subjects:
        warnings.append("the labels have no subject_id: each photo is counted as a person "
                        "(intervals and the reference's people are by photo)")
    truth = {"gender": frame.gender_idx.to_numpy(), "age_band": frame.age_idx.to_numpy()}
    return metrics, reference(probs, truth, {"gender": list(GENDERS),
                                             "age_band": list(AGE_BANDS)},
                              frame.subject_id.to_numpy() if has_subjects else None)


def write_folder_evaluation(analyzer: FaceAnalyzer, metrics: dict, confusion: dict,
                            out: Path) -> Path:
    """``out/report.md`` with its metrics and plots (``models.scoring.write_report``) and
    ``out/soft_confusion.json``: the reference ``kface stats`` corrects counts with, with
    the model and detector that made it (``FaceAnalyzer.provenance``; counts must come
    from the same model). Returns the report's path."""
    report = write_report(metrics, {}, {}, {}, out)  # no history, split or merge report
    write_json_atomic(Path(out) / REFERENCE_FILE, {**analyzer.provenance(), **confusion})
    return report

