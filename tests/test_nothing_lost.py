"""Nothing a user made is lost, and every message reads right (issue 29), with the real CLI:
a failed command leaves the outputs of an earlier one as they were; user text prints
verbatim; input errors come before any model loads; outputs say which model made them and
a reference of another model is refused; people are counted as people."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, make_video, run_kface


def _snapshot(folder):
    """Every file below ``folder``: its bytes (what a failed command must not touch)."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(res, *words):
    lines = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()]
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def customers(aaf_dir, tmp_path_factory):
    """32 AAF photos as 16 people of two photos each, two people per band x gender (the
    same band and gender for a person's photos), with subject_id in labels.csv."""
    root = tmp_path_factory.mktemp("people")
    labels = pd.read_csv(aaf_dir / "labels.csv")
    labels["band"] = labels.age // 10
    rows = []
    for (_, _), group in labels.groupby(["band", "gender"]):
        for k in range(0, 4, 2):  # two people of each band x gender, two photos each
            for _, row in group.iloc[k * 50:k * 50 + 2].iterrows():
                rows.append({**row.to_dict(), "subject_id": f"p{len(rows) // 2}"})
    pick = pd.DataFrame(rows)[["file", "age", "gender", "subject_id"]]
    for name in pick.file:
        (root / name).symlink_to(aaf_dir / name)
    pick.to_csv(root / "labels.csv", index=False)
    return root


