"""Which calibration? Chosen on the run's own AAF people, never the held-out fifth.

A model trained on the four labelled folders (``bench/aaf_quality.py --folders``) is
calibrated on validation people; its age band head leans towards the mix it was trained
on (mostly UTKFace people in their 20s). This script runs the model's own inference path
(``kface evaluate``'s: YuNet, the aligned crop, the model) on the run's AAF validation
and AAF test people (the split's, not the held-out fifth), and compares on the test
people: the model's calibration as saved, a temperature fitted on the AAF validation
people, and a temperature with a bias per band fitted on them
(``models.calibration.fit_temperature_bias``). Printed: the age-band ECE, the ECE a
perfectly calibrated model shows on as many people (mean and 95th percentile), the
accuracy, and the age line's MAE when refitted on the AAF validation people.

``python bench/calibration_choice.py --model
bench/out/aaf-quality/run-folders/experiments/mfn-s2/model``
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

from aaf_quality import aaf_links  # noqa: E402


def aaf_people(run: Path, part: str, work: Path) -> Path:
    """A labelled folder of links to the run's AAF people of one split part."""
    split = pd.read_parquet(run / "split.parquet")
    files = {p.split("/", 1)[1] for p in split[(split.split == part)
                                                & split.path.str.startswith("aaf/")].path}
    return aaf_links(work / f"aaf-{part}", files.__contains__)


def main() -> None:
    from inference.evaluate_folder import folder_predictions
    from models.analyzer import FaceAnalyzer
    from models.calibration import (
        apply_temperature,
        calibration_error,
        ece_floor,
        fit_age_line,
        fit_temperature,
        fit_temperature_bias,
        remove_calibration,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a model folder of a run")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "calibration")
    args = ap.parse_args()
    run = args.model.resolve().parents[2]
    analyzer = FaceAnalyzer(args.model)
    t_saved, bias_saved = analyzer.calibration["age_band"]
    seen = {}
    for part in ("val", "test"):
        frame, probs, _ = folder_predictions(analyzer, aaf_people(run, part, args.work))
        seen[part] = (frame, remove_calibration(probs["age_band"], t_saved, bias_saved),
                      probs["age_years"])
    (val, raw_val, _), (test, raw_test, age_test) = seen["val"], seen["test"]
    t_aaf = fit_temperature(raw_val, val.age_idx)
    t_bias, bias = fit_temperature_bias(raw_val, val.age_idx)
    rows = {"as saved": apply_temperature(raw_test, t_saved, bias_saved),
            "temperature, AAF val": apply_temperature(raw_test, t_aaf),
            "temperature + bias, AAF val": apply_temperature(raw_test, t_bias, bias)}
    truth = test.age_idx.to_numpy()
    result = {"model": str(args.model), "val_people": len(val), "test_people": len(test),
              "saved": {"temperature": t_saved, "bias": bias_saved},
              "fitted": {"temperature": t_aaf, "temperature_bias": [t_bias, bias]}}
    print(f"{len(test)} AAF test people of the run (validation: {len(val)})")
    print(f"{'age band calibration':<30}{'ECE':>7}{'calibrated (p95)':>20}{'accuracy':>10}")
    for name, p in rows.items():
        floor = ece_floor(p)
        result[name] = {"ece": round(calibration_error(p, truth), 4),
                        "ece_floor": round(floor["mean"], 4),
                        "ece_floor_p95": round(floor["p95"], 4),
                        "accuracy": round(float((p.argmax(1) == truth).mean()), 4)}
        r = result[name]
        print(f"{name:<30}{r['ece']:>7.3f}{r['ece_floor']:>11.3f} ({r['ece_floor_p95']:.3f})"
              f"{r['accuracy']:>10.3f}")
    line = fit_age_line(seen["val"][2], val.age)
    result["age_mae_test"] = {
        "as saved": round(float(np.abs(age_test - test.age).mean()), 3),
        "line refitted on AAF val": round(float(np.abs(
            line["slope"] * age_test + line["intercept"] - test.age).mean()), 3)}
    print(f"age MAE: {result['age_mae_test']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
