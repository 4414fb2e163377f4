"""Counts a shop can trust? Visitors with known truth drawn from held-out people.

The held-out fifth of the All-Age-Faces people (``aaf_quality.held_out``: chosen by a hash
of the file name, never trained or tuned on) goes once through the model's own inference
path (``kface evaluate``'s: detector, crop, calibration; the best face of each photo).
Then, for three shops (the mix of the faces the model was trained on, read from its run
folder's train and val splits; a young shop 55/30/10/5%; an older one 10/20/30/40% for
20s/30s/40s/50s) and 100 and 500 visitors, ``--draws`` shops are drawn: each visitor's
band from the shop's mix, then a held-out person of that band. Printed for each: the
share of visitors counted in a wrong band (half the summed absolute count errors over
the visitors) when each visitor is counted by their most likely band (argmax), by
``kface stats``' estimator (summed calibrated probabilities), and by a prior-adjusted
estimator (the shop's mix re-estimated by EM, Saerens et al. 2002); and how often the true
count of each band falls inside ``kface stats``' 95% interval (the lowest band's figure
and each band's). Also the held-out people's age-band calibration error (ECE) with and
without the model's temperature.

``python bench/bench_counts.py --model bench/out/aaf-quality/run-utk/experiments/default/model``
(a model trained by ``bench/aaf_quality.py``; predictions are cached beside the model's
sha256 under ``--work``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from aaf_quality import SHARED, held_out  # noqa: E402

from core.labels import AGE_BANDS  # noqa: E402

SHOPS = {"young": (0.55, 0.30, 0.10, 0.05), "older": (0.10, 0.20, 0.30, 0.40)}


def held_out_folder(work: Path) -> Path:
    """Symlinks to the held-out AAF photos and their labels.csv (a labelled folder)."""
    folder = work / "held-out"
    if (folder / "labels.csv").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    labels = pd.read_csv(SHARED / "faces" / "aaf" / "labels.csv")
    labels = labels[labels.file.map(held_out)]
    for file in labels.file:
        if not (folder / file).exists():
            (folder / file).symlink_to(SHARED / "faces" / "aaf" / file)
    labels.assign(subject_id=labels.file).to_csv(folder / "labels.csv", index=False)
    return folder


def predictions(model: Path, work: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per held-out person with a face: the true band index and the calibrated age-band
    probabilities (cached by the model's sha256), and the temperature."""
    from core.storage import file_sha256
    from models.analyzer import FaceAnalyzer, resolve_model_dir
    from tasks.evaluate_folder import folder_predictions
    from tasks.select import DataConfig

    model_dir, _ = resolve_model_dir(model)
    network = next(p for p in (model_dir / "model.onnx", model_dir / "model.keras")
                   if p.exists())
    cache = work / f"held-out-{file_sha256(network)[:16]}.npz"
    labels = json.loads((model_dir / "labels.json").read_text())
    if not cache.exists():
        analyzer = FaceAnalyzer(model_dir)
        frame, probs, _ = folder_predictions(analyzer, DataConfig(
            root=held_out_folder(work), layout="labelled"))
        np.savez(cache, truth=frame.age_idx.to_numpy(), band=probs["age_band"])
    data = np.load(cache)
    return data["truth"], data["band"], labels.get("temperature") or {}


def run_prior(model: Path) -> np.ndarray:
    """The age-band shares of the faces the model was trained and calibrated on (its run
    folder's train and val splits): the prior its probabilities carry."""
    run = Path(model).resolve().parents[2]
    split = pd.read_parquet(run / "split.parquet", columns=["path", "split"])
    faces = pd.read_parquet(run / "faces.parquet", columns=["path", "age_band"])
    used = faces.merge(split[split.split.isin(["train", "val"])], on="path")
    shares = used.age_band.value_counts(normalize=True)
    return np.array([shares.get(b, 0.0) for b in AGE_BANDS])


