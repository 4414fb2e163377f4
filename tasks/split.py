"""Split stage: train/validation assignment -> ``split.parquet`` (``path``, ``split``).

``subject`` (default): person-disjoint, stratified on the joint age x gender class with
scikit-learn's ``StratifiedGroupKFold`` (``round(1 / val_fraction)`` folds, shuffled with
``seed``; the first fold is validation). ``image``: the original notebook's call,
``train_test_split(rows, test_size=0.25, random_state=777, stratify=joint class)``, which
puts the same people in both splits (its validation scores are on people it trained on).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class SplitConfig(BaseModel):
    """How faces are divided into train and validation."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["subject", "image"] = Field(
        "subject", description="'subject': no person in both splits; 'image': the original "
        "notebook's per-image split (people overlap)."
    )
    val_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = Field(777)


class SplitError(ValueError):
    """The faces cannot be split as asked (too few subjects or rows)."""


def split_by_image(faces: pd.DataFrame, cfg: SplitConfig) -> pd.Series:
    """The original: stratified per-image split. Returns 'train'/'val' per row."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(faces))
    _, val_idx = train_test_split(idx, test_size=cfg.val_fraction, random_state=cfg.seed,
                                  stratify=faces["joint_class"].to_numpy())
    split = np.full(len(faces), "train", dtype=object)
    split[val_idx] = "val"
    return pd.Series(split, index=faces.index, name="split")


def split_by_subject(faces: pd.DataFrame, cfg: SplitConfig) -> pd.Series:
    """Person-disjoint split stratified on the joint class. Returns 'train'/'val' per row."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_folds = max(2, round(1 / cfg.val_fraction))
    n_subjects = faces["subject_id"].nunique()
    if n_subjects < n_folds:
        raise SplitError(f"split.strategy=subject needs at least {n_folds} subjects "
                         f"for val_fraction {cfg.val_fraction}; found {n_subjects}")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=cfg.seed)
    _, val_idx = next(splitter.split(faces, faces["joint_class"], faces["subject_id"]))
    split = np.full(len(faces), "train", dtype=object)
    split[val_idx] = "val"
    return pd.Series(split, index=faces.index, name="split")


def split_faces(faces: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, dict]:
    """Assign each face to train or val; returns ``(path, split)`` rows and a report."""
    if faces.empty:
        raise SplitError("no faces to split (did detection find any, and do labels match?)")
    if cfg.strategy == "image":
        log.warning("split.strategy=image reproduces the original: the same subjects are in "
                    "train and val, so validation scores overstate accuracy on new people")
        split = split_by_image(faces, cfg)
    else:
        split = split_by_subject(faces, cfg)
    out = pd.DataFrame({"path": faces["path"], "split": split})
    train_subjects = set(faces.loc[split == "train", "subject_id"])
    val_subjects = set(faces.loc[split == "val", "subject_id"])
    overlap = train_subjects & val_subjects
    if cfg.strategy == "subject" and overlap:  # would be a bug in the splitter
        raise SplitError(f"{len(overlap)} subjects in both splits, e.g. {sorted(overlap)[:3]}")
    counts = (faces.assign(split=split).groupby(["split", "joint_class"]).size()
              .unstack(fill_value=0))
    report = {
        "strategy": cfg.strategy,
        "rows": {s: int((split == s).sum()) for s in ("train", "val")},
        "subjects": {"train": len(train_subjects), "val": len(val_subjects),
                     "in_both": len(overlap)},
        "class_counts": {s: {k: int(v) for k, v in counts.loc[s].items()}
                         for s in counts.index},
    }
    if overlap:
        report["warning"] = (f"{len(overlap)} subjects are in both splits (strategy=image): "
                             "validation accuracy is measured on people seen in training")
    return out, report
