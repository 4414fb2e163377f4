"""``pipeline_status`` in-process on synthetic run folders (no CLI, no Prefect), and
``kface status --json``."""

import json
import os

from conftest import run_kface

from core.storage import read_cache_key, write_parquet_atomic
from flows.config import load_config
from flows.stages import STAGE, STAGES, StageConfig, pipeline_status
from tasks.select import select_images


def config(tree, out):
    return load_config(None, {"data.root": str(tree), "data.metadata":
                              str(tree / "KFace_metadata.csv"), "out": str(out)})


def test_a_new_run_folder_is_all_missing(kface_tree, tmp_path):
    rows = pipeline_status(config(kface_tree, tmp_path))
    assert [r.stage for r in rows] == list(STAGES)
    assert {r.state for r in rows} == {"missing"}


def test_a_current_manifest_is_done_and_a_changed_one_is_stale(kface_tree, tmp_path):
    cfg = config(kface_tree, tmp_path)
    manifest, report = select_images(cfg.data, cfg.selection, cfg.folder.file_hashes)
    path = cfg.folder.manifest

    def select_key(table):  # the key of a scan that found ``table``
        c = StageConfig(cfg, STAGE["select"])
        c.memo["scan"] = (table, report)
        return STAGE["select"].key(c)

    write_parquet_atomic(path, manifest, cache_key=select_key(manifest))
    states = {r.stage: r.state for r in pipeline_status(cfg)}
    assert states["select"] == "done" and states["detect"] == "missing"
    write_parquet_atomic(path, manifest.slice(1), cache_key=select_key(manifest.slice(1)))
    rows = pipeline_status(cfg)  # the dataset holds a photo the manifest lacks
    assert rows[0].state == "stale" and "changed" in rows[0].detail


def test_status_json(kface_tree, tmp_path):
    res = run_kface("status", "--data-root", str(kface_tree), "--metadata",
                    str(kface_tree / "KFace_metadata.csv"), "--out", str(tmp_path), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["out"] == str(tmp_path) and report["experiment"] == "default"
    assert [s["stage"] for s in report["stages"]] == list(STAGES)
    assert {s["state"] for s in report["stages"]} == {"missing"}


def test_status_reads_the_plans_a_run_recorded_and_sees_every_change(kface_tree, tmp_path,
                                                                      prefect_env):
    """``kface status`` at K-Face size costs the walk, a stat per photo and the shard
    files' metadata: the select stage compares the walk's names and the photos' stats
    with the manifest's scan, and the sharded stages take their shards' keys from the
    index the last run wrote (``stages/<stage>.plan.json``) while what a plan is made of
    is unchanged. Each shortcut must still see every change."""
    import shutil

    from tasks.select import manifest_is_current

    tree = tmp_path / "tree"
    shutil.copytree(kface_tree, tree)
    out = tmp_path / "run"
    res = run_kface("run", "--data-root", str(tree), "--metadata",
                    str(tree / "KFace_metadata.csv"), "--out", str(out), "--workers", "1",
                    "--stages", "select,detect,merge,split,crops", env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = config(tree, out)

    def states():
        return {r.stage: r.state for r in pipeline_status(cfg)}

    assert list(states().values())[:5] == ["done"] * 5
    listing = json.loads((out / "stages" / "select.json").read_text())["listing_digest"]
    assert manifest_is_current(cfg.data, cfg.selection, cfg.folder.manifest, listing)
    for name in ("detect", "crops"):  # the index holds what a full plan computes
        indexed = STAGE[name]._indexed_plan(StageConfig(cfg, STAGE[name], writing=False))
        full = STAGE[name].plan(StageConfig(cfg, STAGE[name]))
        assert indexed is not None and [s.name for s in indexed[0]] == [
            s.name for s in full.shards] and full.todo == []
        folder = STAGE[name].output(cfg.folder)
        assert indexed[1] == [read_cache_key(folder / s.filename) for s in full.shards]

    crop_files = sorted((out / "crops").glob("shard-*.parquet"))
    crop_files[0].unlink()  # a shard file gone: its stage needs work
    assert states()["crops"] == "stale"
    other = cfg.model_copy(update={"crops": cfg.crops.model_copy(update={"size": 32})})
    assert STAGE["crops"]._indexed_plan(
        StageConfig(other, STAGE["crops"], writing=False)) is None

    photo = next(p for p in sorted(tree.rglob("*.jpg")) if "S001" in p.parts)
    os.utime(photo, ns=(5, 5))  # another mtime, the same bytes
    assert not manifest_is_current(cfg.data, cfg.selection, cfg.folder.manifest, listing)
    assert states()["select"] == "stale"
    for change in ("add", "rename"):
        shutil.copytree(kface_tree, tree, dirs_exist_ok=True)  # the times put back
        assert manifest_is_current(cfg.data, cfg.selection, cfg.folder.manifest, listing)
        if change == "add":
            extra = photo.with_name("C5.jpg")
            shutil.copy(photo, extra)
        else:
            extra = photo.with_name("C9.jpg")
            photo.rename(extra)
        assert not manifest_is_current(cfg.data, cfg.selection, cfg.folder.manifest,
                                       listing), change
        extra.unlink()

    # a touched photo (another mtime, the same bytes, as a copied tree has): select is
    # stale, what the stages after it read is not, and a run recomputes only select
    shutil.copytree(kface_tree, tree, dirs_exist_ok=True)
    os.utime(photo, ns=(5, 5))
    rows = {r.stage: r for r in pipeline_status(cfg)}
    assert rows["select"].state == "stale" and "file times" in rows["select"].detail
    assert [rows[s].state for s in ("detect", "merge", "split")] == ["done"] * 3
    res = run_kface("run", "--data-root", str(tree), "--metadata",
                    str(tree / "KFace_metadata.csv"), "--out", str(out), "--workers", "1",
                    "--stages", "select,detect,merge,split,crops", env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [states()[s] for s in ("select", "detect", "merge", "split")] == [
        "done", "cached", "cached", "cached"]
    assert manifest_is_current(cfg.data, cfg.selection, cfg.folder.manifest, listing)
