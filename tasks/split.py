"""Split stage: train/validation/test assignment -> ``split.parquet`` (``path``, ``split``).

``subject`` (default): person-disjoint train / val / test (70/15/15 by default),
stratified on the joint age x gender class with scikit-learn's ``StratifiedGroupKFold``
(shuffled with ``seed``): first the test people (``round(1 / test_fraction)`` folds, the
first fold), then, among the rest, the validation people. Validation chooses the
checkpoint and stops training; the report's headline numbers are on test only, people
that nothing in training saw or chose on.

With several labelled folders (a ``source`` column) the strata are the folder x joint
class, so each folder is split by person in the same shares. Faces whose exact age lies
outside the bands' 20-59 (``data.ages`` wider) are always in train: they train the
exact-age head's ends and are never scored.

``image``: the original notebook's call, ``train_test_split(rows, test_size=val_fraction,
random_state=seed, stratify=joint class)``, which puts the same people in both splits (its
scores are on people it trained on). To reproduce it: ``strategy: image,
val_fraction: 0.25, test_fraction: 0`` (no test split: the report then scores the
validation split and says it is biased).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from core.labels import BAND_AGES

log = logging.getLogger(__name__)

CODE_VERSION = "split-1"


class SplitConfig(BaseModel):
    """How faces are divided into train and validation."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["subject", "image"] = Field(
        "subject", description="'subject': no person in both splits; 'image': the original "
        "notebook's per-image split (people overlap)."
    )
    val_fraction: float = Field(
        0.15, gt=0, lt=1, description="Share of faces (subjects) for validation: "
        "checkpoint choice and early stopping.")
    test_fraction: float = Field(
        0.15, ge=0, lt=1, description="Share of faces (subjects) held out for the "
        "report's headline numbers; 0: none (the report scores validation, biased).")
    seed: int = Field(777)


class SplitError(ValueError):
    """The faces cannot be split as asked (too few subjects or rows)."""


def split_by_image(faces: pd.DataFrame, cfg: SplitConfig) -> pd.Series:
    """The original: stratified per-image split (train / val, then test from train when
    ``test_fraction`` > 0). Returns 'train'/'val'/'test' per row."""
    from sklearn.model_selection import train_test_split

    split = np.full(len(faces), "train", dtype=object)
    idx = np.arange(len(faces))
    by = strata(faces).to_numpy()
    if cfg.test_fraction:
        idx, test_idx = train_test_split(idx, test_size=cfg.test_fraction,
                                         random_state=cfg.seed, stratify=by)
        split[test_idx] = "test"
    _, val_idx = train_test_split(idx, test_size=cfg.val_fraction / (1 - cfg.test_fraction),
                                  random_state=cfg.seed, stratify=by[idx])
    split[val_idx] = "val"
    return pd.Series(split, index=faces.index, name="split")


def strata(faces: pd.DataFrame) -> pd.Series:
    """What a split is stratified on: the joint class, per folder when there are several."""
    if "source" in faces:
        return faces["source"].astype(str) + ":" + faces["joint_class"]
    return faces["joint_class"]


def _held_out_fold(faces: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Row positions of the first of ``round(1 / fraction)`` subject-disjoint folds,
    stratified (``strata``)."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    n_folds = max(2, round(1 / fraction))
    n_subjects = faces["subject_id"].nunique()
    if n_subjects < n_folds:
        raise SplitError(f"split.strategy=subject needs at least {n_folds} subjects to hold "
                         f"out {fraction:.0%}; found {n_subjects} (lower "
                         "split.val_fraction / split.test_fraction, or add subjects)")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    try:
        return next(splitter.split(faces, strata(faces), faces["subject_id"]))[1]
    except ValueError:  # every class has fewer faces than folds (a tiny sample)
        log.warning("split: too few faces per class to stratify %d folds; holding out "
                    "%.0f%% of the subjects at random", n_folds, 100 / n_folds)
        shuffle = GroupShuffleSplit(n_splits=1, test_size=1 / n_folds, random_state=seed)
        return next(shuffle.split(faces, groups=faces["subject_id"]))[1]


def split_by_subject(faces: pd.DataFrame, cfg: SplitConfig) -> pd.Series:
    """Person-disjoint train / val / test, stratified (``strata``); people with a face
    outside the bands' ages only train."""
    split = np.full(len(faces), "train", dtype=object)
    outside = _outside_bands(faces).to_numpy()
    scored = ~faces["subject_id"].isin(faces.loc[outside, "subject_id"]).to_numpy()
    rest = np.flatnonzero(scored)  # row positions of the people who may be held out
    if cfg.test_fraction:
        test = rest[_held_out_fold(faces.iloc[rest], cfg.test_fraction, cfg.seed)]
        split[test] = "test"
        rest = np.setdiff1d(rest, test)
    val_share = cfg.val_fraction / (1 - cfg.test_fraction)
    val = _held_out_fold(faces.iloc[rest], min(val_share, 0.5), cfg.seed)
    split[rest[val]] = "val"
    return pd.Series(split, index=faces.index, name="split")


def _outside_bands(faces: pd.DataFrame) -> pd.Series:
    """Faces whose exact age lies outside 20-59 (only where a wider ``data.ages`` kept
    them)."""
    if "age" not in faces:
        return pd.Series(False, index=faces.index)
    age = faces["age"]
    return age.notna() & ((age < BAND_AGES[0]) | (age >= BAND_AGES[1] + 1))


def split_faces(faces: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, dict]:
    """Assign each face to train or val; returns ``(path, split)`` rows and a report."""
    if faces.empty:
        raise SplitError("no faces to split (did detection find any, and do labels match?)")
    if cfg.strategy == "image":
        log.warning("split.strategy=image reproduces the original: the same subjects are in "
                    "train and val, so validation scores overstate accuracy on new people")
        split = split_by_image(faces, cfg).where(~_outside_bands(faces), "train")
    else:
        split = split_by_subject(faces, cfg)
    out = pd.DataFrame({"path": faces["path"], "split": split})
    parts = ("train", "val", "test")
    subjects = {p: set(faces.loc[split == p, "subject_id"]) for p in parts}
    overlap = ((subjects["train"] & subjects["val"]) | (subjects["train"] & subjects["test"])
               | (subjects["val"] & subjects["test"]))
    if cfg.strategy == "subject" and overlap:  # would be a bug in the splitter
        raise SplitError(f"{len(overlap)} subjects in two splits, e.g. {sorted(overlap)[:3]}")
    counts = (faces.assign(split=split).groupby(["split", "joint_class"]).size()
              .unstack(fill_value=0))
    report = {
        "strategy": cfg.strategy,
        "rows": {p: int((split == p).sum()) for p in parts},
        "subjects": {**{p: len(subjects[p]) for p in parts}, "in_both": len(overlap)},
        "class_counts": {s: {k: int(v) for k, v in counts.loc[s].items()}
                         for s in counts.index},
    }
    if overlap:
        report["warning"] = (f"{len(overlap)} subjects are in more than one split "
                             "(strategy=image): the scores are measured on people seen in "
                             "training")
    return out, report
