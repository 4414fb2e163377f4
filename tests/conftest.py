"""Shared fixtures: the real data folder, small K-Face trees made of real faces, and a
tiny pipeline config. ``../shared/data`` must exist in CI (tests fail, not skip)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        message = f"{path} is missing (set KFACE_SHARED_DATA to the shared data folder)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def aaf_dir(shared_data) -> Path:
    return _need(shared_data / "faces" / "aaf")


@pytest.fixture(scope="session")
def scenes_dir(shared_data) -> Path:
    return _need(shared_data / "scenes")


@pytest.fixture(scope="session")
def kface_tree(tmp_path_factory, aaf_dir) -> Path:
    """20 subjects x lights L1/L10 x cameras C4/C7 (80 photos, 40 selected by default),
    plus two bad files that fit the layout and one file that does not."""
    from tasks.sample_data import TreeSpec, build_kface_tree

    root = tmp_path_factory.mktemp("kface")
    build_kface_tree(aaf_dir, root, 20, TreeSpec(lights=("L1", "L10"), cameras=("C4", "C7")))
    folder = root / "High_Resolution" / "19062400" / "S001" / "L1" / "E01"
    (folder / "C8.jpg").write_bytes(b"")
    (folder / "C9.jpg").write_text("this is not a JPEG")
    (root / "High_Resolution" / "19062400" / "notes.txt").write_text("stray file")
    return root


def run_kface(*args: str, env: dict | None = None, timeout: int = 600
              ) -> subprocess.CompletedProcess:
    """Run the installed CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, aaf_dir):
    """300 real AAF faces through select, detect, merge, split, crops (64 px) and a
    2-epoch small_cnn training, with the stage functions (no Prefect). Returns a dict of
    the folders and tables."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from models.classifier import ModelConfig
    from models.detector import DetectorConfig
    from tasks.crops import CropConfig, crop_shard
    from tasks.detect import detect_images, plan_shards
    from tasks.labels import merge_faces
    from tasks.select import DataConfig, SelectionConfig, select_images
    from tasks.split import SplitConfig, split_faces
    from tasks.train import TrainConfig, load_examples, train_model

    work = tmp_path_factory.mktemp("tiny-run")
    root = work / "faces"
    root.mkdir()
    labels = pd.read_csv(aaf_dir / "labels.csv").sample(300, random_state=3)
    for f in labels.file:
        (root / f).symlink_to(aaf_dir / f)
    labels.to_csv(root / "labels.csv", index=False)
    manifest, _ = select_images(DataConfig(root=root, layout="labelled"), SelectionConfig())
    detections = detect_images(root, manifest.column("path").to_pylist(), DetectorConfig())
    faces, merge_report = merge_faces(manifest.to_pandas(), detections.to_pandas(), None)
    frame = faces.to_pandas()
    split, split_report = split_faces(frame, SplitConfig())
    pq.write_table(faces, work / "faces.parquet")
    pq.write_table(pa.Table.from_pandas(split, preserve_index=False), work / "split.parquet")
    boxes = frame.set_index("path")[["left", "top", "right", "bottom"]]
    for shard in plan_shards(faces, 100):
        crop_shard(root, shard, boxes.loc[list(shard.paths)].to_numpy().tolist(),
                   CropConfig(size=64), work / "crops")
    examples = load_examples(work / "crops", work / "faces.parquet", work / "split.parquet")
    result = train_model(examples, 64, ModelConfig(backbone="small_cnn"),
                         TrainConfig(epochs=2, batch_size=32), work / "model", work / "logs",
                         {"margin": 0.2, "margin_mode": "symmetric"})
    return {"root": root, "work": work, "frame": frame, "examples": examples,
            "result": result, "merge_report": merge_report, "split_report": split_report,
            "model_dir": work / "model"}
