import os

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from models.detector import DetectorConfig
from tasks.detect import detect_images, detect_shard, plan_shards, shard_cache_key
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
    expect = {"empty.jpg": "empty file", "truncated.jpg": "truncated",
              "text.jpg": "not a recognised image", "bomb.png": "decompression bomb",
              "broken.jpg": "not found"}
    for name, reason in expect.items():
        assert rows[name]["status"] == "error" and reason in rows[name]["error"], rows[name]
    assert rows["tiny.jpg"]["status"] in ("no_face", "error")
    if os.geteuid() != 0:  # root reads a mode-000 file; see the monkeypatched test below
        assert rows["locked.jpg"]["status"] == "error"


def test_permission_denied_is_reported(monkeypatch, bad_inputs):
    import tasks.images

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tasks.images.Image, "open", deny)
    row = detect_images(bad_inputs, ["good.jpg"], DetectorConfig()).to_pylist()[0]
    assert row["status"] == "error" and row["error"] == "permission denied"


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
    shards = plan_shards(manifest, 8)
    assert [len(s.paths) for s in shards] == [8] * (manifest.num_rows // 8) + (
        [manifest.num_rows % 8] if manifest.num_rows % 8 else [])
    cfg = DetectorConfig()
    first = detect_shard(kface_tree, shards[1], cfg, tmp_path)
    assert not first["reused"] and (tmp_path / "shard-00001.parquet").exists()
    mtime = (tmp_path / "shard-00001.parquet").stat().st_mtime_ns
    again = detect_shard(kface_tree, shards[1], cfg, tmp_path)
    assert again["reused"] and again["status_counts"] == first["status_counts"]
    assert (tmp_path / "shard-00001.parquet").stat().st_mtime_ns == mtime
    # the key changes with the threshold, and with one image's mtime, and only for its shard
    assert shard_cache_key(shards[1], cfg) != shard_cache_key(
        shards[1], DetectorConfig(confidence=0.8))
    photo = kface_tree / shards[1].paths[0]
    before = photo.stat()
    os.utime(photo, ns=(1, 1))
    try:
        touched = plan_shards(select_images(DataConfig(root=kface_tree), SelectionConfig())[0],
                              8)
    finally:  # the tree is shared by other tests
        os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = [a.index for a, b in zip(shards, touched, strict=True)
               if shard_cache_key(a, cfg) != shard_cache_key(b, cfg)]
    assert changed == [1]
    table = pq.read_table(tmp_path / "shard-00001.parquet")
    assert table.num_rows == len(shards[1].paths)
    assert not list(tmp_path.glob(".*.tmp"))
