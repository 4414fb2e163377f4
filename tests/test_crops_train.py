"""Crop cache and a tiny real training run on real faces (no Prefect: the stage functions)."""

import json
import os

import cv2
import numpy as np
import pytest

from models.classifier import load_classifier
from models.detector import DetectorConfig
from models.scoring import write_report
from tasks.crops import CropConfig, crop_images
from tasks.detect import detect_images
from tasks.evaluate import evaluation_metrics, predict_frame
from tasks.select import DataConfig, SelectionConfig, select_images
from tasks.train import load_history


def test_cached_crop_equals_a_direct_crop(kface_tree):
    manifest, _ = select_images(DataConfig(root=kface_tree), SelectionConfig())
    rel = manifest.column("path").to_pylist()[5]
    row = detect_images(kface_tree, [rel], DetectorConfig()).to_pylist()[0]
    box = (row["left"], row["top"], row["right"], row["bottom"])
    cached = crop_images(kface_tree, [rel], [box], CropConfig(size=112)).to_pylist()[0]
    decoded = cv2.imdecode(np.frombuffer(cached["image"], np.uint8), cv2.IMREAD_COLOR)
    photo = cv2.imread(str(kface_tree / rel))
    direct = cv2.resize(photo[box[1]:box[3], box[0]:box[2]], (112, 112),
                        interpolation=cv2.INTER_AREA)
    assert decoded.shape == direct.shape == (112, 112, 3)
    assert np.abs(decoded.astype(int) - direct.astype(int)).mean() < 2.0  # JPEG q95 only


def test_tiny_training_writes_every_artifact_and_reloads(tiny_run, tmp_path):
    examples, model_dir = tiny_run["examples"], tiny_run["model_dir"]
    assert tiny_run["merge_report"]["faces"] >= 280
    assert sum(len(examples[p]) for p in ("train", "val", "test")) == len(tiny_run["frame"])
    assert tiny_run["result"]["epochs_run"] == 2
    for name in ("model.keras", "labels.json", "history.json", "history.csv"):
        assert (model_dir / name).exists(), name
    labels = json.loads((model_dir / "labels.json").read_text())
    assert labels["age_band"] == ["20s", "30s", "40s", "50s"] and labels["crop"]["size"] == 64
    assert list((tiny_run["work"] / "logs").rglob("events.out.tfevents.*"))
    model = load_classifier(model_dir / "model.keras")
    files = tiny_run["crops"].files
    probs = predict_frame(model, examples["val"], files, 64)
    again = predict_frame(load_classifier(model_dir / "model.keras"), examples["val"], files,
                          64)
    np.testing.assert_allclose(probs["gender"], again["gender"], atol=1e-6)
    np.testing.assert_allclose(probs["age_band"].sum(1), 1.0, atol=1e-4)
    # the exact-age head: the band is its distribution summed over each band's ten years
    assert tiny_run["result"]["heads"] == labels["outputs"] == ["gender", "age_band", "age"]
    assert probs["age"].shape == (len(examples["val"]), 40)
    np.testing.assert_allclose(probs["age_band"], probs["age"].reshape(-1, 4, 10).sum(2),
                               atol=1e-5)
    temperature = json.loads((model_dir / "labels.json").read_text())["temperature"]
    metrics = evaluation_metrics(model, tiny_run["crops"], 64,
                                 calibration={h: (t, None) for h, t in temperature.items()})
    assert metrics["scored_split"] == "test" and metrics["examples"] == len(examples["test"])
    assert metrics["validation"]["examples"] == len(examples["val"])
    assert 0 <= metrics["age_band"]["accuracy"] <= metrics["age_band"][
        "accuracy_within_one_band"] <= 1
    for head in ("gender", "age_band"):
        lo, hi = metrics[head]["ci95"]["accuracy"]
        assert lo <= metrics[head]["accuracy"] <= hi and hi - lo > 0
        assert 0 <= metrics[head]["baselines"]["majority_class"]["accuracy"] <= 1
    report = write_report(metrics, load_history(model_dir), tiny_run["split_report"],
                          {"joint_class_counts": {}}, tmp_path / "reports")
    for name in ("metrics.json", "confusion_gender.png", "confusion_age_band.png",
                 "confusion_age_band.json", "curve_gender.png", "curve_age_band.png",
                 "curve_loss.png", "reliability.png"):
        assert (tmp_path / "reports" / name).stat().st_size > 0, name
    for head in ("gender", "age_band"):  # the test split's calibration, before and after
        c = metrics["calibration"][head]
        assert c["temperature"] == temperature[head] and 0 <= c["ece_after"] <= 1
        assert sum(b["n"] for b in c["reliability_after"]) == len(examples["test"])
    text = report.read_text()
    assert "| gender |" in text and "within one band" in text
    assert "Scored on **test**" in text and "majority class" in text
    assert "## Calibration" in text and "reliability.png" in text
    assert f"only {metrics['subjects']} people are scored" in text  # ~45 test people
    true_ages = examples["test"].age.to_numpy()
    assert 0 < metrics["age"]["mae_years"] < 40 and np.all((true_ages >= 20) & (true_ages < 60))
    assert f"mean absolute error is {metrics['age']['mae_years']:.1f} years" in text


