"""``kface stats``: people per age band, gender and their joint cells, with 95% intervals,
from a predictions file (``predictions.json``: each face is a visitor) or a tracks file
(``tracks.jsonl``: each counted track is a visitor).

Estimator: each visitor adds their calibrated probabilities to the counts (the expected
count of a class is the sum of the visitors' probabilities of it), and the interval is
that of a sum of independent Bernoulli draws with those probabilities (Poisson-binomial:
variance ``sum p (1 - p)``, normal approximation, clipped to 0..N). It is right when the
probabilities are calibrated for the people counted, which ``labels.json``'s temperature
makes them for people like the validation split. What it does not cover: a shop whose
mix of ages differs from the training data's (the probabilities then lean towards the
training mix; measured on held-out people with ``bench/bench_counts.py``, 17-18% of 500
visitors in a wrong band at a young or an older shop's mix, and intervals covering the
truth in 0-28% of shops), so the interval says how sure the counts are given the model,
not how right the model is for that shop. Counting each visitor by their most likely
class (``argmax``) is reported beside it. NumPy only (it runs in the light install).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.storage import write_json_atomic

Z95 = 1.959964
INTERVAL_COVERS = ("the sampling noise given the model's probabilities, not a shop whose "
                   "age mix differs from the training data's: there the age-band counts "
                   "lean towards the training mix (held-out people, 500 visitors of a "
                   "young or older shop: 17-18% of visitors in a wrong band; "
                   "docs/training.md, 'Counts a shop can trust')")


class StatsError(ValueError):
    """The input is not a predictions or tracks file this command can count."""


def visitor_probabilities(path: Path) -> tuple[dict[str, list[str]], np.ndarray, np.ndarray]:
    """The class names and, per visitor, the gender and age-band probabilities."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"{path} not found: give a predictions.json (kface predict) or a "
                         "tracks.jsonl (kface video)")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            visitors = [r for r in rows if r.get("counted", True)]
        else:
            visitors = [f for e in json.loads(path.read_text()) for f in e["faces"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise StatsError(f"{path} is not a kface predictions or tracks file ({exc})") from None
    if any("age_band_probs" not in v or "gender_probs" not in v for v in visitors):
        raise StatsError(f"{path} has no probabilities per visitor (a tracks file of an "
                         "older kface): run kface video again")
    if not visitors:
        return {"gender": [], "age_band": []}, np.zeros((0, 2)), np.zeros((0, 4))
    names = {"gender": list(visitors[0]["gender_probs"]),
             "age_band": list(visitors[0]["age_band_probs"])}
    gender = np.array([[v["gender_probs"][n] for n in names["gender"]] for v in visitors])
    band = np.array([[v["age_band_probs"][n] for n in names["age_band"]] for v in visitors])
    return names, gender, band


def counts_with_intervals(probs: np.ndarray, names: list[str]) -> dict[str, dict]:
    """Per class: the expected count and its 95% interval (see the module docstring)."""
    probs = np.asarray(probs, np.float64)
    n = len(probs)
    estimate = probs.sum(0) if n else np.zeros(len(names))
    half = Z95 * np.sqrt((probs * (1 - probs)).sum(0)) if n else np.zeros(len(names))
    return {name: {"estimate": round(float(e), 1), "low": round(float(max(0.0, e - h)), 1),
                   "high": round(float(min(n, e + h)), 1)}
            for name, e, h in zip(names, estimate, half, strict=True)}


def visitor_stats(path: Path) -> dict:
    """Counts with intervals for ``age_band``, ``gender`` and their ``joint`` cells (the
    two heads taken as independent for each visitor), and the argmax counts beside."""
    names, gender, band = visitor_probabilities(path)
    joint_names = [f"{a}_{g}" for a in names["age_band"] for g in names["gender"]]
    joint = (band[:, :, None] * gender[:, None, :]).reshape(len(band), -1)
    argmax = {head: {n: int((p.argmax(1) == i).sum()) if len(p) else 0
                     for i, n in enumerate(names[head])}
              for head, p in (("gender", gender), ("age_band", band))}
    return {"input": str(path), "visitors": int(len(band)),
            "estimator": "sum of calibrated probabilities; 95% Poisson-binomial interval",
            "interval_covers": INTERVAL_COVERS,
            "age_band": counts_with_intervals(band, names["age_band"]),
            "gender": counts_with_intervals(gender, names["gender"]),
            "joint": counts_with_intervals(joint, joint_names), "argmax": argmax}


def write_stats_json(stats: dict, out: Path) -> Path:
    path = Path(out) / "stats.json"
    write_json_atomic(path, stats)
    return path
