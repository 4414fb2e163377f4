"""Evaluate stage: the trained model on the validation split -> ``reports/``.

Writes ``metrics.json`` (per head: accuracy, macro-F1, per-class precision/recall/F1,
confusion matrix; age-band accuracy within one band; accuracy per joint class and per
K-Face attribute), confusion-matrix PNGs, the original's three training-curve plots, and
a readable ``report.md``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from models.classifier import AGE_CLASSES, GENDER_CLASSES  # noqa: E402
from tasks.storage import atomic_path, write_bytes_atomic, write_json_atomic  # noqa: E402

CODE_VERSION = "evaluate-1"
ATTRIBUTES = ("light", "camera", "accessory", "expression")


def predict_frame(model, frame: pd.DataFrame, size: int, batch_size: int = 64
                  ) -> dict[str, np.ndarray]:
    """Class probabilities for every crop in ``frame`` (``image`` column of JPEG bytes)."""
    from tasks.train import make_dataset

    data = make_dataset(frame, size, batch_size, training=False).map(lambda x, y, w: x)
    out = model.predict(data, verbose=0)
    return {"gender": np.asarray(out["gender"]), "age_band": np.asarray(out["age_band"])}


def head_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> dict:
    labels = list(range(len(classes)))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                       zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                   zero_division=0)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": {"labels": list(classes),
                             "rows_true_cols_pred": confusion_matrix(
                                 y_true, y_pred, labels=labels).tolist()},
    }


def compute_metrics(frame: pd.DataFrame, probs: dict[str, np.ndarray]) -> dict:
    """All validation metrics from true labels in ``frame`` and predicted ``probs``."""
    g_pred = probs["gender"].argmax(1)
    a_pred = probs["age_band"].argmax(1)
    g_true = frame.gender_idx.to_numpy()
    a_true = frame.age_idx.to_numpy()
    metrics = {
        "examples": len(frame),
        "subjects": int(frame.subject_id.nunique()),
        "gender": head_metrics(g_true, g_pred, GENDER_CLASSES),
        "age_band": head_metrics(a_true, a_pred, AGE_CLASSES),
    }
    metrics["age_band"]["accuracy_within_one_band"] = float(np.mean(np.abs(a_true - a_pred) <= 1))
    correct = frame.assign(gender_ok=g_true == g_pred, age_ok=a_true == a_pred)
    metrics["by_joint_class"] = {
        k: {"n": int(len(g)), "gender_accuracy": float(g.gender_ok.mean()),
            "age_band_accuracy": float(g.age_ok.mean())}
        for k, g in correct.groupby("joint_class")
    }
    by_attr = {}
    for attr in ATTRIBUTES:
        if attr in correct and correct[attr].notna().any():
            by_attr[attr] = {
                str(k): {"n": int(len(g)), "gender_accuracy": float(g.gender_ok.mean()),
                         "age_band_accuracy": float(g.age_ok.mean())}
                for k, g in correct.groupby(attr)
            }
    metrics["by_attribute"] = by_attr
    return metrics


def _save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_confusion(cm: list[list[int]], labels: list[str], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(np.array(cm), display_labels=labels).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    _save_png(fig, path)


def plot_curves(history: dict, reports: Path) -> list[str]:
    """The original's three plots: gender accuracy, age-band accuracy, loss (train vs val)."""
    names = []
    for key, title, fname in (("gender_accuracy", "Gender accuracy", "curve_gender.png"),
                              ("age_band_accuracy", "Age band accuracy", "curve_age_band.png"),
                              ("loss", "Loss", "curve_loss.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        epochs = [e + 1 for e in history["epoch"]]
        ax.plot(epochs, history[key], marker="o", label="Train")
        ax.plot(epochs, history[f"val_{key}"], marker="o", label="Val")
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.legend(loc="best")
        _save_png(fig, reports / fname)
        names.append(fname)
    return names


def write_report(metrics: dict, history: dict, split_report: dict, merge_report: dict,
                 reports: Path) -> Path:
    """Write PNGs, metrics.json and report.md under ``reports``; return report.md's path."""
    reports.mkdir(parents=True, exist_ok=True)
    for head, title in (("gender", "Gender"), ("age_band", "Age band")):
        cm = metrics[head]["confusion_matrix"]
        plot_confusion(cm["rows_true_cols_pred"], cm["labels"], title,
                       reports / f"confusion_{head}.png")
        write_json_atomic(reports / f"confusion_{head}.json", cm)
    curves = plot_curves(history, reports)
    write_json_atomic(reports / "metrics.json", metrics)
    g, a = metrics["gender"], metrics["age_band"]
    lines = [
        "# kface-pipeline evaluation report", "",
        f"Validation: {metrics['examples']} faces of {metrics['subjects']} subjects; "
        f"split strategy **{split_report.get('strategy')}** "
        f"(subjects in both splits: {split_report.get('subjects', {}).get('in_both')}).", "",
    ]
    if split_report.get("warning"):
        lines += [f"> **Warning:** {split_report['warning']}", ""]
    lines += [
        "| head | accuracy | macro-F1 | within one band |", "|---|---|---|---|",
        f"| gender | {g['accuracy']:.4f} | {g['macro_f1']:.4f} | |",
        f"| age band | {a['accuracy']:.4f} | {a['macro_f1']:.4f} | "
        f"{a['accuracy_within_one_band']:.4f} |", "",
        "## Per class", "", "| head | class | precision | recall | F1 | support |",
        "|---|---|---|---|---|---|",
    ]
    for head in ("gender", "age_band"):
        for c, m in metrics[head]["per_class"].items():
            lines.append(f"| {head} | {c} | {m['precision']:.3f} | {m['recall']:.3f} | "
                         f"{m['f1']:.3f} | {m['support']} |")
    lines += ["", "## Accuracy per joint class", "",
              "| class | n | gender | age band |", "|---|---|---|---|"]
    for k, m in metrics["by_joint_class"].items():
        lines.append(f"| {k} | {m['n']} | {m['gender_accuracy']:.3f} | "
                     f"{m['age_band_accuracy']:.3f} |")
    for attr, groups in metrics["by_attribute"].items():
        lines += ["", f"## Accuracy by {attr}", "", f"| {attr} | n | gender | age band |",
                  "|---|---|---|---|"]
        for k, m in groups.items():
            lines.append(f"| {k} | {m['n']} | {m['gender_accuracy']:.3f} | "
                         f"{m['age_band_accuracy']:.3f} |")
    counts = merge_report.get("joint_class_counts") or {}
    lines += ["", "## Data", "", "| joint class | faces (all splits) |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    rows = split_report.get("rows") or {}
    lines += ["",
              f"Subjects without metadata (excluded): "
              f"{merge_report.get('subjects_without_labels', 0)}. Split rows: "
              + (", ".join(f"{k} {v}" for k, v in rows.items()) if isinstance(rows, dict)
                 else str(rows)) + ".", "",
              "## Training curves", ""]
    lines += [f"![{c}]({c})" for c in curves]
    lines += ["", "![confusion gender](confusion_gender.png) "
              "![confusion age band](confusion_age_band.png)", ""]
    path = reports / "report.md"
    write_bytes_atomic(path, "\n".join(lines).encode("utf-8"))
    return path