def test_a_failed_command_leaves_earlier_outputs_as_they_were(onnx_model, tiny_run,
                                                             scenes_dir, aaf_dir,
                                                             customers, tmp_path):
    model = str(onnx_model)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "photo.jpg").write_text("this is no photo")
    (bad / "clip.mp4").write_text("this is no video")
    clip = tmp_path / "clip.mp4"
    make_video(clip, aaf_dir)
    good_and_bad = {
        "p": (["predict", str(scenes_dir / "insightface_t1.jpg"), "--csv", "--annotated"],
              ["predict", str(bad / "photo.jpg")]),
        "v": (["video", str(clip), "--stats"], ["video", str(bad / "clip.mp4"), "--stats"]),
        "e": (["evaluate", "--data-root", str(customers)],
              ["evaluate", "--data-root", str(bad)]),
    }
    for name, (good, failing) in good_and_bad.items():
        out = tmp_path / name
        res = run_kface(*good, "--model", model, "--out", str(out))
        assert res.returncode == 0, res.stderr[-2000:]
        before = _snapshot(out)
        assert len(before) >= 2
        res = run_kface(*failing, "--model", model, "--out", str(out))
        _one_error_line(res)
        assert "moov" not in res.stderr and "[mov" not in res.stderr  # no FFmpeg lines
        assert _snapshot(out) == before, name
    # stats: a reference of another model is refused, the earlier counts stay
    other = tmp_path / "other.json"
    ref = json.loads((tmp_path / "e" / "soft_confusion.json").read_text())
    assert ref["model"]["id"] and ref["detector"]["kind"] == "res10"
    other.write_text(json.dumps({**ref, "model": {**ref["model"], "id": "another"}}))
    predictions = str(tmp_path / "p" / "predictions.json")
    res = run_kface("stats", predictions, "--out", str(tmp_path / "s"), "--reference",
                    str(tmp_path / "e" / "soft_confusion.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    before = _snapshot(tmp_path / "s")
    res = run_kface("stats", predictions, "--out", str(tmp_path / "s"), "--reference",
                    str(other))
    _one_error_line(res, "another model", "--allow-other-model")
    assert _snapshot(tmp_path / "s") == before
    res = run_kface("stats", predictions, "--out", str(tmp_path / "s"), "--reference",
                    str(other), "--allow-other-model")
    assert res.returncode == 0 and "another model" in res.stderr, res.stderr[-2000:]
    # export: a folder with no Keras model to export fails, the earlier export stays
    res = run_kface("export", "--model", str(tiny_run["model_dir"]), "--format", "onnx",
                    "--out", str(tmp_path / "x"))
    assert res.returncode == 0, res.stderr[-2000:]
    before = _snapshot(tmp_path / "x")
    res = run_kface("export", "--model", model, "--format", "onnx", "--out",
                    str(tmp_path / "x"))
    _one_error_line(res, "no model.keras")
    assert _snapshot(tmp_path / "x") == before


def test_outputs_say_which_model_and_detector_made_them(onnx_model, aaf_dir, tmp_path):
    clip = tmp_path / "clip.mp4"
    make_video(clip, aaf_dir)
    res = run_kface("video", str(clip), "--model", str(onnx_model), "--out",
                    str(tmp_path / "v"), "--stats")
    assert res.returncode == 0, res.stderr[-2000:]
    labels = json.loads((onnx_model / "labels.json").read_text())
    visitors = [json.loads(x) for x in (tmp_path / "v" / "tracks.jsonl").open()]
    assert {v["model_id"] for v in visitors} == {labels["model_id"]}
    stats = json.loads((tmp_path / "v" / "stats.json").read_text())
    assert stats["made_by"]["model"]["id"] == labels["model_id"]
    assert stats["made_by"]["model"]["file"] == "model.onnx"
    assert stats["made_by"]["detector"]["kind"] == "res10"


def test_user_text_prints_verbatim(capsys, tmp_path, scenes_dir):
    """Square brackets in a path or an install hint are not eaten as terminal markup."""
    import typer

    from cli.terminal import fail

    with pytest.raises(typer.Exit):
        fail("ONNX export needs tf2onnx: pip install 'kface-pipeline[onnx]'")
    assert "pip install 'kface-pipeline[onnx]'" in capsys.readouterr().err
    model = tmp_path / "models[old]" / "m"
    res = run_kface("predict", str(scenes_dir / "insightface_t1.jpg"), "--model", str(model),
                    "--out", str(tmp_path / "p"))
    _one_error_line(res, "models[old]/m")


def _without_model_libraries(tmp_path) -> dict:
    """An environment where importing TensorFlow, Keras or ONNX Runtime fails: a command
    that still gives its answer checked its inputs before loading any model."""
    fake = tmp_path / "no-model-libraries"
    for name in ("tensorflow", "keras", "onnxruntime"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')")
    return {"PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])}


def test_input_errors_come_before_any_model_loads(onnx_model, tmp_path):
    env = _without_model_libraries(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "text.jpg").write_text("not a photo")
    (tmp_path / "text.mp4").write_text("not a video")
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    model = ["--model", str(onnx_model), "--out", str(tmp_path / "o")]
    for args, words in (
            (["predict", str(tmp_path / "nope.jpg")], ["not found", "nope.jpg"]),
            (["predict", str(empty)], ["no image file in", "empty"]),
            (["predict", str(tmp_path / "text.jpg")], ["can be read", "text.jpg"]),
            (["video", str(tmp_path / "nope.mp4")], ["not found"]),
            (["video", str(tmp_path / "text.mp4")], ["not a video", "text.mp4"]),
            (["evaluate", "--data-root", str(labelled)], ["labelled"])):
        res = run_kface(*args, *model, env=env)
        _one_error_line(res, *words)
        assert "was imported" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_status_of_a_missing_run_folder_is_an_error(tmp_path):
    res = run_kface("status", "--out", str(tmp_path / "nosuch"))
    _one_error_line(res, "nosuch", "not a run folder")


def test_help_uses_the_usual_placeholders():
    for args, wanted in ((["--help"], ["--verbose", "--debug"]),
                         (["predict", "--help"], ["PATHS...", "--model PATH",
                                                  "--threshold FLOAT"]),
                         (["run", "--help"], ["--set KEY=VALUE", "--workers INTEGER"]),
                         (["stats", "--help"], ["SOURCE", "--allow-other-model"])):
        res = subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        for word in wanted:
            assert word in res.stdout, (args, word)
        for placeholder in ("<bool>", "<list", "<path>", "{paths}"):
            assert placeholder not in res.stdout, (args, placeholder)


def test_a_reference_counts_people_not_photos(onnx_model, customers, tmp_path):
    """32 photos of 16 people: the reference says 16 people (4 per band), its rows count
    people and faces apart; a class of one person with six photos is refused."""
    from core.labels import AGE_BANDS, GENDERS
    from inference.stats import StatsError, load_reference, reference

    res = run_kface("evaluate", "--model", str(onnx_model), "--data-root", str(customers),
                    "--out", str(tmp_path / "e"))
    assert res.returncode == 0, res.stderr[-2000:]
    ref = json.loads((tmp_path / "e" / "soft_confusion.json").read_text())
    found = ref["faces"]
    assert found >= 28 and 14 <= ref["people"] <= 16 and ref["counted"].startswith("people")
    rows = ref["heads"]["age_band"]["rows"]
    assert all(r["people"] <= 4 < r["faces"] for r in rows.values())
    assert sum(r["faces"] for r in rows.values()) == found
    names = {"gender": list(GENDERS), "age_band": list(AGE_BANDS)}
    rng = np.random.default_rng(0)
    truth = {"age_band": np.repeat(np.arange(4), 6), "gender": np.tile([0, 1], 12)}
    probs = {h: rng.dirichlet(np.ones(len(names[h])), 24) for h in names}
    subjects = np.array([f"s{i // 2}" for i in range(24)])  # two photos a person
    subjects[:6] = "one"  # the six 20s photos are one person
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(reference(probs, truth, names, subjects)))
    with pytest.raises(StatsError, match="1 labelled people of 20s"):
        load_reference(path, names)
    path.write_text(json.dumps(reference(probs, truth, names)))  # (by photo: six each)
    load_reference(path, names)


def test_video_counts_headline_the_estimate(onnx_model, aaf_dir, tmp_path):
    clip = tmp_path / "clip.mp4"
    make_video(clip, aaf_dir)
    res = run_kface("video", str(clip), "--model", str(onnx_model), "--out",
                    str(tmp_path / "v"), "--stats")
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((tmp_path / "v" / "stats.json").read_text())
    assert stats["people"] == {c: stats["joint"][c] for c in stats["people"]}
    assert "diagnostic_most_likely_class" in stats and "most likely" not in res.stdout
    assert sum(line.startswith("note:") for line in res.stderr.splitlines()) == 1
    timeline = (tmp_path / "v" / "timeline.csv").read_text().splitlines()
    assert timeline[0].startswith("minute,20s_M")
    assert sum(map(float, timeline[1].split(",")[1:])) == pytest.approx(2, abs=0.05)
