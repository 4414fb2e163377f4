"""Does the aspect-kept detector input change what the model learns? Same recipe, same
people, crops from the two detector inputs.

``python bench/compare_fast_path.py [--subjects 4800]`` (about 30 min on 2 cores)

Builds a K-Face-layout tree from the AAF photos (one 864x576 photo per subject, labels in
the CP949 metadata CSV), then runs the whole pipeline twice with the documented CPU
recipe (``configs/aaf-pretrained.yaml``, MobileNet v1 0.25 from the shared weights):
once with the default aspect-kept 300x204 input, once with ``detector.input_aspect:
square`` (the original's 300x300). The tree keeps only the subjects whose face both
inputs find, so both runs split the same people the same way; each model is scored on
its own crops of the same held-out people. Prints both models' validation accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tasks.sample_data import build_kface_tree  # noqa: E402

SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"


def run_pipeline(tree: Path, out: Path, aspect: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli", "run", "-c",
                    str(REPO / "configs" / "aaf-pretrained.yaml"), "--data-root", str(tree),
                    "--metadata", str(tree / "KFace_metadata.csv"), "--out", str(out),
                    "--set", "data.layout=kface", "--set", f"model.weights={WEIGHTS}",
                    "--set", f"detector.input_aspect={aspect}"], check=True, cwd=REPO,
                   env={**os.environ, "PREFECT_API_URL": ""})
    return time.perf_counter() - start


def keep_common_subjects(subjects, tree: Path) -> None:
    """Delete the subjects whose face one of the two inputs misses (and their labels)."""
    import shutil

    from models.detector import DetectorConfig
    from tasks.detect import detect_images
    from tasks.sample_data import write_metadata_csv

    paths = sorted(str(p.relative_to(tree)) for p in tree.rglob("*.jpg"))
    found = []
    for aspect in ("keep", "square"):
        table = detect_images(tree, paths, DetectorConfig(input_aspect=aspect)).to_pylist()
        found.append({r["path"].split("/")[1] for r in table if r["status"] == "ok"})
    both = found[0] & found[1]
    for sid in set(subjects.subject_id) - both:
        shutil.rmtree(tree / "High_Resolution" / sid)
    kept = subjects[subjects.subject_id.isin(both)]
    write_metadata_csv(tree / "KFace_metadata.csv",
                       list(zip(kept.subject_id, kept.age_band, kept.gender, strict=True)))
    print(json.dumps({"subjects": len(subjects), "found_keep": len(found[0]),
                      "found_square": len(found[1]), "kept": len(both)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=4800)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "fast-path")
    args = ap.parse_args()
    tree = args.work / "tree"
    if not (tree / "KFace_metadata.csv").exists():
        keep_common_subjects(build_kface_tree(SHARED / "faces" / "aaf", tree, args.subjects),
                             tree)
    outs = {aspect: args.work / f"run-{aspect}" for aspect in ("keep", "square")}
    seconds = {aspect: run_pipeline(tree, out, aspect) for aspect, out in outs.items()}

    from models.classifier import load_classifier
    from tasks.crop_stream import load_index
    from tasks.evaluate import predict_frame

    crop_sets = {a: load_index(sorted((o / "crops").glob("shard-*.parquet")),
                               o / "faces.parquet", o / "split.parquet")
                 for a, o in outs.items()}
    examples = {a: c.splits for a, c in crop_sets.items()}
    common = set.intersection(*(set(e["val"].subject_id) for e in examples.values()))
    result = {"subjects": args.subjects, "held_out_people": len(common),
              "same_split": all(set(e["val"].subject_id) == common
                                for e in examples.values())}
    for aspect, out in outs.items():
        val = examples[aspect]["val"]
        val = val[val.subject_id.isin(common)].reset_index(drop=True)
        model_dir = out / "experiments" / "default" / "model"
        labels = json.loads((model_dir / "labels.json").read_text())
        probs = predict_frame(load_classifier(model_dir / "model.keras"), val,
                              crop_sets[aspect].files, int(labels["input_size"]))
        faces = sum(len(e) for e in examples[aspect].values())
        result[aspect] = {
            "faces_found": faces, "pipeline_seconds": round(seconds[aspect]),
            "gender_accuracy": round(float(np.mean(
                probs["gender"].argmax(1) == val.gender_idx.to_numpy())), 4),
            "age_band_accuracy": round(float(np.mean(
                probs["age_band"].argmax(1) == val.age_idx.to_numpy())), 4)}
        print(json.dumps({aspect: result[aspect]}), flush=True)
    result["difference_keep_minus_square"] = {
        k: round(result["keep"][k] - result["square"][k], 4)
        for k in ("gender_accuracy", "age_band_accuracy")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
