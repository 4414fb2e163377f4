"""Quality of a training recipe on All-Age-Faces people it never saw, with the real CLI.

A fixed fifth of ../shared/data/faces/aaf, chosen by person (sha256 of the file name,
never by looking at results), is held out: no recipe is trained or tuned on it. The rest
is what ``kface run`` prepares, splits 70/15/15 (by person, within each folder), trains
on and reports on:

* ``--folders`` (the quality recipe's data): four labelled folders in one run, AAF less
  its held-out fifth, AAF's faces aged 15-19 and 60-69, UTKFace and UTKFace's 64 px
  chips (both as face chips), with ages 15-69 kept (``data.folders``, ``data.ages``);
* ``--utkface``: one folder of the AAF photos and the UTKFace faces padded so that a
  detector finds them (the earlier recipes' data); neither: the AAF photos alone.

Then the trained model scores the held-out people: their faces detected and cut with the
run's own settings, accuracy with 95% intervals by bootstrap over people. The run's own
test people (``dev_test_aaf``) are what recipes are chosen on.

``python bench/aaf_quality.py [-c configs/aaf-pretrained.yaml] [--folders | --utkface]
[--experiment NAME] [--set key=value ...] [--dev-only]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))
WEIGHTS = {"mobilefacenet": SHARED / "weights" / "mobilefacenet",
           "mobilenet": SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"}


def held_out(name: str) -> bool:
    """The fixed held-out fifth of the AAF people (one photo each)."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5 == 0


def run_aaf_people(run: Path, splits: tuple[str, ...] = ("val", "test")) -> set[str]:
    """The AAF photos (one a person) of a ``--folders`` run folder's ``splits``: people
    its models never trained on (``val``: their calibration and best epoch were chosen
    on them; ``test``: the recipe was), none of them held out."""
    import pandas as pd

    split = pd.read_parquet(Path(run) / "split.parquet", columns=["path", "split"])
    chosen = split[split.split.isin(splits) & split.path.str.startswith("aaf/")]
    return {path.split("/", 1)[1] for path in chosen.path}


def aaf_links(folder: Path, keep) -> Path:
    """``folder``: links to the AAF photos whose file name ``keep`` accepts and their
    ``labels.csv`` (a labelled folder; one photo a person, the subject_id its name)."""
    import pandas as pd

    aaf = SHARED / "faces" / "aaf"
    labels = pd.read_csv(aaf / "labels.csv")
    labels = labels[labels.file.map(keep)]
    folder.mkdir(parents=True, exist_ok=True)
    for file in labels.file:
        if not (folder / file).exists():
            (folder / file).symlink_to(aaf / file)
    labels.assign(subject_id=labels.file.str.replace(".jpg", "")).to_csv(
        folder / "labels.csv", index=False)
    return folder


def dev_folder(work: Path, utkface: bool) -> Path:
    """Symlinks to the AAF photos not held out (+ padded UTKFace faces) and labels.csv."""
    import cv2
    import pandas as pd

    folder = work / ("dev-utk" if utkface else "dev")
    if (folder / "labels.csv").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    aaf = pd.read_csv(SHARED / "faces" / "aaf" / "labels.csv")
    aaf = aaf[~aaf.file.map(held_out)]
    for file in aaf.file:
        link = folder / file
        if not link.exists():
            link.symlink_to(SHARED / "faces" / "aaf" / file)
    rows = aaf.assign(subject_id="aaf-" + aaf.file.str.replace(".jpg", ""))
    if utkface:
        utk = pd.read_csv(SHARED / "faces" / "utkface" / "labels.csv")
        (folder / "utk").mkdir(exist_ok=True)
        for file in utk.file:
            image = cv2.imread(str(SHARED / "faces" / "utkface" / file))
            pad = image.shape[0] // 2  # tight 200 px crops: the detector needs context
            cv2.imwrite(str(folder / "utk" / file), cv2.copyMakeBorder(
                image, pad, pad, pad, pad, cv2.BORDER_REPLICATE), [cv2.IMWRITE_JPEG_QUALITY, 95])
        utk = utk.assign(file="utk/" + utk.file, subject_id="utk-" + utk.file)
        rows = pd.concat([rows, utk[["file", "age", "gender", "subject_id"]]])
    rows[["file", "age", "gender", "subject_id"]].to_csv(folder / "labels.csv", index=False)
    return folder


