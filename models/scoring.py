"""Scoring a model's answers against labels: what the pipeline's evaluate stage and
``kface evaluate`` (a labelled folder) both report, below both of them.

Per head: accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix,
age-band accuracy within one band; 95% intervals by bootstrap over people; the
majority-class and class-prior baselines; accuracy per joint class and per K-Face
attribute; calibration before and after the model's own (``models.calibration``);
warnings for a degenerate model; and the readable ``report.md`` with its figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.labels import AGE_BANDS, GENDERS
from core.storage import atomic_path, write_bytes_atomic, write_json_atomic
from models.calibration import calibration_report

ATTRIBUTES = ("light", "camera", "accessory", "expression")
BOOTSTRAP_ROUNDS = 2000
FEW_SUBJECTS = 50  # below this, a 95% interval on accuracy is wider than about +-10 points


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """``k x k`` counts, rows true class, columns predicted."""
    return np.bincount(np.asarray(y_true) * k + np.asarray(y_pred),
                       minlength=k * k).reshape(k, k)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.shape(num)), where=den > 0)


def head_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 (0 where undefined, as
    scikit-learn's ``zero_division=0``) and the confusion matrix, all from the matrix
    (the bootstrap computes the same quantities from resampled matrices)."""
    cm = confusion(y_true, y_pred, len(classes))
    tp = np.diagonal(cm).astype(np.float64)
    precision, recall = _ratio(tp, cm.sum(0)), _ratio(tp, cm.sum(1))
    f1 = _ratio(2 * tp, cm.sum(0) + cm.sum(1))
    return {
        "accuracy": float(tp.sum() / max(1, cm.sum())),
        "macro_f1": float(_f1_macro(cm)),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                          "f1": float(f1[i]), "support": int(cm[i].sum())}
                      for i, c in enumerate(classes)},
        "confusion_matrix": {"labels": list(classes), "rows_true_cols_pred": cm.tolist()},
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
        "gender": head_metrics(g_true, g_pred, GENDERS),
        "age_band": head_metrics(a_true, a_pred, AGE_BANDS),
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


def _near(k: int) -> np.ndarray:
    """``k x k`` mask of (true, predicted) bands at most one band apart."""
    return np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]) <= 1


def _f1_macro(cm: np.ndarray) -> np.ndarray:
    """Macro-F1 of confusion matrices ``(..., K, K)`` (rows true, columns predicted); a
    class with no true and no predicted example counts 0, as in ``head_metrics``."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    denom = cm.sum(-1) + cm.sum(-2)
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)
    return f1.mean(-1)


def subject_bootstrap(subjects: np.ndarray, heads: dict[str, tuple[np.ndarray, np.ndarray, int]],
                      rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict:
    """95% percentile intervals by resampling *subjects* with replacement (faces of one
    person are not independent draws). ``heads``: name -> (true, predicted, classes).
    Returns ``{head: {"accuracy": [lo, hi], "macro_f1": [...], ...}}``; the age band
    also gets ``accuracy_within_one_band``."""
    ids, inverse = np.unique(subjects, return_inverse=True)
    per_subject = {}
    for head, (true, pred, k) in heads.items():
        per_subject[head] = np.zeros((len(ids), k * k))
        np.add.at(per_subject[head], (inverse, true * k + pred), 1)
    # the resampled confusion matrices, 250 resamples at a time: the draws are a
    # resamples x subjects matrix (a 55,000-person test split would make it 880 MB at once)
    rng, chunks = np.random.default_rng(seed), {head: [] for head in heads}
    for start in range(0, rounds, 250):
        draws = rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)),
                                size=min(250, rounds - start)).astype(np.float64)
        for head, counts in per_subject.items():
            chunks[head].append(draws @ counts)
    out = {}
    for head, (_, _, k) in heads.items():
        cm = np.concatenate(chunks[head]).reshape(rounds, k, k)
        total = cm.sum((1, 2))
        values = {"accuracy": np.trace(cm, axis1=1, axis2=2) / total,
                  "macro_f1": _f1_macro(cm)}
        if head == "age_band":
            values["accuracy_within_one_band"] = (cm * _near(k)).sum((1, 2)) / total
        out[head] = {m: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                     for m, v in values.items()}
    return out


def baselines(train_counts: np.ndarray, true: np.ndarray, head: str) -> dict:
    """What a model that ignores the face scores on ``true``: always the training
    majority class, and guessing at random with the training class prior (expected
    values)."""
    k = len(train_counts)
    prior = train_counts / train_counts.sum()
    majority = int(np.argmax(train_counts))
    test_counts = np.bincount(true, minlength=k).astype(np.float64)
    n = test_counts.sum()
    cm_majority = np.zeros((k, k))
    cm_majority[:, majority] = test_counts
    cm_prior = test_counts[:, None] * prior[None, :]  # expected confusion matrix
    out = {}
    for name, cm in (("majority_class", cm_majority), ("class_prior", cm_prior)):
        out[name] = {"accuracy": float(np.trace(cm) / n), "macro_f1": float(_f1_macro(cm))}
        if head == "age_band":
            out[name]["accuracy_within_one_band"] = float((cm * _near(k)).sum() / n)
    out["majority_class"]["class"] = majority
    return out


def score_split(frame: pd.DataFrame, probs: dict[str, np.ndarray], train_counts: dict,
                rounds: int = BOOTSTRAP_ROUNDS) -> dict:
    """``compute_metrics`` plus, per head, the subject-bootstrap intervals (``ci95``) and
    the baselines from the training split's class counts."""
    metrics = compute_metrics(frame, probs)
    truth = {"gender": (frame.gender_idx.to_numpy(), len(GENDERS)),
             "age_band": (frame.age_idx.to_numpy(), len(AGE_BANDS))}
    heads = {h: (t, probs[h].argmax(1), k) for h, (t, k) in truth.items()}
    intervals = subject_bootstrap(frame.subject_id.to_numpy(), heads, rounds)
    for head, (true, _) in truth.items():
        metrics[head]["ci95"] = intervals[head]
        metrics[head]["baselines"] = baselines(np.asarray(train_counts[head], np.float64),
                                               true, head)
    return metrics


