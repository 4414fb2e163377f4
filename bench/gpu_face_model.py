"""The face model fully fine-tuned on a GPU: MobileFaceNet, every layer trained, on the
quality recipe's 21,936 faces (AAF less its held-out fifth, AAF aged 15-19 and 60-69,
UTKFace and UTKFace's 64 px chips), with the real ``train_model`` on the JAX backend.

GPU machines here have JAX but no TensorFlow and no package registry, and a device run
carries at most 64 MiB, so:

1. Here: ``python bench/gpu_face_model.py prepare --run bench/out/fq/run`` writes
   ``bench/out/gpu/``: ``faces.parquet`` (every face of that run's crop cache, the
   112 px aligned crop re-encoded as WebP quality 90, ~2 KB a face, with its labels,
   source and split), ``held_out.parquet`` (the held-out AAF fifth, detected and aligned
   with the run's settings, as WebP) and ``mobilefacenet/`` (the shared weights).
2. There (``bench/gpu_session.sh``): ``build`` turns ``faces.parquet`` back into a crop
   cache (JPEG quality 95, as the crops stage writes), then ``train --lr L --seed S``
   runs one training and scores it on the run's own test people (``dev.json``); the
   learning rate is chosen on those, and only then does ``score`` score the chosen
   models on the held-out people.

The recipe was fixed before any of it ran: the quality recipe's head, augmentation and
exact-age head (ages 15-69), every layer trained (BatchNormalization frozen, as with
every pretrained backbone here), batch 128, Adam with cosine decay, 12 epochs, two
learning rates (1e-3, 2e-4) x three seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
GPU = REPO / "bench" / "out" / "gpu"
RECIPE = {"epochs": 12, "batch_size": 128, "learning_rate": 1e-3, "lr_schedule": "cosine",
          "early_stopping_patience": 0,
          "augment": {"rotation": 0.08, "zoom": 0.15, "brightness": 0.2}}
MODEL = {"backbone": "mobilefacenet", "exact_age": True, "flip_average": True,
         "dropout": 0.3, "bn_momentum": 0.9}


def _webp(rgb) -> bytes:
    import cv2

    return cv2.imencode(".webp", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_WEBP_QUALITY, 90])[1].tobytes()


def prepare(run: Path) -> None:
    """Write ``bench/out/gpu/{faces,held_out}.parquet`` and the weights (see above)."""
    import cv2
    import numpy as np
    import pandas as pd
    from aaf_quality import SHARED, held_out_crops

    from flows.config import load_config
    from flows.stages.crops import crop_files
    from tasks.crop_stream import crop_jpegs, load_index

    cfg = load_config(run / "config.yaml")
    crops = load_index(crop_files(cfg), cfg.folder.faces, cfg.folder.split)
    frames = [crops.splits[s].assign(split=s) for s in ("train", "val", "test")]
    index = pd.concat(frames, ignore_index=True)
    images = [_webp(cv2.cvtColor(cv2.imdecode(np.frombuffer(j, np.uint8), 1),
                                 cv2.COLOR_BGR2RGB)) for j in crop_jpegs(index, crops.files)]
    GPU.mkdir(parents=True, exist_ok=True)
    index.assign(image=images)[["path", "source", "subject_id", "split", "age", "age_band",
                                "gender", "joint_class", "image"]].to_parquet(
        GPU / "faces.parquet")
    found, faces = held_out_crops(cfg)
    found[["file", "age", "gender", "held_out_people"]].assign(
        image=[_webp(f) for f in faces]).to_parquet(
        GPU / "held_out.parquet")
    weights = GPU / "mobilefacenet"
    weights.mkdir(exist_ok=True)
    for name in ("model-y1-test2-symbol.json", "model-y1-test2-0000.params"):
        shutil.copy(SHARED / "weights" / "mobilefacenet" / name, weights / name)
    total = sum(p.stat().st_size for p in GPU.rglob("*") if p.is_file())
    print(json.dumps({"faces": len(index), "held_out": len(found),
                      "mb": round(total / 2 ** 20, 1)}))


def build(cache: Path) -> None:
    """The crop cache (crop shards, faces.parquet, split.parquet) from ``faces.parquet``."""
    import cv2
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from core.sharding import plan_shards
    from core.storage import write_parquet_atomic
    from tasks.crops import CHUNK_ROWS, CROPS_SCHEMA

    faces = pd.read_parquet(GPU / "faces.parquet")
    cache.mkdir(parents=True, exist_ok=True)
    jpegs = {p: cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(b, np.uint8), 1),
                             [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
             for p, b in zip(faces.path, faces.image, strict=True)}
    table = pa.table({"path": faces.path, "subject_id": faces.subject_id,
                      "file_size": np.zeros(len(faces), np.int64),
                      "mtime_ns": np.zeros(len(faces), np.int64)})
    for shard in plan_shards(table, "labelled"):
        write_parquet_atomic(cache / "crops" / shard.filename, pa.table(
            {"path": list(shard.paths), "image": [jpegs[p] for p in shard.paths],
             "error": [None] * len(shard.paths)}, schema=CROPS_SCHEMA),
            row_group_size=CHUNK_ROWS, digest=False)
    faces.drop(columns=["image", "split"]).to_parquet(cache / "faces.parquet")
    faces[["path", "split"]].to_parquet(cache / "split.parquet")


def _index(cache: Path):
    from tasks.crop_stream import load_index

    return load_index(sorted((cache / "crops").glob("shard-*.parquet")),
                      cache / "faces.parquet", cache / "split.parquet")


def train(cache: Path, lr: float, seed: int, out: Path, workers: int,
          smoke: dict | None = None) -> dict:
    """One training of the recipe; its scores on the run's own test people."""
    import numpy as np

    from core.labels import expected_age
    from models.classifier import ModelConfig, load_classifier
    from models.scoring import compute_metrics
    from tasks.evaluate import predict_frame
    from tasks.train import TrainConfig, train_model

    crops = _index(cache)
    model_cfg = ModelConfig(**MODEL, weights=str(GPU / "mobilefacenet"))
    cfg = TrainConfig(**{**RECIPE, "learning_rate": lr, "seed": seed, "workers": workers,
                         **(smoke or {})})
    start = time.perf_counter()
    result = train_model(crops, 112, model_cfg, cfg, out / "model", out / "logs",
                         {"margin": 0.2, "margin_mode": "symmetric", "detector": "yunet",
                          "align": True})
    seconds = time.perf_counter() - start
    test = crops.splits["test"]
    probs = predict_frame(load_classifier(out / "model" / "model.keras"), test, crops.files,
                          112)
    labels = json.loads((out / "model" / "labels.json").read_text())
    years = expected_age(probs["age"], labels["ages"], labels.get("age_calibration"))
    scores = {}
    for name, rows in (("all", np.ones(len(test), bool)),
                       ("aaf", test.path.str.startswith("aaf/").to_numpy())):
        metrics = compute_metrics(test[rows].reset_index(drop=True),
                                  {h: probs[h][rows] for h in ("gender", "age_band")})
        scores[name] = {"people": int(rows.sum()),
                        "gender": round(metrics["gender"]["accuracy"], 4),
                        "age_band": round(metrics["age_band"]["accuracy"], 4),
                        "mae_years": round(float(np.abs(years[rows] - test.age[rows]).mean()),
                                           2)}
    dev = {"lr": lr, "seed": seed, "train_minutes": round(seconds / 60, 2),
           "epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
           "last_epoch_train_images_per_s": result["last_epoch_train_images_per_s"],
           "dev_test": scores}
    (out / "dev.json").write_text(json.dumps(dev))
    return dev