def test_age_targets_and_labelled_ages(tmp_path, aaf_dir):
    """Soft age targets peak at the true age and sum to 1; a labelled CSV's ages reach
    the manifest, an age contradicting the given band is dropped, K-Face has none."""
    import pandas as pd

    from core.labels import AGES, band_matrix
    from models.classifier import age_targets

    targets = age_targets([20, 34.0, 59], sigma=3.0)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    assert [AGES[i] for i in targets.argmax(1)] == [20, 34, 59]
    assert targets[1, AGES.index(33)] > targets[1, AGES.index(30)] > 0
    assert band_matrix()[AGES.index(29)].tolist() == [1, 0, 0, 0]
    assert band_matrix()[AGES.index(30)].tolist() == [0, 1, 0, 0]
    labels = pd.read_csv(aaf_dir / "labels.csv").head(3)
    for f in labels.file:
        (tmp_path / f).symlink_to(aaf_dir / f)
    rows = labels.assign(age_band=["40s", "", "20s"], age=["25", str(labels.age[1]), ""])
    rows.to_csv(tmp_path / "labels.csv", index=False)
    table, _ = select_images(DataConfig(root=tmp_path, layout="labelled"), SelectionConfig())
    ages = dict(zip(table.column("path").to_pylist(), table.column("age").to_pylist(),
                    strict=True))
    assert ages[labels.file[0]] is None  # 25 contradicts 40s: the band wins, no age
    assert ages[labels.file[1]] == labels.age[1]
    assert ages[labels.file[2]] is None  # a band without an age


def test_intervals_resample_people_not_photos():
    """20 people x 50 photos: 10 always right, 10 always wrong. Photos are not
    independent draws: the interval must be about as wide as 20 coin flips allow."""
    from models.scoring import subject_bootstrap

    subjects = np.repeat(np.arange(20), 50)
    true = np.zeros(1000, int)
    pred = np.where(subjects < 10, 0, 1)
    lo, hi = subject_bootstrap(subjects, {"gender": (true, pred, 2)})["gender"]["accuracy"]
    assert lo <= 0.3 and hi >= 0.7  # photo resampling would give about 0.47-0.53
    perfect = subject_bootstrap(subjects, {"age_band": (true, true, 4)})["age_band"]
    assert perfect == {"accuracy": [1.0, 1.0], "macro_f1": [0.25, 0.25],
                       "accuracy_within_one_band": [1.0, 1.0]}


def test_baselines_are_what_ignoring_the_face_scores():
    from models.scoring import baselines

    gender = baselines(np.array([30, 70]), np.array([0] * 5 + [1] * 5), "gender")
    assert gender["majority_class"]["accuracy"] == 0.5 and gender["majority_class"]["class"] == 1
    assert gender["class_prior"]["accuracy"] == pytest.approx(0.3 * 0.5 + 0.7 * 0.5)
    age = baselines(np.array([10, 20, 30, 40]), np.zeros(8, int), "age_band")
    assert age["majority_class"]["accuracy"] == 0 and age["majority_class"][
        "accuracy_within_one_band"] == 0
    assert age["class_prior"]["accuracy"] == pytest.approx(0.1)
    assert age["class_prior"]["accuracy_within_one_band"] == pytest.approx(0.3)


def test_legacy_lr_schedule_is_the_originals():
    from tasks.train import legacy_exp_decay

    assert legacy_exp_decay(0) == pytest.approx(0.01)
    assert legacy_exp_decay(1) == pytest.approx(0.009048374180359595)  # the blog's epoch 2


