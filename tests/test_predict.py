"""Inference: the analyser, `kface predict` and `kface video` with a tiny trained model."""

import json

import cv2
import numpy as np
import pytest
from conftest import kill_when_written, make_video, run_kface

from inference.predict import predict_images
from models.analyzer import FaceAnalyzer, ModelFolderError
from models.face_crop import crop_face
from tasks.crop_stream import crop_jpegs


@pytest.fixture(scope="module")
def analyzer(tiny_run):
    return FaceAnalyzer(tiny_run["model_dir"])


def test_analyzer_input_is_the_training_crop(tiny_run):
    from models.detector import DetectorConfig

    # with the detect stage's settings (inference defaults to the square input)
    analyzer = FaceAnalyzer(tiny_run["model_dir"], detector=DetectorConfig())
    row = tiny_run["frame"].iloc[0]
    image = cv2.imread(str(tiny_run["root"] / row.path))
    faces, batch = analyzer.crops(image)
    box = (row.left, row.top, row.right, row.bottom)
    assert faces[0].box_margin == box  # same detector box and margin as training
    np.testing.assert_array_equal(batch[0], crop_face(image, box, 64).astype(np.float32))
    # and the crop cache's JPEG of that face differs only by JPEG loss
    split = next(f for f in tiny_run["examples"].values() if row.path in set(f.path))
    cached = crop_jpegs(split[split.path == row.path], tiny_run["crops"].files)[0]
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(cached, np.uint8), cv2.IMREAD_COLOR),
                           cv2.COLOR_BGR2RGB)
    assert np.abs(decoded.astype(float) - batch[0]).mean() < 3.0  # q95, 4:2:0, 64 px


def test_group_photo_six_faces_with_probabilities(analyzer, scenes_dir, tmp_path):
    entries = predict_images(analyzer, [scenes_dir / "insightface_t1.jpg"], tmp_path,
                             write_csv=True, annotated=True)
    faces = entries[0]["faces"]
    assert len(faces) == 6
    for f in faces:
        assert set(f) == {"box", "score", "gender", "gender_probs", "age_band",
                          "age_band_probs", "age", "landmarks"}
        assert f["landmarks"] is None  # a res10 model: no landmarks
        assert 20 <= f["age"] < 60  # the tiny model has the exact-age head
        assert sum(f["gender_probs"].values()) == pytest.approx(1, abs=1e-3)
        assert sum(f["age_band_probs"].values()) == pytest.approx(1, abs=1e-3)
        assert list(f["age_band_probs"]) == ["20s", "30s", "40s", "50s"]
        assert f["gender"] == max(f["gender_probs"], key=f["gender_probs"].get)
        left, top, right, bottom = f["box"]
        assert 0 <= left < right <= 1280 and 0 <= top < bottom <= 886 and f["score"] > 0.5
    saved = json.loads((tmp_path / "predictions.json").read_text())
    assert saved["images"] == entries and (entries[0]["width"], entries[0]["height"]) == (
        1280, 886)
    assert saved["model"]["id"] and len(saved["model"]["sha256"]) == 64  # what made them
    assert saved["detector"] == {"kind": "res10", "confidence": 0.8}
    csv_bytes = (tmp_path / "predictions.csv").read_bytes()
    assert len(csv_bytes.splitlines()) == 7 and b"\r\n" not in csv_bytes  # Unix endings
    assert b"eye_r_x" in csv_bytes.splitlines()[0]
    assert len(list((tmp_path / "annotated").glob("*.jpg"))) == 1


def test_yunet_inference_gives_landmarks_and_says_it_differs(tiny_run, scenes_dir):
    """A model trained on res10 crops, run with YuNet: five landmarks per face, inside its
    box, and one note that the faces are cut differently from the training crops."""
    analyzer = FaceAnalyzer(tiny_run["model_dir"], detector_kind="yunet")
    assert analyzer.detector_cfg.kind == "yunet" and analyzer.detector_cfg.confidence == 0.7
    assert len(analyzer.notes) == 1 and "trained on res10" in analyzer.notes[0]
    faces = analyzer.analyze(cv2.imread(str(scenes_dir / "insightface_t1.jpg")))
    assert len(faces) == 6
    for face in faces:
        left, top, right, bottom = face.box
        assert len(face.landmarks) == 5
        assert all(left <= x <= right and top <= y <= bottom for x, y in face.landmarks)
        assert face.as_dict()["landmarks"] == [list(p) for p in face.landmarks]
    assert FaceAnalyzer(tiny_run["model_dir"]).notes == []  # its own detector: nothing


