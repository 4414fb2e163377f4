"""Rebuild the model that ships with kface (``models/data/default/``) from ../shared.

``python bench/build_default_model.py [--seed 777] [--experiment shipped]``:

1. trains the quality recipe (``configs/aaf-pretrained.yaml``) on the four shared
   labelled folders, the AAF people held out from everything left out
   (``bench/aaf_quality.py --folders``: about 20 minutes on 2 CPU cores, the data
   stages included), and scores it on those held-out people;
2. exports it to ONNX (``kface export --format onnx``: checked against Keras);
3. runs ``kface evaluate`` on the held-out people (a labelled folder of links): their
   report, the card's figures; and on every AAF person the model never trained on (the
   held-out ones and the run's AAF validation and test people, 2,077): their
   ``soft_confusion.json``, the reference with which ``kface stats`` corrects counts for
   a shop's mix out of the box (the larger, the less its own noise weighs:
   ``bench/bench_counts.py --people never-trained``);
4. copies ``model.keras``, ``model.onnx``, ``labels.json`` (with a ``card``: name, data,
   held-out scores) and ``soft_confusion.json`` into ``models/data/default/`` and prints
   the sizes (kept under 10 MB).

With ``--experiment`` naming a trained experiment of that run folder, step 1 reuses it.
``--reference-only`` rewrites the shipped ``soft_confusion.json`` alone (step 3's second
evaluate, with this kface's reference format), leaving the model files as they are: the
shipped model must be that experiment's.
docs/model.md is the model card; its figures come from this script's output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
TARGET = REPO / "models" / "data" / "default"
WORK = REPO / "bench" / "out" / "aaf-quality"
SIZE_LIMIT = 10 * 2 ** 20


def kface(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO,
                         capture_output=True, text=True,
                         env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    if res.returncode:
        raise SystemExit(f"kface {' '.join(args)} failed:\n{res.stderr[-3000:]}")


def write_reference(model: Path, run: Path, name: str) -> None:
    """``kface evaluate`` on every AAF person ``model`` never trained on (the held-out
    ones and the run's AAF validation and test people): its ``soft_confusion.json``,
    named ``name``, becomes the shipped reference."""
    from aaf_quality import aaf_links, held_out, run_aaf_people

    never_trained = run_aaf_people(run)
    reference = WORK / "shipped-reference"
    kface("evaluate", "--model", str(model), "--data-root",
          str(aaf_links(WORK / "never-trained",
                        lambda file: held_out(file) or file in never_trained)),
          "--out", str(reference))
    confusion = json.loads((reference / "soft_confusion.json").read_text())
    confusion["model"]["name"] = name  # (the build folder's path means nothing later)
    TARGET.mkdir(parents=True, exist_ok=True)
    (TARGET / "soft_confusion.json").write_text(json.dumps(confusion, indent=1) + "\n")


def main() -> None:
    from aaf_quality import aaf_links, held_out

    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--experiment", default="shipped")
    ap.add_argument("--name", default="kface-faces-2026-12b")
    ap.add_argument("--reference-only", action="store_true",
                    help="rewrite the shipped soft_confusion.json alone")
    args = ap.parse_args()
    run = WORK / "run-folders"
    experiment = run / "experiments" / args.experiment
    if args.reference_only:
        write_reference(TARGET, run, args.name)
        print(json.dumps({"target": str(TARGET / "soft_confusion.json"),
                          "bytes": (TARGET / "soft_confusion.json").stat().st_size}))
        return
    if not (experiment / "model" / "model.keras").is_file():
        res = subprocess.run([sys.executable, str(REPO / "bench" / "aaf_quality.py"),
                              "--folders", "--experiment", args.experiment,
                              "--set", f"train.seed={args.seed}"],
                             cwd=REPO, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(res.stdout[-2000:] + res.stderr[-3000:])
        (experiment / "quality.json").write_text(res.stdout)
    if not (experiment / "quality.json").is_file():  # trained by aaf_quality.py apart
        from aaf_quality import holdout_scores

        (experiment / "quality.json").write_text(json.dumps(
            {"held_out": holdout_scores(run, args.experiment)}))
    quality = json.loads((experiment / "quality.json").read_text())
    model = experiment / "model"
    onnx = WORK / "shipped-onnx"
    kface("export", "--model", str(model), "--format", "onnx", "--out", str(onnx))
    check = WORK / "shipped-held-out"
    kface("evaluate", "--model", str(model), "--data-root",
          str(aaf_links(WORK / "held-out", held_out)),
          "--out", str(check))
    metrics = json.loads((check / "metrics.json").read_text())
    # the export's labels.json: it says that the mirror pass runs outside model.onnx
    labels = json.loads((onnx / "labels.json").read_text())
    # answers without the mirror pass: on the held-out people they score the same, at
    # half the cost (docs/model.md, "Speed"); --mirror asks for it
    labels["mirror"] = False
    train = json.loads((experiment / "stages" / "train.json").read_text())
    split = json.loads((run / "stages" / "split.json").read_text())
    held = quality["held_out"]
    labels["card"] = {
        "name": args.name,
        "summary": f"held-out AAF people: age band {held['age_band']:.2f}, gender "
                   f"{held['gender']:.2f}, MAE {held['age_mae_years']:.1f} y",
        "recipe": "configs/aaf-pretrained.yaml", "seed": args.seed,
        "training_faces": train["train_examples"], "validation_faces": train["val_examples"],
        "split_rows": split["rows"], "held_out": held,
        "licence": "derived from InsightFace's MobileFaceNet (non-commercial research) and "
                   "UTKFace (non-commercial research); AAF asks for a citation: docs/model.md",
    }
    TARGET.mkdir(parents=True, exist_ok=True)
    for old in TARGET.iterdir():
        old.unlink()
    shutil.copy(model / "model.keras", TARGET / "model.keras")
    shutil.copy(onnx / "model.onnx", TARGET / "model.onnx")
    (TARGET / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    write_reference(TARGET, run, args.name)  # the answers the shipped model gives
    sizes = {p.name: p.stat().st_size for p in sorted(TARGET.iterdir())}
    total = sum(sizes.values())
    print(json.dumps({"target": str(TARGET), "bytes": sizes, "total_mb": round(total / 2**20, 2),
                      "held_out": held, "evaluate": {
                          "gender": metrics["gender"]["accuracy"],
                          "age_band": metrics["age_band"]["accuracy"],
                          "age_mae": metrics.get("age", {}).get("mae_years")}}, indent=2))
    if total > SIZE_LIMIT:
        raise SystemExit(f"the shipped model is {total / 2**20:.1f} MB, over 10 MB")


if __name__ == "__main__":
    main()