def test_metrics_from_the_confusion_matrix_match_scikit_learn():
    """The report's metrics are computed from confusion matrices with numpy (so evaluation
    runs where scikit-learn is missing, and the bootstrap reuses them): same numbers."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    from models.scoring import head_metrics

    rng = np.random.default_rng(0)
    for k, trial in [(k, t) for k in (2, 4) for t in range(20)]:
        true = rng.integers(0, k, 200)
        pred = rng.integers(0, k - 1 if trial % 3 == 0 else k, 200)  # a class never predicted
        m = head_metrics(true, pred, tuple(map(str, range(k))))
        labels = list(range(k))
        assert m["accuracy"] == pytest.approx(accuracy_score(true, pred))
        assert m["macro_f1"] == pytest.approx(f1_score(true, pred, labels=labels,
                                                       average="macro", zero_division=0))
        p, r, f, _ = precision_recall_fscore_support(true, pred, labels=labels,
                                                     zero_division=0)
        for name, ref in (("precision", p), ("recall", r), ("f1", f)):
            assert [m["per_class"][str(i)][name] for i in labels] == pytest.approx(list(ref))


def test_a_long_cpu_training_is_announced_or_refused(caplog):
    """This machine has no GPU: a K-Face-sized ResNet50 training is announced with its
    estimate before it starts, or refused with train.require_gpu; a small one is not."""
    import logging

    from tasks.train import GPURequiredError, TrainConfig, check_device

    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        assert check_device(300_000, 224, "resnet50", TrainConfig(epochs=10)) == []
    assert "no GPU visible to Keras" in caplog.text and "166.7 h" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        check_device(300, 64, "small_cnn", TrainConfig(epochs=2))
    assert not caplog.text
    with pytest.raises(GPURequiredError, match="train.require_gpu is set"):
        check_device(300, 64, "small_cnn", TrainConfig(epochs=2, require_gpu=True))


def test_flip_averaged_model_averages_the_mirror_and_reloads(tiny_run, tmp_path):
    from models.classifier import flip_averaged, load_classifier
    from tasks.crop_stream import crop_batches

    model = load_classifier(tiny_run["model_dir"] / "model.keras")
    images = crop_batches(tiny_run["examples"]["val"].head(8), tiny_run["crops"].files, 64, 8,
                          labels=False)[0]
    wrapped = flip_averaged(model)
    wrapped.save(tmp_path / "model.keras")
    reloaded = load_classifier(tmp_path / "model.keras")  # safe mode: registered layers only
    direct = model.predict(images, verbose=0)
    mirrored = model.predict(images[:, :, ::-1], verbose=0)
    got = reloaded.predict(images, verbose=0)
    for head in ("gender", "age_band"):
        np.testing.assert_allclose(got[head], (direct[head] + mirrored[head]) / 2, atol=1e-5)
        assert not np.allclose(direct[head], mirrored[head], atol=1e-4)  # a real second view

    # its ONNX export is the single-view network; the mirror pass runs outside it, as asked
    import json

    from models.backends import load_backend
    from models.export import export_model

    labels = json.loads((tiny_run["model_dir"] / "labels.json").read_text())
    (tmp_path / "labels.json").write_text(json.dumps({**labels, "flip_average": True}))
    export_model(tmp_path, tmp_path / "onnx", "onnx")
    exported = json.loads((tmp_path / "onnx" / "labels.json").read_text())
    assert exported["onnx_mirror"] == "runtime"
    averaging, _ = load_backend(tmp_path / "onnx")  # flip_average: mirrored by default
    single, _ = load_backend(tmp_path / "onnx", mirror=False)
    assert averaging.mirror and not single.mirror
    for head in ("gender", "age_band"):
        np.testing.assert_allclose(averaging(images)[head], got[head], atol=1e-4)
        np.testing.assert_allclose(single(images)[head], direct[head], atol=1e-4)


def test_a_degenerate_model_is_flagged_at_the_top_and_the_heads_are_explained():
    """A model that always answers one gender and one age band gets warnings (recall 0,
    no better than the majority class); a sound one gets none. The heads sentence says why
    there is no exact-age head."""
    import pandas as pd

    from models.scoring import degenerate_warnings, heads_sentence, score_split

    rng = np.random.default_rng(0)
    n = 200
    frame = pd.DataFrame({"subject_id": np.arange(n), "gender_idx": rng.integers(0, 2, n),
                          "age_idx": rng.integers(0, 4, n)})
    frame["joint_class"] = frame.age_idx.astype(str) + "_" + frame.gender_idx.astype(str)
    counts = {"gender": np.array([60, 40]), "age_band": np.array([40, 30, 20, 10])}
    constant = {"gender": np.tile([0.9, 0.1], (n, 1)),
                "age_band": np.tile([0.7, 0.1, 0.1, 0.1], (n, 1))}
    warnings = degenerate_warnings(score_split(frame, constant, counts, rounds=50))
    assert any("never recognises gender F" in w for w in warnings)
    assert any("age_band accuracy" in w and "majority class" in w for w in warnings)
    right = {"gender": np.eye(2)[frame.gender_idx] * 0.8 + 0.1,
             "age_band": np.eye(4)[frame.age_idx] * 0.6 + 0.1}
    assert degenerate_warnings(score_split(frame, right, counts, rounds=50)) == []

    heads = {"heads": ["age_band", "gender"]}
    assert "model.exact_age is off" in heads_sentence({**heads, "labels_have_ages": True})
    assert "no exact ages" in heads_sentence({**heads, "labels_have_ages": False})


def test_weight_averaging_validates_and_saves_the_averaged_weights(tiny_run, tmp_path):
    """With train.ema_momentum the validation, the best checkpoint and the saved model use
    the averaged weights. An average that barely moves (momentum 0.99999) keeps the saved
    weights where the first step left them, while six Adam steps move the raw ones; and the
    saved model scores exactly what the history says of its epoch."""
    import keras

    from models.classifier import ModelConfig, build_classifier
    from tasks.train import TrainConfig, train_model

    result = train_model(tiny_run["crops"], 64, ModelConfig(backbone="small_cnn"),
                         TrainConfig(epochs=2, batch_size=32, steps_per_epoch=3,
                                     ema_momentum=0.99999, early_stopping_patience=0),
                         tmp_path / "model", tmp_path / "logs", {"margin": 0.2})
    saved = load_classifier(tmp_path / "model" / "model.keras")
    keras.utils.set_random_seed(777)  # what train_model builds its network after
    initial = build_classifier(ModelConfig(backbone="small_cnn"), 64)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(saved.trainable_weights, initial.trainable_weights,
                                strict=True))
    # Keras starts the average at the weights after the first step: one Adam step (at most
    # about the learning rate, 1e-3) from the initial values; the raw weights, saved
    # without the swap, are six steps away (2.7e-3 here)
    assert moved < 1.2e-3
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    val = tiny_run["examples"]["val"]
    probs = predict_frame(saved, val, tiny_run["crops"].files, 64)
    accuracy = float(np.mean(probs["age_band"].argmax(1) == val.age_idx.to_numpy()))
    best = result["best_epoch"] - 1
    assert accuracy == pytest.approx(history["val_age_band_accuracy"][best], abs=1e-6)


def test_training_batches_have_one_shape_and_evaluation_batches_every_row_once(tiny_run):
    """A shuffled (training) stream completes its last batch with the epoch's first rows,
    so the train step sees one batch shape (JAX and TensorFlow compile it once); every
    face still comes once an epoch. Evaluation's stream keeps each row once, in order."""
    from tasks.crop_stream import crop_batches

    index = tiny_run["examples"]["train"].head(21).reset_index(drop=True)
    files = tiny_run["crops"].files
    train = crop_batches(index, files, 64, 8, seed=5)
    batches = [train[i] for i in range(len(train))]
    assert [b[0].shape for b in batches] == [(8, 64, 64, 3)] * 3
    assert all(len(b[2]) == 8 and len(b[1]["gender"]) == 8 for b in batches)
    assert len(train.order) == 21 and sorted(train.order) == list(range(21))
    scored = crop_batches(index, files, 64, 8, labels=False)
    assert [scored[i].shape[0] for i in range(len(scored))] == [8, 8, 5]