def calibration_metrics(frame: pd.DataFrame, probs: dict[str, np.ndarray],
                        calibration: dict[str, tuple[float, list[float] | None]]) -> dict:
    """Per class head: the temperature (and bias), the ECE and mean top probability of the
    model's own ``probs`` before and after its calibration, and the reliability bins before
    and after (``models.calibration``)."""
    report = {}
    for head, column in (("gender", "gender_idx"), ("age_band", "age_idx")):
        temperature, bias = calibration.get(head, (1.0, None))
        report[head] = calibration_report(probs[head], frame[column].to_numpy(), temperature,
                                          bins=True, bias=bias)
    return report


def plot_reliability(calibration: dict, path: Path) -> None:
    """Reliability diagrams, a panel per head: accuracy per confidence bin before and after
    the temperature, against the diagonal of perfect calibration."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(calibration), figsize=(5 * len(calibration), 4))
    for ax, (head, c) in zip(np.atleast_1d(axes), calibration.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
        for when, style in (("before", "o--"), ("after", "s-")):
            bins = c[f"reliability_{when}"]
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style,
                    label=f"{when} (ECE {c[f'ece_{when}']:.3f})")
        ax.set_title(f"{head.replace('_', ' ')}: T = {c['temperature']:.2f}")
        ax.set_xlabel("top probability")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left")
    _save_png(fig, path)


def degenerate_warnings(metrics: dict) -> list[str]:
    """Warnings for a model that learned nothing useful: a class it never gets right
    (recall 0 on a class that is there), or accuracy at or under always answering the
    majority class. They go to the top of the report."""
    warnings = []
    for head in ("gender", "age_band"):
        m = metrics[head]
        never = [c for c, v in m["per_class"].items() if v["support"] and v["recall"] == 0]
        if never:
            warnings.append(f"the model never recognises {head} {', '.join(never)} (recall "
                            "0.000): it is degenerate for this head; train longer, on more "
                            "people, or check the labels")
        majority = m["baselines"]["majority_class"]["accuracy"]
        if m["accuracy"] <= majority:
            warnings.append(f"{head} accuracy {m['accuracy']:.3f} is no better than always "
                            f"answering the majority class ({majority:.3f}): the model has "
                            "not learned this head")
    return warnings


def heads_sentence(metrics: dict) -> str:
    """The report's line on which heads were trained and scored."""
    text = "Heads trained and scored: gender (M/F) and age band (20s-50s)"
    if "age" not in metrics.get("heads", ()):
        if metrics.get("labels_have_ages"):
            return text + (" (age bands only: model.exact_age is off, although the labels "
                           "have exact ages; --set model.exact_age=true trains the exact-age "
                           "head).")
        return text + " (age bands only: the labels have no exact ages)."
    text += ", the band read from an exact-age head (20-59)"
    age = metrics.get("age")
    if age:
        median = ("these people's own median" if metrics.get("scored_split") == "folder"
                  else "the training median")
        text += (f"; its mean absolute error is {age['mae_years']:.1f} years (always "
                 f"{median}: {age['baseline_median_mae_years']:.1f})")
    return text + "."