def quality_folders(work: Path) -> list[dict]:
    """``data.folders`` of the quality recipe: the shared labelled folders, AAF without
    its held-out fifth (a labels CSV of the others, written into ``work``)."""
    import pandas as pd

    faces = SHARED / "faces"
    work.mkdir(parents=True, exist_ok=True)
    labels = pd.read_csv(faces / "aaf" / "labels.csv")
    dev = work / "aaf-dev-labels.csv"
    labels[~labels.file.map(held_out)].to_csv(dev, index=False)
    return [{"name": "aaf", "root": str(faces / "aaf"), "labels": str(dev)},
            {"name": "aaf-more-ages", "root": str(faces / "aaf-more-ages")},
            {"name": "utkface", "root": str(faces / "utkface"), "chips": True},
            {"name": "utkface-64", "root": str(faces / "utkface-64"), "chips": True}]


def folders_overrides(work: Path) -> list[str]:
    """The ``--set`` arguments that point a run at ``quality_folders`` (ages 15-69),
    calibrated on the AAF validation people (the folder most like the people scored)."""
    import json as json_

    return ["--set", f"data.folders={json_.dumps(quality_folders(work))}",
            "--set", "data.ages=[15, 69]", "--set", "train.calibration_folder=aaf"]


def dev_test_aaf(out: Path, experiment: str) -> dict:
    """The run's own test split, AAF people only (the held-out fifth's kind of faces, but
    not held-out people): what recipes are compared and tuned on."""
    from flows.config import load_config
    from flows.stages.crops import crop_files
    from models.calibration import calibrate_heads, model_calibration
    from models.classifier import load_classifier
    from models.scoring import compute_metrics
    from tasks.crop_stream import load_index
    from tasks.evaluate import predict_frame

    cfg = load_config(out / "experiments" / experiment / "config.yaml")
    folder = cfg.folder
    crops = load_index(crop_files(cfg), folder.faces, folder.split)
    test = crops.splits["test"]
    aaf = (test.source == "aaf" if "source" in test  # several folders; one
           else test.subject_id.str.startswith("aaf-"))
    test = test[aaf].reset_index(drop=True)
    model = load_classifier(folder.model_file)
    calibration = model_calibration(json.loads((folder.model / "labels.json").read_text()))
    metrics = compute_metrics(test, calibrate_heads(  # as every inference path sees them
        predict_frame(model, test, crops.files, cfg.crops.size), calibration))
    return {"people": len(test), "gender": round(metrics["gender"]["accuracy"], 4),
            "age_band": round(metrics["age_band"]["accuracy"], 4)}


def held_out_crops(cfg):
    """The held-out AAF people detected and cut with a run's settings (``cfg``): the
    labels of those with a face, and their crops (RGB uint8)."""
    import numpy as np
    import pandas as pd

    from core.images import load_image
    from models.detector import LANDMARK_COLUMNS
    from models.face_crop import face_crop
    from tasks.detect import detect_images

    aaf_dir = SHARED / "faces" / "aaf"
    labels = pd.read_csv(aaf_dir / "labels.csv")
    labels = labels[labels.file.map(held_out)].reset_index(drop=True)
    det = detect_images(aaf_dir, labels.file.tolist(), cfg.detector).to_pandas()
    found = labels.merge(det[det.status == "ok"], left_on="file", right_on="path")
    spec = cfg.crops.spec(cfg.detector.margin)  # cut as the run's crop stage cut them
    points = found[list(LANDMARK_COLUMNS)].to_numpy(dtype=float).reshape(-1, 5, 2)
    crops = np.stack([face_crop(load_image(aaf_dir / r.file)[0],
                                (r.left, r.top, r.right, r.bottom),
                                pts if np.isfinite(pts).all() else None, spec)[0]
                      for r, pts in zip(found.itertuples(), points, strict=True)])
    return found.assign(held_out_people=len(labels)), crops


