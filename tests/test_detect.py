import os
import shutil

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.sharding import HASH_BUCKETS, batch_shards, partition_name, plan_shards
from models.detector import DetectorConfig, resolve_weights
from tasks.detect import detect_images, detect_shard, shard_cache_key
from tasks.select import DataConfig, SelectionConfig, select_images


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, aaf_dir):
    """One folder with every kind of bad or unusual input, plus two good photos."""
    root = tmp_path_factory.mktemp("bad")
    face = cv2.imread(str(sorted(aaf_dir.glob("*.jpg"))[0]))
    canvas = np.full((576, 864, 3), 128, np.uint8)
    canvas[100:100 + face.shape[0], 300:300 + face.shape[1]] = face
    cv2.imwrite(str(root / "good.jpg"), canvas)
    cv2.imwrite(str(root / "good.png"), canvas)
    cv2.imwrite(str(root / "gray.jpg"), cv2.cvtColor(canvas, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(root / "deep16.png"), canvas.astype(np.uint16) * 257)
    Image.fromarray(canvas[:, :, ::-1]).convert("CMYK").save(root / "cmyk.jpg")
    (root / "empty.jpg").write_bytes(b"")
    data = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "text.jpg").write_text("not an image at all")
    cv2.imwrite(str(root / "tiny.jpg"), np.zeros((1, 1, 3), np.uint8))
    Image.new("1", (20000, 20000)).save(root / "bomb.png")  # 400 Mpx, a few KB on disk
    os.symlink(root / "missing.jpg", root / "broken.jpg")
    locked = root / "locked.jpg"
    locked.write_bytes(data)
    locked.chmod(0)
    return root


def _rows(table):
    return {r["path"]: r for r in table.to_pylist()}


def test_bad_inputs_become_rows_not_crashes(bad_inputs):
    names = sorted(p.name for p in bad_inputs.iterdir())
    rows = _rows(detect_images(bad_inputs, names, DetectorConfig()))
    assert set(rows) == set(names)
    for good in ("good.jpg", "good.png", "gray.jpg", "deep16.png", "cmyk.jpg"):
        assert rows[good]["status"] == "ok", (good, rows[good])
        assert (rows[good]["image_width"], rows[good]["image_height"]) == (864, 576)
    expect = {"empty.jpg": ("empty file", "empty"), "truncated.jpg": ("truncated", "truncated"),
              "text.jpg": ("not a recognised image", "not_image"),
              "bomb.png": ("decompression bomb", "too_large"),
              "broken.jpg": ("not found", "missing")}
    for name, (message, reason) in expect.items():  # final errors: never retried
        row = rows[name]
        assert row["status"] == "error" and message in row["error"], row
        assert row["reason"] == reason, row
    assert rows["tiny.jpg"]["status"] in ("no_face", "error")
    if os.geteuid() != 0:  # root reads a mode-000 file; see the test below
        assert rows["locked.jpg"]["status"] == "unreadable"


def test_passing_read_errors_are_retried_then_marked_unreadable(monkeypatch, bad_inputs):
    """The OS call fails (root cannot be denied a read, and EIO needs a failing disk), the
    rest is real: classification, in-task retries, the row written."""
    import errno

    import core.images

    calls = []

    def failing(first: int, error: OSError):
        def fake_open(path, *args, **kwargs):
            calls.append(path)
            if len(calls) <= first:
                raise error
            return open(path, *args, **kwargs)
        return fake_open

    eio = OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(core.images, "open", failing(2, eio), raising=False)
    row = detect_images(bad_inputs, ["good.jpg"], DetectorConfig()).to_pylist()[0]
    assert row["status"] == "ok" and len(calls) == 3  # two retries inside the task
    calls.clear()
    monkeypatch.setattr(core.images, "open", failing(3, eio), raising=False)
    row = detect_images(bad_inputs, ["good.jpg"], DetectorConfig()).to_pylist()[0]
    assert (row["status"], row["reason"]) == ("unreadable", "io") and len(calls) == 3
    assert "retried on the next run" in row["error"]
    calls.clear()
    denied = PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(core.images, "open", failing(1, denied), raising=False)
    row = detect_images(bad_inputs, ["good.jpg"], DetectorConfig()).to_pylist()[0]
    assert (row["status"], row["reason"], row["error"]) == (
        "unreadable", "permission", "permission denied") and len(calls) == 1


def test_rows_hold_best_face_and_margin(kface_tree):
    manifest, _ = select_images(DataConfig(root=kface_tree), SelectionConfig())
    paths = [p for p in manifest.column("path").to_pylist() if p.endswith(("C4.jpg", "C7.jpg"))]
    rows = detect_images(kface_tree, paths[:6], DetectorConfig()).to_pylist()
    for r in rows:
        assert r["status"] == "ok" and r["n_faces"] >= 1 and r["score"] > 0.9
        assert r["left"] <= r["x1"] < r["x2"] <= r["right"] <= 864
        assert r["top"] <= r["y1"] < r["y2"] <= r["bottom"] <= 576


