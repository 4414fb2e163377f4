"""Counts a shop can trust? Visitors with known truth drawn from held-out people.

The held-out fifth of the All-Age-Faces people (``aaf_quality.held_out``: chosen by a hash
of the file name, never trained or tuned on) goes once through the model's own inference
path (``kface evaluate``'s: detector, crop, calibration; the best face of each photo).
Those people are the shop's *population* (``--design population``, the default): for
each shop a *reference* of half as many people (by band) is drawn from them with
replacement, an iid sample like the labelled photos of people like the shop's that a
user runs ``kface evaluate`` on (its ``soft_confusion.json``; a fresh one per shop, so
that the coverage averages over references too), and the visitors are drawn from the
same population: for three shops (the mix of the faces the model was trained on, read
from its run folder's train and val splits; a young shop 55/30/10/5%; an older one
10/20/30/40% for 20s/30s/40s/50s) and 100 and 500 visitors, ``--draws`` shops, each
visitor's band from the shop's mix, then a person of that band. ``--design halves`` is
stricter than a shop: the people of each band are cut in two halves, the reference comes
from one and the visitors from the other, so 500 visitors of a skewed shop reuse the few
people of a band in their half (the older shop's 200 visitors in their 50s come from 59
people, each about 3.4 times), and the visitors carry those people's quirks, which the
reference does not share. ``--design split`` cuts each band's people at random for each
shop: ``--reference-share`` of them are the reference (each once), the rest the
visitors' pool: a reference of real people other than the shop's, of any size. With
``--people never-trained`` the people are the held-out ones and the model's run's AAF
validation and test people (1,122: never trained on; the calibration and best epoch
were chosen on the first, the recipe on the second), the most a reference can hold; the
accuracy and calibration figures stay the held-out people's. ``--people dev`` takes the
run's people alone: where an estimator is chosen before the held-out people count
anything. Printed for each: the
share of visitors counted in a wrong band (half the summed absolute count errors over
the visitors; the mean over the shops, and its Monte Carlo standard error in the JSON and
beside the mix-corrected figure) when each visitor is counted by their most likely band (argmax), by
``kface stats``' default estimator (summed calibrated probabilities) and by ``kface stats
--reference`` (mix-corrected; and ``means alone``, the same shops by its estimator before
2026-12-05, which matched the reference's mean probabilities without their squares); how
often the true count of each band falls inside each
estimator's 95% interval (the lowest band's figure; each band's in the JSON), and the
corrected interval's mean width. And the model's own limit (``perfect ref``): the
mix-corrected estimate when the reference is the visitors' pool itself, the very people
the visitors are drawn from (no reference noise, no difference between reference and
shop people); what is left is the visitors' sampling noise seen through the model's weak age
signal, which no estimator of these probabilities removes. Also the held-out people's
age-band calibration error (ECE) with and without the model's calibration, and the ECE a
perfectly calibrated model would show on as many people (``models.calibration.ece_floor``).

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

from aaf_quality import aaf_links, held_out, run_aaf_people  # noqa: E402

from core.labels import AGE_BANDS  # noqa: E402

SHOPS = {"young": (0.55, 0.30, 0.10, 0.05), "older": (0.10, 0.20, 0.30, 0.40)}


def predictions(model: Path, work: Path, people: str = "held-out", keep=held_out
                ) -> tuple[dict[str, np.ndarray], dict]:
    """Per AAF person of ``people`` (default: the held-out ones) with a face: the file
    name, the true band and gender indices and the calibrated probabilities of both
    heads (cached by the model's sha256), and the model's labels.json (its
    calibration)."""
    from core.storage import file_sha256
    from inference.evaluate_folder import folder_predictions
    from models.analyzer import FaceAnalyzer, resolve_model_dir

    model_dir, _ = resolve_model_dir(model)
    network = next(p for p in (model_dir / "model.onnx", model_dir / "model.keras")
                   if p.exists())
    labels = json.loads((model_dir / "labels.json").read_text())
    cache = work / f"{people}-{file_sha256(network)[:16]}-2.npz"
    if not cache.exists():
        analyzer = FaceAnalyzer(model_dir)
        frame, probs, _ = folder_predictions(analyzer, aaf_links(work / people, keep))
        np.savez(cache, files=frame.path.to_numpy(str), band_truth=frame.age_idx.to_numpy(),
                 gender_truth=frame.gender_idx.to_numpy(), band=probs["age_band"],
                 gender=probs["gender"])
    return dict(np.load(cache)), labels


def run_prior(model: Path) -> np.ndarray:
    """The age-band shares of the faces the model was trained and calibrated on (its run
    folder's train and val splits): the prior its probabilities carry."""
    run = Path(model).resolve().parents[2]
    split = pd.read_parquet(run / "split.parquet", columns=["path", "split"])
    faces = pd.read_parquet(run / "faces.parquet", columns=["path", "age_band"])
    used = faces.merge(split[split.split.isin(["train", "val"])], on="path")
    shares = used.age_band.value_counts(normalize=True)
    return np.array([shares.get(b, 0.0) for b in AGE_BANDS])


def draw_people(truth: np.ndarray, rng: np.random.Generator, share: float = 0.5,
                design: str = "population") -> tuple[np.ndarray, np.ndarray]:
    """The reference's people (indices) and the visitors' pool (a mask), per band:
    ``population``: the held-out people are the population; the reference is ``share``
    of each band's count drawn from them with replacement (an iid sample, as a user's
    labelled people are), the pool is everyone. ``halves``: each band cut in two random
    halves; ``share`` of the people (at most half) from the first are the reference, the
    second is the pool (stricter: 500 visitors of a skewed shop reuse the pool's few
    people of a band, whose quirks the reference does not share)."""
    reference, pool = [], np.zeros(len(truth), bool)
    for band in np.unique(truth):
        people = rng.permutation(np.flatnonzero(truth == band))
        if design == "population":
            reference.append(rng.choice(people, int(len(people) * share)))
            pool[people] = True
        elif design == "split":
            cut = int(len(people) * share)
            reference.append(people[:cut])
            pool[people[cut:]] = True
        else:
            reference.append(people[: min(int(len(people) * share), len(people) // 2)])
            pool[people[len(people) // 2:]] = True
    return np.concatenate(reference), pool


def means_only(reference: dict) -> dict:
    """A soft confusion without its moments: ``kface stats`` then matches the mean
    probabilities alone (its estimator before 2026-12-05)."""
    return {**reference, "rows": {c: {k: v for k, v in row.items() if k != "moments"}
                                  for c, row in reference["rows"].items()}}


def simulate(truth: np.ndarray, probs: np.ndarray, mix: tuple[float, ...], visitors: int,
             draws: int, rng: np.random.Generator, share: float = 0.5,
             design: str = "population") -> dict:
    """Wrong-band shares (argmax, summed probabilities, mix-corrected) and the intervals'
    coverage."""
    from inference.stats import counts_with_intervals, mix_corrected_counts, soft_confusion

    wrong = {"argmax": [], "summed": [], "corrected": [], "corrected_means": [],
             "perfect_reference": []}
    inside = {"summed": [], "corrected": []}
    width = []
    for _ in range(draws):
        half, pool = draw_people(truth, rng, share, design)
        reference = soft_confusion(probs[half], truth[half], list(AGE_BANDS))
        people = [np.flatnonzero(pool & (truth == b)) for b in range(len(AGE_BANDS))]
        bands = rng.choice(len(AGE_BANDS), size=visitors, p=mix)
        chosen = np.array([rng.choice(people[b]) for b in bands])
        true = np.bincount(bands, minlength=len(AGE_BANDS))
        p = probs[chosen]
        corrected, _ = mix_corrected_counts(p, reference, rng)
        # the estimator before the moments: the reference's mean probabilities alone
        means, _ = mix_corrected_counts(p, means_only(reference), rng)
        estimate = np.array([means[b]["estimate"] for b in AGE_BANDS])
        wrong["corrected_means"].append(np.abs(estimate - true).sum() / (2 * visitors))
        # the model's own limit: a reference of the visitors' own people
        perfect, _ = mix_corrected_counts(p, soft_confusion(probs[pool], truth[pool],
                                                            list(AGE_BANDS)), rng)
        estimate = np.array([perfect[b]["estimate"] for b in AGE_BANDS])
        wrong["perfect_reference"].append(np.abs(estimate - true).sum() / (2 * visitors))
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
    # the Monte Carlo standard error of those means (over the shops)
    row |= {f"wrong_band_{k}_se": round(float(np.std(v, ddof=1) / np.sqrt(len(v))), 4)
            for k, v in wrong.items()}
    for name, hits in inside.items():
        coverage = np.mean(hits, axis=0)
        row[f"coverage_min_{name}"] = round(float(coverage.min()), 3)
        row[f"coverage_by_band_{name}"] = dict(zip(AGE_BANDS, np.round(coverage, 3).tolist(),
                                                   strict=True))
    row["corrected_interval_width"] = round(float(np.mean(width)), 1)
    return row


def main() -> None:
    from models.calibration import (
        calibration_error,
        ece_floor,
        model_calibration,
        remove_calibration,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a trained model folder")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "counts")
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--design", choices=("population", "halves", "split"),
                    default="population",
                    help="population: reference and visitors drawn from all the people; "
                         "halves: from two disjoint halves (stricter); split: each band's "
                         "people cut at random, --reference-share of them the reference, "
                         "the rest the visitors' pool")
    ap.add_argument("--people", choices=("held-out", "never-trained", "dev"),
                    default="held-out",
                    help="the people shops are made of: the held-out AAF people; or those "
                         "and the model's run's AAF validation and test people (never "
                         "trained on: all the AAF people a reference can hold); or those "
                         "run's people alone (dev: where an estimator is chosen, before "
                         "the held-out people are counted)")
    ap.add_argument("--reference-share", type=float, default=0.5,
                    help="the reference's size as a share of each band's held-out people "
                         "(at most 0.5 with --design halves)")
    ap.add_argument("--visitors", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--ece-only", action="store_true", help="the held-out people's age-band "
                    "accuracy and calibration only (no shops)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data, labels = predictions(args.model, args.work)
    truth, probs = data["band_truth"], data["band"]
    t, bias = model_calibration(labels).get("age_band", (1.0, None))
    result = {"model": str(args.model), "held_out_people": int(len(truth)),
              "age_band_accuracy": round(float((probs.argmax(1) == truth).mean()), 4),
              "age_band_temperature": t, "age_band_bias": bias,
              "age_band_ece_calibrated": round(calibration_error(probs, truth), 4),
              # what a perfectly calibrated model would show on as many people
              "age_band_ece_floor": {k: round(v, 4) for k, v in ece_floor(probs).items()},
              "age_band_ece_uncalibrated": round(calibration_error(
                  remove_calibration(probs, t, bias), truth), 4), "shops": []}
    if args.ece_only:
        print(json.dumps(result))
        return
    if args.people != "held-out":  # the run's AAF validation and test people
        run, _ = predictions(args.model, args.work, "run-val-test", run_aaf_people(
            Path(args.model).resolve().parents[2]).__contains__)
        if args.people == "dev":  # theirs alone
            truth, probs = run["band_truth"], run["band"]
        else:
            truth = np.concatenate([truth, run["band_truth"]])
            probs = np.concatenate([probs, run["band"]])
    rng = np.random.default_rng(args.seed)
    prior = run_prior(args.model)
    result["training_prior"] = [round(float(x), 3) for x in prior]
    disjoint = args.design in ("halves", "split")
    share = args.reference_share
    reference, pool = draw_people(truth, np.random.default_rng(), share, args.design)
    result["design"], result["people"] = args.design, args.people
    result["reference_people"], result["visitor_people"] = len(reference), int(pool.sum())
    shops = {"training mix": tuple(prior), **SHOPS}
    print(f"per shop: a reference of {result['reference_people']} people and visitors "
          + (f"from the other {result['visitor_people']} (disjoint by band)" if disjoint
             else f"drawn from all {len(truth)} people (with replacement)")
          + f"; the people: {args.people}")
    print(f"{'shop':<14}{'mix 20s/30s/40s/50s':<24}{'visitors':>9}{'wrong: argmax':>15}"
          f"{'summed':>8}{'corrected, se':>15}{'means alone':>13}{'perfect ref':>13}"
          f"{'coverage: summed':>18}{'corrected':>11}{'width':>7}")
    for name, mix in shops.items():
        for visitors in args.visitors:
            row = {"shop": name, "mix": [round(m, 3) for m in mix], "visitors": visitors,
                   **simulate(truth, probs, mix, visitors, args.draws, rng, share,
                              args.design)}
            result["shops"].append(row)
            print(f"{name:<14}{'/'.join(f'{m:.2f}' for m in mix):<24}{visitors:>9}"
                  f"{row['wrong_band_argmax']:>15.1%}{row['wrong_band_summed']:>8.1%}"
                  f"{row['wrong_band_corrected']:>7.1%}+-{row['wrong_band_corrected_se']:.1%}"
                  f"{row['wrong_band_corrected_means']:>13.1%}"
                  f"{row['wrong_band_perfect_reference']:>13.1%}"
                  f"{row['coverage_min_summed']:>18.1%}"
                  f"{row['coverage_min_corrected']:>11.1%}"
                  f"{row['corrected_interval_width']:>7.1f}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