def _pyplot():
    """matplotlib, imported for the PNGs only (the metrics need numpy alone, so they run
    on a GPU machine without matplotlib or scikit-learn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_confusion(cm: list[list[int]], labels: list[str], title: str, path: Path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = _pyplot().subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(np.array(cm), display_labels=labels).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    _save_png(fig, path)


def plot_curves(history: dict, reports: Path) -> list[str]:
    """The original's three plots: gender accuracy, age-band accuracy, loss (train vs val)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
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
    """Write PNGs, metrics.json and report.md under ``reports``; return report.md's path.
    The report's sections are the ``_section`` functions below, in order."""
    reports.mkdir(parents=True, exist_ok=True)
    for head, title in (("gender", "Gender"), ("age_band", "Age band")):
        cm = metrics[head]["confusion_matrix"]
        plot_confusion(cm["rows_true_cols_pred"], cm["labels"], title,
                       reports / f"confusion_{head}.png")
        write_json_atomic(reports / f"confusion_{head}.json", cm)
    curves = plot_curves(history, reports) if history.get("epoch") else []
    write_json_atomic(reports / "metrics.json", metrics)
    if metrics.get("calibration"):
        plot_reliability(metrics["calibration"], reports / "reliability.png")
    lines = [*_summary_section(metrics, split_report), *_calibration_section(metrics),
             *_per_class_section(metrics), *_data_section(merge_report, split_report),
             *_figures_section(curves)]
    path = reports / "report.md"
    write_bytes_atomic(path, "\n".join(lines).encode("utf-8"))
    return path


SCORED_ON = {
    "test": "held-out test people: never trained on, not used to choose the checkpoint",
    "val": "the validation people, who also chose the checkpoint and stopped training, so "
           "these numbers are optimistic",
    "folder": "a labelled folder, through the model's own inference path (detector, crop, "
              "calibration), the best face of each photo; people who were also in the "
              "training data make the numbers optimistic"}


def _summary_section(metrics: dict, split_report: dict) -> list[str]:
    """Title, warnings, what was scored, the headline table with intervals and
    baselines, and the notes (age error by band, photos left out, validation)."""
    scored = metrics.get("scored_split", "val")
    lines = ["# kface-pipeline evaluation report", ""]
    lines += [f"> **Warning:** {w}" for w in metrics.get("warnings", [])]
    if split_report.get("warning"):
        lines.append(f"> **Warning:** {split_report['warning']}")
    if lines[-1] != "":
        lines.append("")
    split = (f"Split strategy **{split_report.get('strategy')}** (subjects in more than one "
             f"split: {split_report.get('subjects', {}).get('in_both')}). "
             if split_report else "")
    lines += [
        f"Scored on **{scored}**: {metrics['examples']} faces of {metrics['subjects']} "
        f"subjects ({SCORED_ON[scored]}). {split}{heads_sentence(metrics)}", "",
        "95% intervals: bootstrap over subjects. Baselines: always the training split's "
        "majority class; guessing with the training split's class shares (expected).", "",
        "| head | metric | score | 95% interval | majority class | class prior |",
        "|---|---|---|---|---|---|",
    ]
    for head, label in (("gender", "gender"), ("age_band", "age band")):
        m = metrics[head]
        names = ["accuracy", "macro_f1"] + (["accuracy_within_one_band"]
                                            if head == "age_band" else [])
        for name in names:
            lo, hi = m.get("ci95", {}).get(name, (float("nan"), float("nan")))
            base = m.get("baselines", {})
            lines.append(
                f"| {label} | {name.replace('_', ' ')} | **{m[name]:.3f}** | {lo:.3f}-{hi:.3f} | "
                f"{base.get('majority_class', {}).get(name, float('nan')):.3f} | "
                f"{base.get('class_prior', {}).get(name, float('nan')):.3f} |")
    by_band = metrics.get("age", {}).get("signed_error_by_band")
    if by_band:
        lines += ["", "Age in years, mean signed error (predicted - true) per true band: "
                  + ", ".join(f"{b} {e:+.1f}" for b, e in by_band.items()) + "."]
    left_out = metrics.get("left_out")
    if left_out:
        lines += ["", f"Photos: {left_out['photos']} labelled and found; left out: "
                  f"{left_out['no_face']} without a face, {left_out['unreadable']} "
                  f"unreadable; CSV rows not used: {left_out['excluded_labels']} with labels "
                  f"outside the classes, {left_out['not_found']} whose file is missing."]
    validation = metrics.get("validation")
    if validation:
        lines += ["", f"Validation ({validation['examples']} faces of "
                  f"{validation['subjects']} subjects; it chose the checkpoint, so it is "
                  f"optimistic): gender accuracy {validation['gender_accuracy']:.3f}, age band "
                  f"accuracy {validation['age_band_accuracy']:.3f}."]
    return lines