def test_shard_is_reused_and_key_tracks_content(kface_tree, tmp_path):
    manifest, _ = select_images(DataConfig(root=kface_tree), SelectionConfig())
    shards = plan_shards(manifest, "kface")  # one shard per subject
    assert [s.name for s in shards] == sorted(set(manifest.column("subject_id").to_pylist()))
    assert all(p.split("/")[1] == s.name for s in shards for p in s.paths)
    assert sum(len(s.paths) for s in shards) == manifest.num_rows
    cfg = DetectorConfig()
    file = tmp_path / f"shard-{shards[1].name}.parquet"
    first = detect_shard(kface_tree, shards[1], cfg, tmp_path)
    assert not first.reused and file.exists()
    mtime = file.stat().st_mtime_ns
    again = detect_shard(kface_tree, shards[1], cfg, tmp_path)
    assert again.reused and again.status_counts == first.status_counts
    assert file.stat().st_mtime_ns == mtime
    # the key changes with the threshold, and with one image's mtime, and only for its shard
    assert shard_cache_key(shards[1], cfg) != shard_cache_key(
        shards[1], DetectorConfig(confidence=0.8))
    # ... but not with where the weights are (their sha256 stands for them)
    moved = tmp_path / "weights"
    moved.mkdir()
    model, config = resolve_weights(cfg)
    shutil.copy(model, moved / model.name)
    shutil.copy(config, moved / config.name)
    assert shard_cache_key(shards[1], cfg) == shard_cache_key(shards[1], DetectorConfig(
        model_path=moved / model.name, config_path=moved / config.name))
    photo = kface_tree / shards[1].paths[0]
    before = photo.stat()
    os.utime(photo, ns=(1, 1))
    try:
        touched = plan_shards(select_images(DataConfig(root=kface_tree), SelectionConfig())[0],
                              "kface")
    finally:  # the tree is shared by other tests
        os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = [a.name for a, b in zip(shards, touched, strict=True)
               if shard_cache_key(a, cfg) != shard_cache_key(b, cfg)]
    assert changed == [shards[1].name]
    table = pq.read_table(file)
    assert table.num_rows == len(shards[1].paths)
    assert not list(tmp_path.glob(".*.tmp"))


def test_partitions_depend_on_the_subject_only():
    assert partition_name("19062421", "kface") == "19062421"
    buckets = {partition_name(f"person-{i}", "labelled") for i in range(5000)}
    assert len(buckets) == HASH_BUCKETS and all(len(b) == 4 for b in buckets)
    assert partition_name("person-7", "labelled") == partition_name("person-7", "labelled")
    table = pa.table({"path": [f"a/{i}.jpg" for i in range(10)],
                      "subject_id": [str(i) for i in range(10)],
                      "file_size": [1] * 10, "mtime_ns": [1] * 10})
    shards = plan_shards(table, "labelled")
    grown = plan_shards(pa.concat_tables([table, pa.table({
        "path": ["a/new.jpg"], "subject_id": ["new"], "file_size": [1], "mtime_ns": [1]})]),
        "labelled")
    # adding one subject changes exactly one shard (or adds one)
    assert len({(s.name, s.paths) for s in grown} - {(s.name, s.paths) for s in shards}) == 1
    sizes = [[len(s.paths) for s in batch] for batch in batch_shards(grown, 3)]
    assert all(sum(b) >= 3 for b in sizes[:-1]) and sum(map(sum, sizes)) == 11
    assert [s for b in batch_shards(grown, 3) for s in b] == grown


def test_detector_kind_keys_and_shards_of_earlier_versions(kface_tree, tmp_path):
    """res10's key is made of the settings it had before YuNet existed (run folders keep
    their detections); YuNet's ignores res10's settings; a shard written before landmarks
    existed reads with null landmarks, and a retried row is added to it."""
    from models.detector import LANDMARK_COLUMNS, result_settings
    from tasks.detect import DETECTIONS_SCHEMA, conform

    assert set(result_settings(DetectorConfig())) == {
        "confidence", "mean", "edge_rows", "input_size", "input_aspect", "nms_threshold",
        "margin", "margin_mode", "min_decode_side", "max_pixels"}
    # ... and the models trained on box crops keep their train key (crops as before)
    from flows.config import load_config

    assert set(load_config().crops.key_settings()) == {"size", "jpeg_quality"}
    assert load_config(overrides={"crops.align": True}).crops.key_settings()["align"] is True
    yunet = DetectorConfig(kind="yunet")
    assert yunet.confidence == 0.8  # its own default, unless set
    assert DetectorConfig(kind="yunet", confidence=0.9).confidence == 0.9
    manifest, _ = select_images(DataConfig(root=kface_tree), SelectionConfig())
    shard = plan_shards(manifest, "kface")[2]
    assert shard_cache_key(shard, yunet) != shard_cache_key(shard, DetectorConfig())
    assert shard_cache_key(shard, yunet) == shard_cache_key(
        shard, DetectorConfig(kind="yunet", mean=(0, 0, 0), edge_rows="drop"))

    rows = detect_images(kface_tree, shard.paths, DetectorConfig())
    assert all(rows.column(c).null_count == rows.num_rows for c in LANDMARK_COLUMNS)
    old = rows.drop_columns(list(LANDMARK_COLUMNS))
    file = tmp_path / shard.filename
    pq.write_table(old, file)
    import pyarrow.dataset as pads

    read = pads.dataset([str(file)], schema=DETECTIONS_SCHEMA, format="parquet").to_table()
    assert read.schema == DETECTIONS_SCHEMA and read.column("eye_r_x").null_count == len(rows)
    assert conform(old).equals(rows)