def held_out_metrics(found, probs: dict, labels: dict) -> dict:
    """Scores of a model's probabilities (its saved form: flip-averaged when its recipe
    says so; calibrated here by its ``labels``, as every inference path does) on the
    held-out people: accuracy with 95% intervals by bootstrap over people,
    within one band, macro-F1, the age MAE in years."""
    import numpy as np

    from core.labels import AGE_BANDS, AGES, GENDERS, age_to_band, expected_age
    from models.scoring import compute_metrics, subject_bootstrap

    frame = found.assign(
        subject_id=found.file, age_band=found.age.map(age_to_band),
        gender_idx=found.gender.map(GENDERS.index),
        age_idx=found.age.map(age_to_band).map(AGE_BANDS.index),
        joint_class=found.age.map(age_to_band) + "_" + found.gender)
    from models.calibration import calibrate_heads, model_calibration

    probs = calibrate_heads({h: np.asarray(p) for h, p in probs.items()},
                            model_calibration(labels))
    metrics = compute_metrics(frame, {h: probs[h] for h in ("gender", "age_band")})
    ci = subject_bootstrap(frame.subject_id.to_numpy(), {
        "gender": (frame.gender_idx.to_numpy(), probs["gender"].argmax(1), 2),
        "age_band": (frame.age_idx.to_numpy(), probs["age_band"].argmax(1), 4)})
    ages = (expected_age(probs["age"], labels.get("ages", AGES), labels.get("age_calibration"))
            if "age" in probs else None)
    people = int(found["held_out_people"].iloc[0]) if "held_out_people" in found else None
    return {"held_out_people": people, "faces_found": len(found),
            "gender": round(metrics["gender"]["accuracy"], 4),
            "gender_ci95": [round(x, 3) for x in ci["gender"]["accuracy"]],
            "age_band": round(metrics["age_band"]["accuracy"], 4),
            "age_band_ci95": [round(x, 3) for x in ci["age_band"]["accuracy"]],
            "age_band_within_one": round(metrics["age_band"]["accuracy_within_one_band"], 4),
            "age_mae_years": None if ages is None else round(float(np.mean(np.abs(
                ages - found.age.to_numpy()))), 2),
            "age_band_macro_f1": round(metrics["age_band"]["macro_f1"], 4)}


def holdout_scores(out: Path, experiment: str) -> dict:
    """Detect and crop the held-out AAF people with the run's settings; score the
    experiment's model on them (bootstrap over people)."""
    import json as json_

    from flows.config import load_config
    from models.classifier import load_classifier

    exp = out / "experiments" / experiment
    found, crops = held_out_crops(load_config(exp / "config.yaml"))
    model = load_classifier(exp / "model" / "model.keras")
    probs = model.predict(crops.astype("float32"), batch_size=64, verbose=0)
    return held_out_metrics(found, probs, json_.loads((exp / "model" / "labels.json")
                                                      .read_text()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-c", "--config", type=Path, default=REPO / "configs" / "aaf-pretrained.yaml")
    ap.add_argument("--utkface", action="store_true", help="add the padded UTKFace faces")
    ap.add_argument("--folders", action="store_true", help="the quality recipe's four "
                    "labelled folders (see the module docstring)")
    ap.add_argument("--experiment", default="default")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "aaf-quality")
    ap.add_argument("--dev-only", action="store_true", help="score a trained experiment on "
                    "the run's own AAF test people only: no training, no held-out people")
    args = ap.parse_args()
    out = args.work / ("run-folders" if args.folders else
                       "run-utk" if args.utkface else "run")
    if args.dev_only:
        print(json.dumps(dev_test_aaf(out, args.experiment)))
        return
    from flows.config import load_config

    backbone = load_config(args.config).model.backbone
    cmd = [sys.executable, "-m", "cli", "run", "-c", str(args.config), "--layout",
           "labelled", "--out", str(out), "--experiment", args.experiment,
           *(["--set", f"model.weights={WEIGHTS[backbone]}"] if backbone in WEIGHTS else [])]
    if args.folders:
        cmd += folders_overrides(args.work)
    else:
        cmd += ["--data-root", str(dev_folder(args.work, args.utkface))]
    for item in args.sets:
        cmd += ["--set", item]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    if res.returncode:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-4000:])
    exp = out / "experiments" / args.experiment
    train = json.loads((exp / "stages" / "train.json").read_text())
    evaluate = json.loads((exp / "stages" / "evaluate.json").read_text())
    result = {"config": str(args.config), "sets": args.sets, "utkface": args.utkface,
              "folders": args.folders,
              "experiment": args.experiment, "train_faces": train["train_examples"],
              "training_minutes": round(train["seconds"] / 60, 1),
              "epochs_run": train["epochs_run"], "best_epoch": train["best_epoch"],
              "dev_test": {k: round(v, 4) for k, v in evaluate.items()
                           if k.startswith("test_") and isinstance(v, float)},
              "dev_test_aaf": dev_test_aaf(out, args.experiment),
              "held_out": holdout_scores(out, args.experiment)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