def prior_adjusted(probs: np.ndarray, prior: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Counts after re-estimating the shop's mix by EM (Saerens et al. 2002): each
    visitor's probabilities re-weighted by (shop mix / training mix), the shop mix the
    mean of the re-weighted probabilities, until it settles."""
    mix = prior.copy()
    for _ in range(iterations):
        weighted = probs * (mix / prior)
        weighted /= weighted.sum(1, keepdims=True)
        new = weighted.mean(0)
        if np.abs(new - mix).max() < 1e-6:
            break
        mix = new
    return weighted.sum(0)


def simulate(truth: np.ndarray, probs: np.ndarray, mix: tuple[float, ...], visitors: int,
             draws: int, rng: np.random.Generator, prior: np.ndarray) -> dict:
    """Wrong-band shares (argmax, summed probabilities, prior-adjusted) and interval
    coverage."""
    from tasks.stats import counts_with_intervals

    people = [np.flatnonzero(truth == b) for b in range(len(AGE_BANDS))]
    wrong_argmax, wrong_sum, wrong_em, inside = [], [], [], []
    for _ in range(draws):
        bands = rng.choice(len(AGE_BANDS), size=visitors, p=mix)
        chosen = np.array([rng.choice(people[b]) for b in bands])
        true = np.bincount(bands, minlength=len(AGE_BANDS))
        p = probs[chosen]
        argmax = np.bincount(p.argmax(1), minlength=len(AGE_BANDS))
        counts = counts_with_intervals(p, list(AGE_BANDS))
        estimate = np.array([counts[b]["estimate"] for b in AGE_BANDS])
        wrong_argmax.append(np.abs(argmax - true).sum() / (2 * visitors))
        wrong_sum.append(np.abs(estimate - true).sum() / (2 * visitors))
        wrong_em.append(np.abs(prior_adjusted(p, prior) - true).sum() / (2 * visitors))
        inside.append([counts[b]["low"] <= t <= counts[b]["high"]
                       for b, t in zip(AGE_BANDS, true, strict=True)])
    coverage = np.mean(inside, axis=0)
    return {"wrong_band_argmax": round(float(np.mean(wrong_argmax)), 4),
            "wrong_band_estimator": round(float(np.mean(wrong_sum)), 4),
            "wrong_band_prior_adjusted": round(float(np.mean(wrong_em)), 4),
            "coverage_min": round(float(coverage.min()), 3),
            "coverage_by_band": dict(zip(AGE_BANDS, np.round(coverage, 3).tolist(),
                                         strict=True))}


def main() -> None:
    from models.calibration import apply_temperature, calibration_error

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a trained model folder")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "counts")
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    truth, probs, temperature = predictions(args.model, args.work)
    t = temperature.get("age_band", 1.0)
    result = {"model": str(args.model), "held_out_people": int(len(truth)),
              "age_band_accuracy": round(float((probs.argmax(1) == truth).mean()), 4),
              "age_band_temperature": t,
              "age_band_ece_calibrated": round(calibration_error(probs, truth), 4),
              "age_band_ece_uncalibrated": round(calibration_error(
                  apply_temperature(probs, 1 / t), truth), 4), "shops": []}
    rng = np.random.default_rng(args.seed)
    prior = run_prior(args.model)
    result["training_prior"] = [round(float(x), 3) for x in prior]
    shops = {"training mix": tuple(prior), **SHOPS}
    print(f"{'shop':<14}{'mix 20s/30s/40s/50s':<24}{'visitors':>9}{'wrong band: argmax':>20}"
          f"{'summed (kface stats)':>22}{'prior-adjusted':>16}"
          f"{'95% coverage (lowest band)':>28}")
    for name, mix in shops.items():
        for visitors in (100, 500):
            row = {"shop": name, "mix": [round(m, 3) for m in mix], "visitors": visitors,
                   **simulate(truth, probs, mix, visitors, args.draws, rng, prior)}
            result["shops"].append(row)
            print(f"{name:<14}{'/'.join(f'{m:.2f}' for m in mix):<24}{visitors:>9}"
                  f"{row['wrong_band_argmax']:>20.1%}{row['wrong_band_estimator']:>22.1%}"
                  f"{row['wrong_band_prior_adjusted']:>16.1%}{row['coverage_min']:>28.1%}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
