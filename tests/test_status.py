"""``pipeline_status`` in-process on synthetic run folders (no CLI, no Prefect), and
``kface status --json``."""

import json

from conftest import run_kface

from core.storage import write_parquet_atomic
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
