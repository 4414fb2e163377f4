"""Visitors counted once? A generated shop clip with known visits, through ``kface video``.

The clip (640x480, 10 fps, about two minutes) shows ``--people`` held-out All-Age-Faces
people (``aaf_quality.held_out``: never trained or tuned on), up to three in view at a
time, walking in three lanes. ``--returners`` of them leave and come back 3-8 s later,
often in another lane. ``--passers`` more people pass by for 0.3 s (not visitors: under
the 0.5 s minimum). Faces are missed in ``--miss-rate`` of the frames (a turned head). The
truth is one visitor per person, with that person's labelled age band and gender.

The same clip goes through ``inference.video.analyze_video`` (what ``kface video --stats``
runs) three ways. First, the defaults: re-identification of returns within 10 s, a
0.5 s minimum and a 1 s gap. Second, the defaults without re-identification
(``--return-seconds 0``). Third, the behaviour before visitors existed: every track
counted, a 15-frame gap, no re-identification.

Printed for each: the visitors counted against the truth, and the age-band shares' error
(half the summed absolute differences of the shares). The shares are computed two ways:
counting each visitor by their most likely band, and summing their probabilities.
``python bench/bench_visitors.py --model bench/out/aaf-quality/run-utk/experiments/default/model``
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

from core.labels import AGE_BANDS, age_to_band  # noqa: E402
from tasks.sample_data import Visit  # noqa: E402

AAF = SHARED / "faces" / "aaf"


def schedule(people: list[str], returners: int, passers: list[str],
             rng: np.random.Generator) -> list[Visit]:
    """Visits in three lanes: each person 5-9 s after a 1-2.5 s gap in the lane free
    first; the first ``returners`` people come back 3-8 s after leaving (the next lane
    free by then); a passer-by fills the middle of a lane gap of 2 s or more."""
    free = [0.0, 0.0, 0.0]
    visits: list[Visit] = []
    returns: list[tuple[float, str]] = []  # (earliest start, person)
    for i, person in enumerate(people):
        while returns and returns[0][0] <= min(free) + 2.5:
            due, back = returns.pop(0)
            lane = int(np.argmin(free))
            start = max(due, free[lane] + 1.0)
            visits.append(Visit(back, start, start + rng.uniform(3, 6), lane))
            free[lane] = visits[-1].end_s
        lane = int(np.argmin(free))
        start = free[lane] + rng.uniform(1.0, 2.5)
        visits.append(Visit(person, start, start + rng.uniform(5, 9), lane))
        free[lane] = visits[-1].end_s
        if i < returners:
            returns.append((visits[-1].end_s + rng.uniform(3, 5), person))
            returns.sort()
    for due, back in returns:
        lane = int(np.argmin(free))
        start = max(due, free[lane] + 1.0)
        visits.append(Visit(back, start, start + rng.uniform(3, 6), lane))
        free[lane] = visits[-1].end_s
    by_lane = sorted(visits, key=lambda v: (v.lane, v.start_s))
    gaps = [(a.end_s, b.start_s, a.lane) for a, b in zip(by_lane, by_lane[1:], strict=False)
            if a.lane == b.lane and b.start_s - a.end_s >= 2.0]
    for passer, (end, start, lane) in zip(passers, rng.permutation(gaps), strict=False):
        middle = (float(end) + float(start)) / 2
        visits.append(Visit(passer, middle - 0.15, middle + 0.15, int(lane)))
    return visits


def band_share_error(shares: np.ndarray, truth: np.ndarray) -> float:
    return round(float(np.abs(shares / shares.sum() - truth / truth.sum()).sum() / 2), 4)


def main() -> None:
    from inference.video import analyze_video
    from models.analyzer import FaceAnalyzer
    from tasks.sample_data import write_visit_clip

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--people", type=int, default=30)
    ap.add_argument("--returners", type=int, default=6)
    ap.add_argument("--passers", type=int, default=4)
    ap.add_argument("--miss-rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "visitors")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    labels = pd.read_csv(AAF / "labels.csv")
    labels = labels[labels.file.map(held_out)].sample(
        args.people + args.passers, random_state=args.seed).reset_index(drop=True)
    people, passers = labels.file[:args.people].tolist(), labels.file[args.people:].tolist()
    visits = schedule(people, args.returners, passers, rng)
    args.work.mkdir(parents=True, exist_ok=True)
    clip = args.work / f"shop-{args.seed}.mp4"
    frames = write_visit_clip(AAF, visits, clip, miss_rate=args.miss_rate, seed=args.seed)
    truth = labels[:args.people]
    true_bands = np.bincount(truth.age.map(age_to_band).map(AGE_BANDS.index),
                             minlength=len(AGE_BANDS))
    analyzer = FaceAnalyzer(args.model)
    result = {"model": str(args.model), "clip": str(clip), "seconds": frames / 10,
              "people": args.people, "returners": args.returners, "passers_by": args.passers,
              "miss_rate": args.miss_rate, "true_visitors": args.people,
              "true_age_bands": dict(zip(AGE_BANDS, true_bands.tolist(), strict=True)),
              "ways": {}}
    ways = {"defaults (re-identification within 10 s)": {},
            "without re-identification": {"return_seconds": 0},
            "before visitors (every track, 15-frame gap)": {
                "return_seconds": 0, "min_seconds": 0, "gap_seconds": 1.5}}
    print(f"{'counting':<46}{'visitors':>9}{'truth':>7}{'off':>7}"
          f"{'band shares off (argmax)':>26}{'(summed probabilities)':>24}")
    for name, settings in ways.items():
        out = args.work / name.split(" ")[0]
        summary = analyze_video(analyzer, str(clip), out, stats=True, **settings)
        rows = [json.loads(x) for x in (out / "tracks.jsonl").open()]
        counted = [r for r in rows if r["counted"]]
        argmax = np.bincount([AGE_BANDS.index(r["age_band"]) for r in counted],
                             minlength=len(AGE_BANDS)).astype(float)
        summed = np.sum([[r["age_band_probs"][b] for b in AGE_BANDS] for r in counted], 0)
        row = {"visitors": summary["visitors"], "tracks": summary["tracks"],
               "visitors_off": round(summary["visitors"] / args.people - 1, 4),
               "band_shares_off_argmax": band_share_error(argmax, true_bands),
               "band_shares_off_summed": band_share_error(summed, true_bands)}
        result["ways"][name] = row
        print(f"{name:<46}{row['visitors']:>9}{args.people:>7}{row['visitors_off']:>+7.0%}"
              f"{row['band_shares_off_argmax']:>26.1%}{row['band_shares_off_summed']:>24.1%}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
