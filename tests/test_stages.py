"""The stage table (flows/stages/, one module per row): every stage runs in a run folder
that holds only the outputs it declares it reads, seeing only its declared config
sections; the deployments, prefect.yaml and docs/stages.md agree with the table.
In-process, no Prefect."""

import shutil
from pathlib import Path

import pytest
import yaml

from core.storage import write_json_atomic
from flows.config import load_config
from flows.stages import (
    DATA_STAGES,
    PRODUCER,
    STAGE,
    STAGE_TABLE,
    STAGES,
    StageConfig,
    pipeline_status,
    stage_table_markdown,
)

REPO = Path(__file__).resolve().parents[1]


def run_stage(stage, config):
    """What the flow's wrappers do, without Prefect: the shards that need work, or the
    key, the work and the summary."""
    c = StageConfig(config, stage)
    if stage.sharded:
        plan = stage.plan(c)
        for shard in plan.todo:
            work, args = stage.shard_call(c, plan, shard)
            work(*args)
        write_json_atomic(stage.summary_file(c.folder), {"stage": stage.name})
        return
    key = stage.key(c)
    write_json_atomic(stage.summary_file(c.folder),
                      {"stage": stage.name, **stage.run(c, key), "cache_key": key})


def copy_output(name, source, target):
    """One declared input: the output (file or folder) and its producer's summary."""
    src, dst = getattr(source.folder, name), getattr(target.folder, name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    summary = STAGE[PRODUCER[name]].summary_file
    summary(target.folder).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(summary(source.folder), summary(target.folder))


def test_each_stage_runs_with_only_its_declared_inputs(kface_tree, tmp_path):
    def config(out):
        return load_config(None, {
            "data.root": str(kface_tree), "data.metadata": str(kface_tree / "KFace_metadata.csv"),
            "out": str(out), "crops.size": 48, "model.backbone": "small_cnn",
            "train.epochs": 1})

    full = config(tmp_path / "full")
    for stage in STAGE_TABLE:
        run_stage(stage, full)
    assert {r.state for r in pipeline_status(full)} == {"done"}
    # the reuse decision the flow makes before any worker: nothing to do, then a detector
    # setting makes every detection shard work and everything after it stale
    detect = STAGE["detect"]
    assert detect.plan(StageConfig(full, detect)).todo == []
    stricter = full.model_copy(update={"detector": full.detector.model_copy(
        update={"confidence": 0.95})})
    plan = detect.plan(StageConfig(stricter, detect))
    assert plan.todo == plan.shards and len(plan.shards) == 20
    states = {r.stage: r.state for r in pipeline_status(stricter)}
    assert states == {"select": "done", **dict.fromkeys(STAGES[1:], "stale")}
    for stage in STAGE_TABLE:
        alone = config(tmp_path / stage.name)
        for name in stage.reads:
            copy_output(name, full, alone)
        run_stage(stage, alone)
        assert stage.output(alone.folder).exists(), stage.name
        if stage.sharded:  # every shard complete for its key
            assert not stage.plan(StageConfig(alone, stage)).todo, stage.name
        elif stage.name != "evaluate":  # (its key is the model's: the same model file)
            assert stage.stored_key(alone.folder) == stage.stored_key(full.folder), stage.name
        rows = {r.stage: r for r in pipeline_status(alone)}
        assert rows[stage.name].state != "missing"


def test_an_undeclared_config_section_is_an_error_naming_the_table(kface_tree):
    c = StageConfig(load_config(None, {"data.root": str(kface_tree)}), STAGE["split"])
    assert c.split.strategy == "subject"
    with pytest.raises(AttributeError, match="its row does not declare"):
        c.data  # noqa: B018


def test_the_table_is_consistent():
    assert STAGES == ["select", "detect", "merge", "split", "crops", "train", "evaluate"]
    for i, stage in enumerate(STAGE_TABLE):  # each input is written by an earlier stage
        assert all(STAGES.index(PRODUCER[name]) < i for name in stage.reads), stage.name
        assert stage.sharded == hasattr(stage, "shard_call") != hasattr(stage, "run")
        # a key reads only settings of sections the stage sees
        assert all(k.split(".")[0] in stage.sections
                   for k in getattr(stage, "key_settings", ())), stage.name
    assert len(PRODUCER) == len(STAGE_TABLE)  # one stage writes each output


def test_deployments_and_docs_follow_the_table():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["reprocess"]["parameters"]["stages"] == DATA_STAGES
    assert " -> ".join(STAGES) in by_name["full"]["description"]
    assert stage_table_markdown() in (REPO / "docs" / "stages.md").read_text()
