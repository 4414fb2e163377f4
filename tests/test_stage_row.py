"""A stage is one module, its row plus its work function: toy stages registered from
outside (single-output and sharded: a row and a function, nothing else) run in a real
``kface run`` (Prefect), resume after a kill, are cached on the next run, show in
``kface status``, the deployments and the stage table's docs; and no stage name is
spelled outside the stages' modules (the machinery holds none)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
from conftest import REPO, kill_when_written

TOY = '''
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.sharding import ShardResult, holds_key, plan_shards
from core.storage import fingerprint, write_parquet_atomic
from flows.stages import STAGE, ShardedStage, Stage, register_stage


def photos_per_subject(manifest: pa.Table, seed: int) -> pa.Table:
    """The single-output work: each subject's photo count, the subjects in a seeded
    random order."""
    counts = manifest.group_by("subject_id").aggregate([("path", "count")])
    order = np.random.default_rng(seed).permutation(counts.num_rows)
    return counts.take(pa.array(order))


def run(c, key):
    manifest = pq.read_table(c.folder.manifest)
    table = photos_per_subject(manifest, c.split.seed)
    write_parquet_atomic(STAGE["subjects"].output(c.folder), table, key)
    return {"rows_in": manifest.num_rows, "rows_out": table.num_rows}


def photo_bytes(root, shard, final, key):
    """The sharded work, in a worker: each photo's first bytes summed, one shard's file
    (slow when the test asks, so that it can kill a run halfway)."""
    time.sleep(float(os.environ.get("TOY_PAUSE", "0")))
    sums = [sum((root / p).read_bytes()[:64]) for p in shard.paths]
    table = pa.table({"path": list(shard.paths), "byte_sum": sums})
    write_parquet_atomic(final, table, key)
    return ShardResult.done_here(shard, final, table.num_rows, {"ok": table.num_rows})


def stored(c, shard, key, context):
    final = STAGE["bytes"].output(c.folder) / shard.filename
    if not holds_key(final, key):
        return None
    rows = pq.ParquetFile(final).metadata.num_rows
    return ShardResult.on_disk(final, rows, {"ok": rows})


register_stage(Stage(name="subjects", work=photos_per_subject, reads=("manifest",),
                     writes="subject_counts", sections=("split",),
                     code_version="subjects-1", scope="data", key_settings=("split.seed",),
                     run=run))
register_stage(ShardedStage(
    name="bytes", work=photo_bytes, reads=("manifest",), writes="photo_bytes",
    sections=("data", "sharding"), code_version="bytes-1", scope="data",
    unit=lambda c: plan_shards(pq.read_table(c.folder.manifest), c.data.layout),
    shard_key=lambda c, context, shard: fingerprint(shard.content_fingerprint(), "bytes-1"),
    stored=stored,
    shard_call=lambda c, plan, shard: (photo_bytes, (
        c.data.root, shard, STAGE["bytes"].output(c.folder) / shard.filename,
        fingerprint(shard.content_fingerprint(), "bytes-1")))))
'''

KFACE = '''
import toy_stage  # noqa: F401  (registers the rows)

if __name__ == "__main__":  # (not in the spawned workers)
    from cli.main import main

    main()
'''


def test_a_toy_stage_is_a_row_and_a_function(kface_tree, tmp_path, prefect_env):
    """Two toy stages, each one module (a row and a function): a single-output one and a
    sharded one, run by ``kface run`` (Prefect, worker processes), the sharded one killed
    halfway and resumed, both cached on the next run, both in ``kface status``."""
    (tmp_path / "toy_stage.py").write_text(TOY)
    (tmp_path / "toy_kface.py").write_text(KFACE)
    out = tmp_path / "run"
    env = {**os.environ, **prefect_env, "PYTHONPATH": f"{tmp_path}:{REPO}", "COLUMNS": "200"}

    def kface(*args):
        res = subprocess.run([sys.executable, str(tmp_path / "toy_kface.py"), *args],
                             cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return res

    args = ("run", "--data-root", str(kface_tree), "--metadata",
            str(kface_tree / "KFace_metadata.csv"), "--out", str(out), "--workers", "1",
            "--set", "sharding.shard_size=1")
    stages = ("--stages", "select,subjects,bytes")
    # killed while the sharded stage is halfway (half a second a shard)
    done = kill_when_written([*args, *stages], {**env, "TOY_PAUSE": "0.5"}, out / "photo_bytes",
                             3, timeout=300, kface=(str(tmp_path / "toy_kface.py"),))
    assert 3 <= len(done) < 20
    table = pq.read_table(out / "subject_counts.parquet")
    manifest = pq.read_table(out / "manifest.parquet")
    assert table.num_rows == 20 and sum(table.column("path_count").to_pylist()) == (
        manifest.num_rows)
    kface(*args, *stages)  # resumed: the finished shards kept, the others computed
    resumed = json.loads((out / "stages" / "bytes.json").read_text())
    assert resumed["shards"] == 20 and resumed["shards_reused"] == len(done)
    assert resumed["rows_out"] == manifest.num_rows
    assert all((out / "photo_bytes" / name).stat().st_mtime_ns == mtime
               for name, mtime in done.items())
    first = json.loads((out / "stages" / "subjects.json").read_text())
    assert first["rows_out"] == 20 and first["reused"] is True  # (from the killed run)
    kface(*args, *stages)  # unchanged: both cached
    assert json.loads((out / "stages" / "subjects.json").read_text())["reused"] is True
    assert json.loads((out / "stages" / "bytes.json").read_text())["reused"] is True
    status = kface("status", "--data-root", str(kface_tree), "--out", str(out), "--json")
    states = {row["stage"]: row for row in json.loads(status.stdout)["stages"]}
    assert states["subjects"]["state"] == "cached" and states["detect"]["state"] == "missing"
    assert states["bytes"]["state"] == "cached"
    assert states["bytes"]["detail"] == "20/20 shards current"  # (from the recorded plan)
    assert (out / "stages" / "bytes.plan.json").exists()
    # a single-output key reads its declared setting: changing it makes it stale, and the
    # rerun recomputes it (and only it)
    kface(*args, *stages, "--set", "split.seed=5")
    again = json.loads((out / "stages" / "subjects.json").read_text())
    assert again["reused"] is False and again["rows_out"] == 20
    reordered = pq.read_table(out / "subject_counts.parquet").column("subject_id")
    assert reordered.to_pylist() != table.column("subject_id").to_pylist()
    assert json.loads((out / "stages" / "select.json").read_text())["reused"] is True
    assert json.loads((out / "stages" / "bytes.json").read_text())["reused"] is True

    # status, the docs' table, the deployments and the preflight's stage names follow
    # the rows
    from flows.config import load_config
    from flows.deploy import build_deployments
    from flows.preflight import parse_stages
    from flows.stages import STAGES, pipeline_status, stage_table_markdown, unregister_stage

    sys.path.insert(0, str(tmp_path))
    try:
        import toy_stage  # noqa: F401  (registers the rows)

        assert STAGES.index("select") < STAGES.index("subjects") < STAGES.index("bytes")
        assert "| subjects | `toy_stage.photos_per_subject` | manifest | subject_counts" in (
            stage_table_markdown())
        assert 'o_subject_counts[("OUT/subject_counts.parquet")]' in stage_table_markdown()
        assert "| bytes | `toy_stage.photo_bytes` | manifest | photo_bytes" in (
            stage_table_markdown())
        assert parse_stages("select, subjects, bytes") == ["select", "subjects", "bytes"]
        cfg = load_config(None, {"data.root": str(kface_tree), "out": str(out)})
        next((out / "photo_bytes").glob("shard-*.parquet")).unlink()  # one shard gone
        row = next(r for r in pipeline_status(cfg) if r.stage == "bytes")
        assert (row.state, row.detail) == ("stale", "19/20 shards current")
        full, reprocess, _ = build_deployments(cfg)
        assert full.description.startswith(f"All stages: {' -> '.join(STAGES)};")
        assert "subjects" in reprocess.parameters["stages"]
        assert "bytes" in reprocess.parameters["stages"]
    finally:
        unregister_stage("subjects")
        unregister_stage("bytes")
        sys.path.remove(str(tmp_path))
    assert "subjects" not in STAGES and "subjects" not in stage_table_markdown()


def test_no_stage_name_is_spelled_outside_the_stages_modules():
    """Code outside ``flows/stages/`` reaches a stage through the table (``STAGE``
    lookups by name, comparisons with a stage name, summaries by stage name are not
    allowed), and the machinery holds no stage's name at all."""
    import ast

    from flows.stages import STAGES

    names = "|".join(STAGES)
    spelled = re.compile(
        rf"""(STAGE\[|stage\s*[!=]=\s*|summaries\[|stages\s*==\s*)["']({names})["']"""
        rf"""|["']({names})["']\s+(not\s+)?in\s+(stages|summaries|stage_list)"""
        rf"""|["'/]({names})\.json["']""")
    found = []
    for folder in ("core", "models", "tasks", "flows", "cli"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if (REPO / "flows" / "stages") in path.parents:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if spelled.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
    machinery = ast.parse((REPO / "flows" / "machinery.py").read_text())
    strings = {node.value for node in ast.walk(machinery)
               if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not strings & set(STAGES)
    assert not [node for node in ast.walk(machinery) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("flows.stages")]
    assert re.search(r'"(select|detect)"', 'x = "detect"')  # the pattern can match


def test_a_row_declares_the_errors_its_check_says_in_one_line(kface_tree, tmp_path):
    """The preflight turns what a row's ``errors`` names into one line (InputError) and
    keeps no list of its own: an error the row does not declare goes through as it is."""
    import dataclasses

    import pytest

    from flows.config import load_config
    from flows.preflight import InputError, check_run
    from flows.stages import Stage, input_errors, register_stage, unregister_stage

    class ToyInputError(ValueError):
        pass

    def check(c):
        raise ToyInputError("toy: the toy file is missing (give --toy)")

    row = Stage(name="toycheck", work=check, reads=("manifest",), writes="toy", sections=(),
                code_version="toy-1", scope="data", check=check, errors=(ToyInputError,))
    config = load_config(None, {"data.root": str(kface_tree), "out": str(tmp_path / "o")})
    register_stage(row)
    try:
        assert ToyInputError in input_errors()
        with pytest.raises(InputError, match="^toy: the toy file is missing"):
            check_run(config, ["select", "toycheck"])
        unregister_stage("toycheck")
        register_stage(dataclasses.replace(row, errors=()))
        with pytest.raises(ToyInputError):
            check_run(config, ["select", "toycheck"])
    finally:
        unregister_stage("toycheck")
    assert ToyInputError not in input_errors()