def score(model_dir: Path) -> dict:
    """The held-out AAF people: accuracy with 95% intervals by person, age MAE."""
    import cv2
    import numpy as np
    import pandas as pd
    from aaf_quality import held_out_metrics

    from models.classifier import load_classifier

    held = pd.read_parquet(GPU / "held_out.parquet")
    faces = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), 1),
                                   cv2.COLOR_BGR2RGB) for b in held.image])
    labels = json.loads((model_dir / "labels.json").read_text())
    model = load_classifier(model_dir / "model.keras")
    probs = {h: np.asarray(p) for h, p in model.predict(faces, batch_size=256,
                                                        verbose=0).items()}
    return held_out_metrics(held, probs, labels)


def choose(runs: list[Path], log: Path) -> float:
    """The learning rate whose runs score best on the run's own AAF test people (mean over
    its seeds); then, and only for it, the held-out scores. Everything goes to ``log``,
    with each chosen model's labels.json (its calibration) for the record."""
    import statistics

    dev = [json.loads((r / "dev.json").read_text()) for r in runs if (r / "dev.json").exists()]
    by_lr: dict[float, list[dict]] = {}
    for d in dev:
        by_lr.setdefault(d["lr"], []).append(d)
    mean = {lr: statistics.mean(d["dev_test"]["aaf"]["age_band"] for d in ds)
            for lr, ds in by_lr.items()}
    lr = max(mean, key=mean.get)
    chosen = [r for r in runs if (r / "dev.json").exists()
              and json.loads((r / "dev.json").read_text())["lr"] == lr]
    held = {r.name: score(r / "model") for r in chosen}
    labels = {r.name: json.loads((r / "model" / "labels.json").read_text()) for r in chosen}
    log.write_text(json.dumps({"recipe": RECIPE, "model": MODEL, "dev": dev,
                               "dev_mean_aaf_age_band_by_lr": mean, "chosen_lr": lr,
                               "held_out": held, "labels": labels}, indent=2) + "\n")
    return lr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prepare", "build", "train", "score", "choose"])
    ap.add_argument("--run", type=Path, default=REPO / "bench" / "out" / "fq" / "run")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/face-cache"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--out", type=Path, default=Path("/tmp/face-model"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=Path, nargs="*", default=[])
    ap.add_argument("--log", type=Path, default=GPU / "face-model.log")
    ap.add_argument("--smoke", type=int, default=0, help="a trial of this many steps "
                    "(2 epochs) instead of the recipe's epochs")
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.run)
    elif args.step == "build":
        build(args.cache)
    elif args.step == "train":
        smoke = {"epochs": 2, "steps_per_epoch": args.smoke} if args.smoke else None
        print(json.dumps(train(args.cache, args.lr, args.seed, args.out, args.workers,
                               smoke)))
    elif args.step == "score":
        print(json.dumps(score(args.out / "model")))
    else:
        print(json.dumps({"chosen_lr": choose(args.runs, args.log)}))


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")
    main()