def test_model_option_finds_the_model_or_says_where_it_is(tiny_run, tmp_path):
    """--model given a run folder, an experiment folder or model.keras finds the model and
    says which; several experiments or a misspelled path name what to give."""
    import shutil

    from models.analyzer import resolve_model_dir

    run = tmp_path / "run"
    model = run / "experiments" / "default" / "model"
    shutil.copytree(tiny_run["model_dir"], model)
    assert resolve_model_dir(model) == (model, None)
    for given in (run, run / "experiments" / "default", model / "model.keras"):
        found, note = resolve_model_dir(given)
        assert found == model and str(model) in note, given
    shutil.copytree(model, run / "experiments" / "other" / "model")
    assert resolve_model_dir(run)[0] == model  # 'default' is the one a plain run trains
    shutil.move(str(run / "experiments" / "default"), str(run / "experiments" / "first"))
    with pytest.raises(ModelFolderError, match="several trained experiments"):
        resolve_model_dir(run)
    with pytest.raises(ModelFolderError, match="not found"):
        resolve_model_dir(tmp_path / "rnu")
    res = run_kface("predict", str(tiny_run["root"] / tiny_run["frame"].path[0]), "--model",
                    str(run / "experiments" / "first"), "--out", str(tmp_path / "p"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "using " + str(run / "experiments" / "first" / "model") in res.stderr


def test_predict_cli_folder_with_a_bad_file(tiny_run, scenes_dir, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "astronaut.png").write_bytes(
        (scenes_dir / "skimage_astronaut.png").read_bytes())
    (folder / "broken.jpg").write_text("not an image")
    res = run_kface("predict", str(folder), "--model", str(tiny_run["model_dir"]), "--out",
                    str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-2000:]
    entries = {e["path"].split("/")[-1]: e for e in
               json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]}
    assert len(entries["astronaut.png"]["faces"]) == 1
    assert entries["broken.jpg"]["error"] and entries["broken.jpg"]["faces"] == []
    assert "1 image could not be read, e.g." in res.stderr and "broken.jpg" in res.stderr
    assert "sub/astronaut.png" in res.stdout  # named relative to the folder given
    face = entries["astronaut.png"]["faces"][0]  # the answer is shown, not only saved
    shown = f"{face['gender']} {face['gender_probs'][face['gender']]:.0%}"
    line = next(x for x in res.stdout.splitlines() if "astronaut.png" in x)
    assert shown in line and face["age_band"] in line


def test_model_folder_missing_a_file(tmp_path, tiny_run):
    (tmp_path / "model.keras").write_bytes(b"")
    with pytest.raises(ModelFolderError, match="labels.json"):
        FaceAnalyzer(tmp_path)
    res = run_kface("predict", str(tiny_run["root"]), "--model", str(tmp_path))
    assert res.returncode == 2 and "lacks labels.json" in res.stderr


def test_video_tracks_and_stats(tiny_run, aaf_dir, tmp_path):
    clip = tmp_path / "clip.mp4"
    make_video(clip, aaf_dir)
    out = tmp_path / "video"
    res = run_kface("video", str(clip), "--model", str(tiny_run["model_dir"]), "--out",
                    str(out), "--stats")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    assert len(lines) == 30
    ids = {f["track_id"] for line in lines for f in line["faces"]}
    assert len(ids) == 2
    # smoothed labels are constant within a track once it has a few frames
    for tid in ids:
        labels = [(f["smoothed_gender"], f["smoothed_age_band"]) for line in lines[20:]
                  for f in line["faces"] if f["track_id"] == tid]
        assert len(set(labels)) == 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["visitors"] == 2  # the headline: estimates with their intervals
    assert sum(p["estimate"] for p in stats["people"].values()) == pytest.approx(2, abs=0.4)
    assert all(p["low"] <= p["estimate"] <= p["high"] for p in stats["people"].values())
    assert "2 visitors" in res.stderr and "total" in res.stdout  # a table, not a dict
    tracks = {t["track_id"]: t for t in map(json.loads, (out / "tracks.jsonl").open())}
    assert sorted((t["first_s"], t["last_s"]) for t in tracks.values()) == [(0.0, 3.0),
                                                                           (1.0, 3.0)]
    for t in tracks.values():  # one line per visitor: seconds, averaged answers, age
        assert t["counted"] and t["seconds_in_view"] == round(t["last_s"] - t["first_s"], 2)
        assert sum(t["age_band_probs"].values()) == pytest.approx(1, abs=1e-3)
        assert t["age_band"] == max(t["age_band_probs"], key=t["age_band_probs"].get)
        assert 20 <= t["age"] < 60
    assert all(f["smoothed_age"] is not None for line in lines for f in line["faces"])
    assert (out / "timeline.csv").read_text().startswith("minute,20s_M")
    assert (out / "people.png").stat().st_size > 0
    cap = cv2.VideoCapture(str(out / "annotated.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 30


def test_a_short_visit_is_not_counted(analyzer, aaf_dir, tmp_path):
    """Face A is in view 3 s, face B 2 s (10 fps): with a 2.5 s minimum only A counts."""
    from inference.video import analyze_video

    clip = tmp_path / "clip.mp4"
    make_video(clip, aaf_dir)
    summary = analyze_video(analyzer, str(clip), tmp_path / "v", stats=True,
                            min_seconds=2.5)
    assert summary["tracks"] == 2 and summary["visitors"] == 1
    assert sum(p["estimate"] for p in summary["people"].values()) == pytest.approx(1, abs=0.4)
    tracks = [json.loads(x) for x in (tmp_path / "v" / "tracks.jsonl").open()]
    assert sorted(t["counted"] for t in tracks) == [False, True]


def test_a_visitor_who_comes_back_is_counted_once(analyzer, aaf_dir, tmp_path):
    """A leaves and is back 3 s later in another lane; D, another person, walks where A
    was in between; C passes by for 0.3 s; faces missed in 5% of frames. Three visitors,
    A with two tracks; without re-identification A counts twice."""
    from inference.video import analyze_video
    from tasks.sample_data import Visit, write_visit_clip

    files = sorted(p.name for p in aaf_dir.glob("*.jpg"))
    a, b, c, d = files[10], files[2000], files[3000], files[11]
    clip = tmp_path / "shop.mp4"
    frames = write_visit_clip(aaf_dir, [
        Visit(a, 0, 3, 0), Visit(b, 1, 8, 1), Visit(d, 4, 7, 0), Visit(a, 6, 9, 2),
        Visit(c, 8.5, 8.8, 1)], clip, miss_rate=0.05)
    seen = []
    summary = analyze_video(analyzer, str(clip), tmp_path / "v", stats=True,
                            progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (frames, frames) and len(seen) == frames
    visitors = [json.loads(x) for x in (tmp_path / "v" / "tracks.jsonl").open()]
    assert summary["visitors"] == 3 and summary["tracks"] == 5
    assert sorted(v["counted"] for v in visitors) == [False, True, True, True]
    back = next(v for v in visitors if v["returns"])
    assert (back["first_s"], back["last_s"], back["seconds_in_view"]) == (0.0, 9.0, 6.0)
    assert len(back["track_ids"]) == 2
    once = analyze_video(analyzer, str(clip), tmp_path / "v0", return_seconds=0)
    assert once["visitors"] == 4


def test_one_person_close_to_the_camera_is_one_person(tiny_run, aaf_dir, tmp_path):
    """A face filling the frame makes res10 repeat it shifted down-right (a phantom, scored
    up to 1.0); the store statistics must still count one person."""
    face = cv2.resize(cv2.imread(str(sorted(aaf_dir.glob("*.jpg"))[10])), (480, 540))
    clip = tmp_path / "close.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (480, 480))
    for i in range(30):  # the person moves up through the frame
        writer.write(np.ascontiguousarray(face[2 * i:2 * i + 480]))
    writer.release()
    out = tmp_path / "video"
    res = run_kface("video", str(clip), "--model", str(tiny_run["model_dir"]), "--out",
                    str(out), "--stats")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and all(len(line["faces"]) == 1 for line in lines)
    assert json.loads((out / "stats.json").read_text())["visitors"] == 1
    tracks = [json.loads(x) for x in (out / "tracks.jsonl").read_text().splitlines()]
    assert len(tracks) == 1 and tracks[0]["frames"] == 30


def test_tracker_forgets_ended_tracks():
    """An hour of passers-by: live tracks stay few, every ended track is handed out once."""
    from inference.video import IoUTracker, PeopleCounter, Visitor
    from models.analyzer import FacePrediction

    tracker = IoUTracker(max_gap=5)
    counter = PeopleCounter(["M", "F"], ["20s", "30s", "40s", "50s"])
    closed, most_live = 0, 0
    for frame in range(3000):  # a new person every 20 frames, each seen for 15 frames
        faces = []
        for person in range(max(0, frame // 20 - 1), frame // 20 + 1):
            if person * 20 <= frame < person * 20 + 15:
                x = (person % 10) * 60
                faces.append(FacePrediction((x, 100, x + 50, 160), 0.99, "M",
                                            {"M": 0.9, "F": 0.1}, "30s",
                                            {"20s": 0.1, "30s": 0.7, "40s": 0.1, "50s": 0.1}))
        for track in tracker.close_ended(frame):
            closed += 1
            counter.add(Visitor([track]))
        tracker.update(faces, frame)
        most_live = max(most_live, len(tracker.live))
    for track in tracker.close_ended():
        counter.add(Visitor([track]))
        closed += 1
    assert closed == tracker.started == 150
    assert most_live <= 2
    assert counter.people == {"30s_M": 150}


def test_unreadable_video_is_a_clear_error(tiny_run, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    res = run_kface("video", str(bad), "--model", str(tiny_run["model_dir"]))
    assert res.returncode == 2 and "not a video OpenCV can read" in res.stderr


@pytest.mark.parametrize("fmt", ["savedmodel", "tflite", "onnx"])
def test_export_gives_the_same_outputs(tiny_run, tmp_path, fmt):
    from models.classifier import load_classifier
    from models.export import export_model, run_exported

    path = export_model(tiny_run["model_dir"], tmp_path, fmt)
    frame = tiny_run["examples"]["val"].head(4)
    images = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8),
                                                 cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                       for b in crop_jpegs(frame, tiny_run["crops"].files)]).astype(np.float32)
    expected = load_classifier(tiny_run["model_dir"] / "model.keras").predict(images,
                                                                              verbose=0)
    got = run_exported(path, images)
    assert set(got) == set(expected) == {"gender", "age_band", "age"}
    for head in expected:
        np.testing.assert_allclose(got[head], expected[head], atol=1e-4)
    assert (tmp_path / "labels.json").exists()


def test_onnx_export_says_what_is_missing(tiny_run, tmp_path, monkeypatch):
    import importlib.util

    from models.export import ExportError, export_model

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tf2onnx", "onnx")
                        else find_spec(name, *a))
    with pytest.raises(ExportError, match="tf2onnx"):
        export_model(tiny_run["model_dir"], tmp_path, "onnx")


def test_onnx_model_folder_predicts_like_keras(tiny_run, onnx_model, scenes_dir, tmp_path):
    """The exported folder is a model folder: same faces, same answers, no Keras model."""
    from models.backends import OnnxClassifier

    image = cv2.imread(str(scenes_dir / "insightface_t1.jpg"))
    keras_faces = FaceAnalyzer(tiny_run["model_dir"]).analyze(image)
    onnx = FaceAnalyzer(onnx_model)
    assert isinstance(onnx.model, OnnxClassifier)
    onnx_faces = onnx.analyze(image)
    assert len(onnx_faces) == len(keras_faces) == 6
    for k, o in zip(keras_faces, onnx_faces, strict=True):
        assert k.box == o.box
        assert k.gender_probs == pytest.approx(o.gender_probs, abs=2e-4)
        assert k.age_band_probs == pytest.approx(o.age_band_probs, abs=2e-4)
        assert k.age == pytest.approx(o.age, abs=0.11)
    res = run_kface("predict", str(scenes_dir / "insightface_t1.jpg"), "--model",
                    str(onnx_model), "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(json.loads((tmp_path / "predictions.json").read_text())["images"][0]["faces"]
               ) == 6


def test_many_photos_in_one_batch_match_one_by_one(analyzer, scenes_dir):
    images = [cv2.imread(str(p)) for p in sorted(scenes_dir.glob("*.jpg"))[:4]]
    together = analyzer.analyze_many(images)
    alone = [analyzer.analyze(image) for image in images]
    assert sum(map(len, together)) >= 4
    for a, b in zip(together, alone, strict=True):
        assert [f.box for f in a] == [f.box for f in b]
        for fa, fb in zip(a, b, strict=True):
            assert fa.age_band_probs == pytest.approx(fb.age_band_probs, abs=2e-4)


def test_reader_threads_give_the_answers_of_one_thread(analyzer, scenes_dir, tmp_path):
    """Photos read and detected by two threads ahead of the classifier: every entry in
    the input's order, an unreadable file in between, the same faces and probabilities."""
    from inference.predict import predict_entries

    paths = sorted(scenes_dir.glob("*.jpg"))[:5]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = [*paths[:2], bad, *paths[2:]]
    one = predict_entries(analyzer, paths, batch=2, readers=1)
    two = predict_entries(analyzer, paths, batch=2, readers=2)
    assert [e["path"] for e in two] == [str(p) for p in paths]
    assert two[2]["error"] and not two[2]["faces"]
    assert sum(len(e["faces"]) for e in two) >= 5
    for a, b in zip(one, two, strict=True):
        assert [f["box"] for f in a["faces"]] == [f["box"] for f in b["faces"]]
        for fa, fb in zip(a["faces"], b["faces"], strict=True):
            assert fa["age_band_probs"] == pytest.approx(fb["age_band_probs"], abs=2e-4)


def _waiting_squares(items: int):
    """``x -> x * x`` (raising at 7) where each item of a group of three waits until the
    next one has finished: with three threads the items of a group finish in reverse.
    Returns the function and the list of items in the order they finished."""
    import threading

    done = [threading.Event() for _ in range(items)]
    finished: list[int] = []

    def square(x: int) -> int:
        try:
            if x % 3 != 2 and x + 1 < items:
                assert done[x + 1].wait(10), "the next item never finished"
            if x == 7:
                raise ValueError("seven")
            return x * x
        finally:
            finished.append(x)
            done[x].set()

    return square, finished


def test_ordered_map_keeps_order_and_raises_at_its_item():
    from core.threads import ordered_map

    square, finished = _waiting_squares(7)
    assert list(ordered_map(square, range(7), threads=3)) == [x * x for x in range(7)]
    assert finished[:3] == [2, 1, 0]  # they did finish out of order
    square, _ = _waiting_squares(20)
    got = []
    with pytest.raises(ValueError, match="seven"):
        for value in ordered_map(square, range(20), threads=3):
            got.append(value)
    assert got == [x * x for x in range(7)]  # the answers before the failed item


def test_onnx_model_folder_problems_are_one_line(onnx_model, scenes_dir, tmp_path):
    import shutil

    from models.backends import ModelFolderError

    photo = str(scenes_dir / "insightface_t1.jpg")
    wrong = tmp_path / "wrong-labels"
    shutil.copytree(onnx_model, wrong)
    labels = json.loads((wrong / "labels.json").read_text())
    labels["age_band"] = ["young", "old"]
    (wrong / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(ModelFolderError, match="labels.json does not match model.onnx"):
        FaceAnalyzer(wrong)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a network")
    shutil.copy(onnx_model / "labels.json", broken)
    for folder, says in ((wrong, "age_band: labels.json has 2 classes, model.onnx 4"),
                         (broken, "is not a readable ONNX model")):
        res = run_kface("predict", photo, "--model", str(folder), "--out", str(tmp_path / "o"))
        assert res.returncode == 2 and says in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "o" / "predictions.json").exists()


def test_export_cli_rejects_a_missing_model(tmp_path):
    res = run_kface("export", "--model", str(tmp_path), "--format", "tflite")
    assert res.returncode == 2 and "lacks model.keras" in res.stderr


def test_sharded_predict_flow_matches_single_process(onnx_model, scenes_dir, tmp_path,
                                                     prefect_env):
    """(The exported model: its workers start without TensorFlow, seconds each.)"""
    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted(scenes_dir.iterdir()):
        (folder / f.name).symlink_to(f)
    (folder / "zz_broken.jpg").write_text("nope")
    single = run_kface("predict", str(folder), "--model", str(onnx_model),
                       "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-2000:]
    args = ["predict", str(folder), "--model", str(onnx_model), "--out",
            str(tmp_path / "two"), "--workers", "2", "--shard-size", "3", "--json"]
    env = prefect_env
    sharded = run_kface(*args, env=env)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "predictions.json").read_text())
    b = json.loads((tmp_path / "two" / "predictions.json").read_text())
    assert a == b and len(a["images"]) == 7  # the shards hold what one process writes
    shards = sorted((tmp_path / "two" / "shards").glob("shard-*.parquet"))
    assert len(shards) == 3 and "3 shards (0 reused)" in sharded.stderr
    assert "kface-predict" in sharded.stdout + sharded.stderr
    mtimes = [p.stat().st_mtime_ns for p in shards]
    again = run_kface(*args, env=env)  # unchanged: every shard reused, none rewritten
    assert again.returncode == 0 and "3 shards (3 reused)" in again.stderr, again.stderr
    assert [p.stat().st_mtime_ns for p in shards] == mtimes


def test_batch_predict_resumes_after_sigkill(onnx_model, scenes_dir, tmp_path, prefect_env):
    """A folder of 48 photos, one shard each, killed (CLI, server and workers) once a few
    shards are written; the rerun keeps those files and computes only the rest."""
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    folder.mkdir()
    photos = sorted(p for p in scenes_dir.iterdir() if p.suffix == ".jpg")
    for i in range(48):
        (folder / f"{i:03d}.jpg").symlink_to(photos[i % len(photos)])
    out = tmp_path / "out"
    args = ["predict", str(folder), "--model", str(onnx_model), "--out", str(out),
            "--workers", "2", "--shard-size", "1"]
    done = kill_when_written(args, prefect_env, out / "shards", 3)
    assert 3 <= len(done) < 48
    # what a worker killed in the middle of a write leaves (the kill above may or may not)
    (out / "shards" / ".shard-00047.parquet.k1ll3d.tmp").write_bytes(b"PAR1 half")
    res = run_kface(*args, env=prefect_env)
    assert res.returncode == 0, res.stderr[-3000:]
    shards = sorted((out / "shards").glob("shard-*.parquet"))
    assert len(shards) == 48 and not list((out / "shards").glob(".*.tmp"))
    assert f"48 shards ({len(done)} reused)" in res.stderr
    for name, mtime in done.items():  # finished shards were not recomputed
        assert (out / "shards" / name).stat().st_mtime_ns == mtime
    table = pq.read_table(shards)
    assert sorted(set(table.column("path").to_pylist())) == sorted(map(str, folder.iterdir()))
    # every copy of a photo has the same faces, whether its shard was written before
    # the kill or after it
    faces = {}
    for path, face in zip(table.column("path").to_pylist(), table.column("face").to_pylist(),
                          strict=True):
        faces.setdefault(path, []).append(face)
    for i in range(48):
        first = faces[str(folder / f"{i % len(photos):03d}.jpg")]
        assert faces[str(folder / f"{i:03d}.jpg")] == first
    assert len(faces[str(folder / "000.jpg")]) == 6  # insightface_t1: six people


def test_batch_predict_keys_shards_on_content_as_the_pipeline_does(onnx_model, scenes_dir,
                                                                   tmp_path):
    """Batch predict's plan and resume rule are the pipeline's (``core.sharding``): new
    mtimes on the same bytes (a copy) keep every shard, changed bytes redo their shard
    only, and a shard file written under the old key rule (paths, sizes, mtimes) is
    adopted, re-keyed in place, not recomputed."""
    import os
    import shutil

    import pyarrow.parquet as pq

    from core.storage import read_cache_key, write_parquet_atomic
    from inference.batch_predict import model_digest, plan_batch, predict_shard, stat_key

    photos = sorted(p for p in scenes_dir.iterdir() if p.suffix == ".jpg")[:4]
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i, photo in enumerate(photos):
        shutil.copy(photo, folder / f"{i}.jpg")
    digest, settings = model_digest(onnx_model), {"threshold": None}

    def plan():
        return plan_batch([folder], out, 2, digest, settings)

    first = plan()
    assert [s.name for s in first.todo] == ["00000", "00001"]
    analyzer = FaceAnalyzer(onnx_model)
    results = [predict_shard(analyzer, out, int(s.name), False) for s in first.todo]
    assert [r.reused for r in results] == [False, False]
    assert sum(r.status_counts["faces"] for r in results) > 0
    files = sorted((out / "shards").glob("shard-*.parquet"))
    written = [f.stat().st_mtime_ns for f in files]

    for i, photo in enumerate(sorted(folder.iterdir())):  # a copy: same bytes, new times
        os.utime(photo, ns=(10**18 + i, 10**18 + i))
    assert plan().todo == [] and [f.stat().st_mtime_ns for f in files] == written

    shutil.copy(photos[0], folder / "3.jpg")  # other bytes in the second shard
    assert [s.name for s in plan().todo] == ["00001"]

    again = plan()
    old = stat_key(again.shards[0], digest, settings)  # shard 0 as a kface before 2026-12
    write_parquet_atomic(files[0], pq.read_table(files[0]).replace_schema_metadata(None),
                         old, digest=False)
    adopted = plan()
    assert adopted.stored[0] is not None and [s.name for s in adopted.todo] == ["00001"]
    assert read_cache_key(files[0]) == pq.read_table(out / "plan.parquet").column("key")[0].as_py()


def test_a_strip_of_three_portraits_gives_each_face_as_alone(aaf_dir):
    """A 1460x512 strip of three portraits: squashed square (as photos of usual shapes
    are), its faces were flattened and two were lost; it keeps its aspect now, and each
    face gets the box shape and the answers it gets alone (the shipped model)."""
    from models.analyzer import FaceAnalyzer
    from models.detector import box_iou

    analyzer = FaceAnalyzer(None)
    files = sorted(aaf_dir.glob("*.jpg"))
    portraits = []
    for f in (files[10], files[2000], files[3000]):
        image = cv2.imread(str(f))
        portraits.append(cv2.resize(image, (round(image.shape[1] * 512 / image.shape[0]),
                                            512)))
    pad = np.full((512, 1460 - sum(p.shape[1] for p in portraits), 3), 200, np.uint8)
    strip = np.hstack([*portraits, pad])
    found = sorted(analyzer.analyze(strip), key=lambda f: f.box[0])
    assert len(found) == 3
    left = 0
    for portrait, face in zip(portraits, found, strict=True):
        alone = analyzer.analyze(portrait)
        assert len(alone) == 1
        a, s = alone[0], face
        shifted = (s.box[0] - left, s.box[1], s.box[2] - left, s.box[3])
        assert box_iou(a.box, shifted) > 0.85, (a.box, shifted)
        assert (a.gender, a.age_band) == (s.gender, s.age_band)
        assert abs(a.age - s.age) <= 2.5
        left += portrait.shape[1]


def _walk_clip(path, faces, frames, size=(960, 540), face=(150, 170)):
    """A 10 fps clip of ``faces``: each (image, x of frame 0, x step a frame, y offset)
    walking across a grey wall, cut by the frame's edges as it enters or leaves; later
    ones in front."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    top = (height - face[1]) // 2
    for i in range(frames):
        frame = np.full((height, width, 3), 110, np.uint8)
        for image, x0, step, dy in faces:
            x = x0 + i * step
            a, b = max(0, x), min(width, x + face[0])
            if b > a:
                frame[top + dy:top + dy + face[1], a:b] = cv2.resize(image, face)[:, a - x:b - x]
        writer.write(frame)
    writer.release()


def test_tracks_do_not_split_a_face_entering_at_the_edge_or_two_crossing(aaf_dir, tmp_path):
    """One visitor per person (the shipped model): a face walking in slowly from the
    right edge (its cut thumbnails looked unlike the whole face, and split it in two
    visitors), and two faces crossing (one noisy thumbnail started a second track that
    took turns with the first on one box: three visitors for two); each crossing visitor
    keeps its own person's gender."""
    from inference.video import analyze_video
    from models.analyzer import FaceAnalyzer

    analyzer = FaceAnalyzer(None)
    files = sorted(aaf_dir.glob("*.jpg"))
    image = {k: cv2.imread(str(files[k])) for k in (2000, 3000, 11)}
    _walk_clip(tmp_path / "edge.mp4", [(image[2000], 960, -3, 0)], 90)
    summary = analyze_video(analyzer, str(tmp_path / "edge.mp4"), tmp_path / "e")
    assert summary["visitors"] == 1, summary

    _walk_clip(tmp_path / "cross.mp4", [(image[3000], 60, 10, -20),
                                        (image[11], 960 - 210, -10, 20)], 70)
    summary = analyze_video(analyzer, str(tmp_path / "cross.mp4"), tmp_path / "c")
    assert summary["visitors"] == 2, summary
    visitors = [json.loads(x) for x in (tmp_path / "c" / "tracks.jsonl").open()]
    counted = sorted((v for v in visitors if v["counted"]), key=lambda v: v["first_frame"])
    alone = {k: analyzer.analyze(image[k])[0].gender
             for k in (3000, 11)}
    assert sorted(v["gender"] for v in counted) == sorted(alone.values())
