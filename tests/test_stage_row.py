"""A stage is its row plus its work function: a toy stage registered from outside (a row
and a function, nothing else) runs in a real ``kface run`` (Prefect), is cached on the
next run, shows in ``kface status``, the deployments and the stage table's docs; and no
stage name is spelled outside the table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
from conftest import REPO

TOY = '''
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.storage import write_parquet_atomic
from flows.stages import STAGE, Stage, register_stage


def photos_per_subject(manifest: pa.Table, seed: int) -> pa.Table:
    """The work: each subject's photo count, the subjects in a seeded random order."""
    counts = manifest.group_by("subject_id").aggregate([("path", "count")])
    order = np.random.default_rng(seed).permutation(counts.num_rows)
    return counts.take(pa.array(order))


def run(c, key):
    manifest = pq.read_table(c.folder.manifest)
    table = photos_per_subject(manifest, c.split.seed)
    write_parquet_atomic(STAGE["subjects"].output(c.folder), table, key)
    return {"rows_in": manifest.num_rows, "rows_out": table.num_rows}


register_stage(Stage("subjects", photos_per_subject, reads=("manifest",),
                     writes="subject_counts", sections=("split",), code_version="subjects-1",
                     scope="data", key_settings=("split.seed",), run=run))

if __name__ == "__main__":
    from flows.cli import main

    main()
'''


def test_a_toy_stage_is_a_row_and_a_function(kface_tree, tmp_path, prefect_env):
    (tmp_path / "toy_stage.py").write_text(TOY)
    out = tmp_path / "run"
    env = {**os.environ, **prefect_env, "PYTHONPATH": f"{tmp_path}:{REPO}", "COLUMNS": "200"}

    def kface(*args):
        res = subprocess.run([sys.executable, str(tmp_path / "toy_stage.py"), *args],
                             cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return res

    args = ("run", "--data-root", str(kface_tree), "--metadata",
            str(kface_tree / "KFace_metadata.csv"), "--out", str(out))
    kface(*args, "--stages", "select,subjects")
    table = pq.read_table(out / "subject_counts.parquet")
    manifest = pq.read_table(out / "manifest.parquet")
    assert table.num_rows == 20 and sum(table.column("path_count").to_pylist()) == (
        manifest.num_rows)
    first = json.loads((out / "stages" / "subjects.json").read_text())
    assert first["rows_out"] == 20 and first["reused"] is False
    kface(*args, "--stages", "select,subjects")  # unchanged: cached
    assert json.loads((out / "stages" / "subjects.json").read_text())["reused"] is True
    status = kface("status", "--data-root", str(kface_tree), "--out", str(out), "--json")
    states = {row["stage"]: row["state"] for row in json.loads(status.stdout)["stages"]}
    assert states["subjects"] == "cached" and states["detect"] == "missing"
    # its key reads its declared setting: changing it makes it stale, and the rerun
    # recomputes it (and only it)
    kface(*args, "--stages", "select,subjects", "--set", "split.seed=5")
    again = json.loads((out / "stages" / "subjects.json").read_text())
    assert again["reused"] is False and again["rows_out"] == 20
    reordered = pq.read_table(out / "subject_counts.parquet").column("subject_id")
    assert reordered.to_pylist() != table.column("subject_id").to_pylist()
    assert json.loads((out / "stages" / "select.json").read_text())["reused"] is True

    # the docs' table, the deployments and the preflight's stage names follow the row
    from flows.deploy import build_deployments
    from flows.preflight import parse_stages
    from flows.stages import STAGES, stage_table_markdown, unregister_stage

    sys.path.insert(0, str(tmp_path))
    try:
        import toy_stage  # noqa: F401  (registers the row)

        assert "| subjects | `toy_stage.photos_per_subject` | manifest | subject_counts" in (
            stage_table_markdown())
        assert 'o_subject_counts[("OUT/subject_counts.parquet")]' in stage_table_markdown()
        assert parse_stages("select, subjects") == ["select", "subjects"]
        from flows.config import load_config

        full, reprocess, _ = build_deployments(load_config(None, {
            "data.root": str(kface_tree), "out": str(out)}))
        assert full.description.startswith(f"All stages: {' -> '.join(STAGES)};")
        assert "-> evaluate -> subjects" in full.description
        assert reprocess.parameters["stages"][-1] == "subjects"
    finally:
        unregister_stage("subjects")
        sys.path.remove(str(tmp_path))
    assert "subjects" not in STAGES and "subjects" not in stage_table_markdown()


def test_no_stage_name_is_spelled_outside_the_table():
    """Code outside ``flows/stages.py`` reaches a stage through the table (``STAGE``
    lookups by name, comparisons with a stage name, summaries by stage name are not
    allowed)."""
    from flows.stages import STAGES

    names = "|".join(STAGES)
    spelled = re.compile(
        rf"""(STAGE\[|stage\s*[!=]=\s*|summaries\[|stages\s*==\s*)["']({names})["']"""
        rf"""|["']({names})["']\s+(not\s+)?in\s+(stages|summaries|stage_list)"""
        rf"""|["'/]({names})\.json["']""")
    found = []
    for folder in ("core", "models", "tasks", "flows"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "flows" / "stages.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if spelled.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


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

    row = Stage("toycheck", check, reads=("manifest",), writes="toy", sections=(),
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
