"""Counts a shop can trust? Visitors with known truth drawn from held-out people.

The held-out fifth of the All-Age-Faces people (``aaf_quality.held_out``: chosen by a hash
of the file name, never trained or tuned on) goes once through the model's own inference
path (``kface evaluate``'s: detector, crop, calibration; the best face of each photo).
For each shop those people are split in two at random, half and half within each band:
the *reference* half plays the labelled photos of people like the shop's that a user runs
``kface evaluate`` on (its ``soft_confusion.json``), the *visitor* half the shop's
visitors (a fresh split per shop, so that the coverage averages over references too).
For three shops (the mix of the faces the model was trained on, read from its run
folder's train and val splits; a young shop 55/30/10/5%; an older one 10/20/30/40% for
20s/30s/40s/50s) and 100 and 500 visitors, ``--draws`` shops are drawn: each visitor's
band from the shop's mix, then a visitor-half person of that band. Printed for each: the
share of visitors counted in a wrong band (half the summed absolute count errors over
the visitors) when each visitor is counted by their most likely band (argmax), by
``kface stats``' default estimator (summed calibrated probabilities) and by ``kface stats
--reference`` (mix-corrected); how often the true count of each band falls inside each
estimator's 95% interval (the lowest band's figure; each band's in the JSON), and the
corrected interval's mean width. Also the held-out people's age-band calibration error
(ECE) with and without the model's temperature.

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


def predictions(model: Path, work: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Per held-out person with a face: the file name, the true band and gender indices
    and the calibrated probabilities of both heads (cached by the model's sha256), and the
    temperature."""
    from core.storage import file_sha256
    from models.analyzer import FaceAnalyzer, resolve_model_dir
    from tasks.evaluate_folder import folder_predictions
    from tasks.select import DataConfig

    model_dir, _ = resolve_model_dir(model)
    network = next(p for p in (model_dir / "model.onnx", model_dir / "model.keras")
                   if p.exists())
    cache = work / f"held-out-{file_sha256(network)[:16]}-2.npz"
    labels = json.loads((model_dir / "labels.json").read_text())
    if not cache.exists():
        analyzer = FaceAnalyzer(model_dir)
        frame, probs, _ = folder_predictions(analyzer, DataConfig(
            root=held_out_folder(work), layout="labelled"))
        np.savez(cache, files=frame.path.to_numpy(str), band_truth=frame.age_idx.to_numpy(),
                 gender_truth=frame.gender_idx.to_numpy(), band=probs["age_band"],
                 gender=probs["gender"])
    return dict(np.load(cache)), labels.get("temperature") or {}


def run_prior(model: Path) -> np.ndarray:
    """The age-band shares of the faces the model was trained and calibrated on (its run
    folder's train and val splits): the prior its probabilities carry."""
    run = Path(model).resolve().parents[2]
    split = pd.read_parquet(run / "split.parquet", columns=["path", "split"])
    faces = pd.read_parquet(run / "faces.parquet", columns=["path", "age_band"])
    used = faces.merge(split[split.split.isin(["train", "val"])], on="path")
    shares = used.age_band.value_counts(normalize=True)
    return np.array([shares.get(b, 0.0) for b in AGE_BANDS])


def split_halves(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random half of the people of each band: the reference (True); the rest visitors."""
    half = np.zeros(len(truth), bool)
    for band in np.unique(truth):
        people = rng.permutation(np.flatnonzero(truth == band))
        half[people[: len(people) // 2]] = True
    return half


def simulate(truth: np.ndarray, probs: np.ndarray, mix: tuple[float, ...], visitors: int,
             draws: int, rng: np.random.Generator) -> dict:
    """Wrong-band shares (argmax, summed probabilities, mix-corrected) and the intervals'
    coverage."""
    from tasks.stats import counts_with_intervals, mix_corrected_counts, soft_confusion

    wrong = {"argmax": [], "summed": [], "corrected": []}
    inside = {"summed": [], "corrected": []}
    width = []
    for _ in range(draws):
        half = split_halves(truth, rng)
        reference = soft_confusion(probs[half], truth[half], list(AGE_BANDS))
        people = [np.flatnonzero(~half & (truth == b)) for b in range(len(AGE_BANDS))]
        bands = rng.choice(len(AGE_BANDS), size=visitors, p=mix)
        chosen = np.array([rng.choice(people[b]) for b in bands])
        true = np.bincount(bands, minlength=len(AGE_BANDS))
        p = probs[chosen]
        corrected, _ = mix_corrected_counts(p, reference, rng)
        for name, counts in (("summed", counts_with_intervals(p, list(AGE_BANDS))),
                             ("corrected", corrected)):
            estimate = np.array([counts[b]["estimate"] for b in AGE_BANDS])
            wrong[name].append(np.abs(estimate - true).sum() / (2 * visitors))
            inside[name].append([counts[b]["low"] <= t <= counts[b]["high"]
                                 for b, t in zip(AGE_BANDS, true, strict=True)])
        width.append(np.mean([corrected[b]["high"] - corrected[b]["low"] for b in AGE_BANDS]))
        argmax = np.bincount(p.argmax(1), minlength=len(AGE_BANDS))
        wrong["argmax"].append(np.abs(argmax - true).sum() / (2 * visitors))
    row = {f"wrong_band_{k}": round(float(np.mean(v)), 4) for k, v in wrong.items()}
    for name, hits in inside.items():
        coverage = np.mean(hits, axis=0)
        row[f"coverage_min_{name}"] = round(float(coverage.min()), 3)
        row[f"coverage_by_band_{name}"] = dict(zip(AGE_BANDS, np.round(coverage, 3).tolist(),
                                                   strict=True))
    row["corrected_interval_width"] = round(float(np.mean(width)), 1)
    return row


def main() -> None:
    from models.calibration import apply_temperature, calibration_error

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a trained model folder")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "counts")
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data, temperature = predictions(args.model, args.work)
    truth, probs = data["band_truth"], data["band"]
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
    result["reference_people"] = result["visitor_people"] = len(truth) // 2
    shops = {"training mix": tuple(prior), **SHOPS}
    print(f"per shop: a reference of half the {len(truth)} held-out people (by band), "
          "visitors drawn from the other half")
    print(f"{'shop':<14}{'mix 20s/30s/40s/50s':<24}{'visitors':>9}{'wrong: argmax':>15}"
          f"{'summed':>8}{'corrected':>11}{'coverage: summed':>18}{'corrected':>11}"
          f"{'width':>7}")
    for name, mix in shops.items():
        for visitors in (100, 500):
            row = {"shop": name, "mix": [round(m, 3) for m in mix], "visitors": visitors,
                   **simulate(truth, probs, mix, visitors, args.draws, rng)}
            result["shops"].append(row)
            print(f"{name:<14}{'/'.join(f'{m:.2f}' for m in mix):<24}{visitors:>9}"
                  f"{row['wrong_band_argmax']:>15.1%}{row['wrong_band_summed']:>8.1%}"
                  f"{row['wrong_band_corrected']:>11.1%}{row['coverage_min_summed']:>18.1%}"
                  f"{row['coverage_min_corrected']:>11.1%}"
                  f"{row['corrected_interval_width']:>7.1f}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
