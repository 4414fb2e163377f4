"""Where a K-Face training should start: ImageNet weights, the face backbone alone, or the
model that ships with kface (``model.init: default``), on a K-Face-layout sample.

The sample (``kface sample-data``: 120 subjects, 8 selected 864x576 photos each, bands
and genders only, as K-Face's metadata gives) is built from AAF people outside the
held-out fifth; each start trains on it with ``kface run`` (the same split), and each
model is scored on the held-out AAF people (``aaf_quality.holdout_scores``: people none of
the starts trained on, the shipped model included) and on the sample's own test split.

``python bench/kface_start.py [--subjects 120]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from aaf_quality import SHARED, WEIGHTS, dev_folder, holdout_scores  # noqa: E402

STARTS = {  # experiment: (config, settings)
    "imagenet": ("aaf-mobilenet.yaml", [f"model.weights={WEIGHTS['mobilenet']}"]),
    "face-backbone": ("aaf-pretrained.yaml", [f"model.weights={WEIGHTS['mobilefacenet']}"]),
    "shipped-model": ("aaf-pretrained.yaml", [f"model.weights={WEIGHTS['mobilefacenet']}",
                                              "model.init=default"]),
}


def kface(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, text=True,
                         capture_output=True,
                         env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    if res.returncode:
        raise SystemExit(f"kface {' '.join(args[:2])} failed:\n{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=120)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "kface-start")
    args = ap.parse_args()
    sample = args.work / "sample"
    kface("sample-data", "--faces", str(dev_folder(args.work, False)), "--out", str(sample),
          "--subjects", str(args.subjects))
    out = args.work / "run"
    results = {}
    for name, (config, settings) in STARTS.items():
        sets = [x for s in settings for x in ("--set", s)]
        kface("run", "-c", str(REPO / "configs" / config), "--layout", "kface",
              "--data-root", str(sample), "--metadata", str(sample / "KFace_metadata.csv"),
              "--out", str(out / name), "--experiment", name, *sets)
        exp = out / name / "experiments" / name
        train = json.loads((exp / "stages" / "train.json").read_text())
        evaluate = json.loads((exp / "stages" / "evaluate.json").read_text())
        results[name] = {
            "config": config, "settings": settings, "train_faces": train["train_examples"],
            "training_minutes": round(train["seconds"] / 60, 1),
            "sample_test": {k: round(v, 4) for k, v in evaluate.items()
                            if k.startswith("test_") and isinstance(v, float)},
            "held_out": holdout_scores(out / name, name)}
        print(json.dumps({name: results[name]}), flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"shared": str(SHARED), "sample": str(sample)}))


if __name__ == "__main__":
    main()