def test_the_loader_decodes_in_processes_on_a_gpu_and_in_threads_on_the_cpu():
    """``train.loader: auto`` (the default): the GPU's feeding loop keeps its GIL."""
    from tasks.train import TrainConfig, loader_kind

    assert TrainConfig().loader == "auto"
    assert loader_kind(TrainConfig(), ["cuda:0"]) == "processes"
    assert loader_kind(TrainConfig(), []) == "threads"
    assert loader_kind(TrainConfig(loader="threads"), ["cuda:0"]) == "threads"
    assert loader_kind(TrainConfig(loader="processes"), []) == "processes"
    assert "loader" not in TrainConfig().key_settings()  # a performance setting only


def test_decoding_processes_give_the_batches_the_threads_give(tiny_run):
    """``train.loader: processes``: the same augmented batches, decoded in spawned
    processes (which run ``decode_batch`` as the threads do), and the processes stop."""
    from tasks.crop_stream import AugmentConfig, DecodeProcesses, crop_batches

    index = tiny_run["examples"]["train"].head(20).reset_index(drop=True)
    files = tiny_run["crops"].files
    args = dict(seed=3, augment_cfg=AugmentConfig(), workers=2)
    threads = crop_batches(index, files, 64, 8, **args)
    decoder = DecodeProcesses(2, 8, 64)
    processes = crop_batches(index, files, 64, 8, decoder=decoder, **args)
    try:
        for i in range(len(threads)):
            a, b = threads[i], processes[i]
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1]["age_band"], b[1]["age_band"])
        workers, slots = decoder.processes, [slot.name for slot in decoder.slots]
        assert workers and all(w.pid != os.getpid() and w.is_alive() for w in workers)
    finally:
        decoder.close()
    assert not any(w.is_alive() for w in workers)
    for name in slots:  # the shared-memory slots are gone with them
        assert not os.path.exists(f"/dev/shm/{name.lstrip('/')}")