def _calibration_section(metrics: dict) -> list[str]:
    """Temperatures and ECE before and after, against what a calibrated model shows."""
    calibration = metrics.get("calibration")
    if not calibration:
        return []
    lines = ["", "## Calibration", "",
             f"Every inference path divides each head's logits by the temperature "
             f"fitted on the validation split after training (labels.json; with "
             f"train.calibration_bias the age band's logits then get a bias per band). "
             f"On the "
             f"{metrics.get('scored_split', 'val')} split: expected calibration error (ECE, "
             "15 bins) and mean top probability, before and after. ECE is never zero on "
             "finite data: *calibrated* is the ECE a perfectly calibrated model with these "
             "probabilities shows on as many faces (its mean, and 95% of draws below "
             "the second figure); an ECE after below that second figure is what a "
             "calibrated model shows.", "",
             "| head | temperature | ECE before | ECE after | calibrated | mean top "
             "probability before | after | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for head, c in calibration.items():
        floor = c.get("ece_floor") or {}
        shown = (f"{floor['mean']:.3f} (<= {floor['p95']:.3f})"
                 if floor.get("mean") is not None else "-")
        lines.append(f"| {head} | {c['temperature']:.2f} | {c['ece_before']:.3f} | "
                     f"**{c['ece_after']:.3f}** | {shown} | "
                     f"{c['mean_confidence_before']:.3f} | "
                     f"{c['mean_confidence_after']:.3f} | {metrics[head]['accuracy']:.3f} |")
    return [*lines, "", "![reliability](reliability.png)"]


def _per_class_section(metrics: dict) -> list[str]:
    """Precision/recall per class, accuracy per joint class and per attribute."""
    lines = ["", "## Per class", "", "| head | class | precision | recall | F1 | support |",
             "|---|---|---|---|---|---|"]
    for head in ("gender", "age_band"):
        for c, m in metrics[head]["per_class"].items():
            lines.append(f"| {head} | {c} | {m['precision']:.3f} | {m['recall']:.3f} | "
                         f"{m['f1']:.3f} | {m['support']} |")
    groups_by = {"joint class": metrics["by_joint_class"], **metrics["by_attribute"]}
    for attr, groups in groups_by.items():
        title = "per joint class" if attr == "joint class" else f"by {attr}"
        column = "class" if attr == "joint class" else attr
        lines += ["", f"## Accuracy {title}", "", f"| {column} | n | gender | age band |",
                  "|---|---|---|---|"]
        for k, m in groups.items():
            lines.append(f"| {k} | {m['n']} | {m['gender_accuracy']:.3f} | "
                         f"{m['age_band_accuracy']:.3f} |")
    return lines


def _data_section(merge_report: dict, split_report: dict) -> list[str]:
    """Faces per joint class, subjects without metadata and rows per split."""
    if not (merge_report or split_report):
        return []
    counts = merge_report.get("joint_class_counts") or {}
    rows = split_report.get("rows") or {}
    return ["", "## Data", "", "| joint class | faces (all splits) |", "|---|---|",
            *(f"| {k} | {v} |" for k, v in counts.items()), "",
            f"Subjects without metadata (excluded): "
            f"{merge_report.get('subjects_without_labels', 0)}. Split rows: "
            + (", ".join(f"{k} {v}" for k, v in rows.items()) if isinstance(rows, dict)
               else str(rows)) + "."]


def _figures_section(curves: list[str]) -> list[str]:
    lines = ["", "## Training curves", "", *(f"![{c}]({c})" for c in curves)] if curves else []
    return [*lines, "", "![confusion gender](confusion_gender.png) "
            "![confusion age band](confusion_age_band.png)", ""]
