"""Temperature scaling (``models.calibration``) on simulated populations with a known
answer, and the fitted temperature in a trained model folder, applied at inference."""

import json
import shutil

import numpy as np
import pytest

from models.calibration import (
    apply_temperature,
    calibrate,
    calibration_error,
    calibration_report,
    ece_floor,
    fit_temperature,
    fit_temperature_bias,
    nll,
    remove_calibration,
)


def population(n=6000, k=4, seed=0):
    """True class probabilities per example and labels drawn from them: calibrated."""
    rng = np.random.default_rng(seed)
    truth = rng.dirichlet(np.full(k, 0.6), size=n)
    labels = np.array([rng.choice(k, p=p) for p in truth])
    return truth, labels


def test_an_over_confident_model_gets_t_above_one_and_a_lower_ece():
    truth, labels = population()
    sharp = apply_temperature(truth, 0.5)  # a model twice as sure as it should be
    t = fit_temperature(sharp, labels)
    assert 1.7 < t < 2.3  # the known answer is 2
    after = apply_temperature(sharp, t)
    assert calibration_error(after, labels) < calibration_error(sharp, labels) / 3
    assert calibration_error(after, labels) < 0.03
    np.testing.assert_array_equal(after.argmax(1), sharp.argmax(1))  # accuracy unchanged


def test_an_under_confident_model_gets_t_below_one():
    truth, labels = population(seed=1)
    t = fit_temperature(apply_temperature(truth, 1.6), labels)
    assert 0.5 < t < 0.75  # the known answer is 1 / 1.6


def test_a_calibrated_model_keeps_t_near_one():
    truth, labels = population(seed=2)
    report = calibrate({"age_band": truth}, {"age_band": labels})["age_band"]
    assert report["temperature"] == pytest.approx(1.0, abs=0.1)
    assert report["ece_after"] < 0.03 and report["examples"] == len(labels)


def test_a_model_leaning_to_other_classes_gets_its_bias_back_and_its_argmax_mended():
    """A calibrated population seen through a model twice as sure and leaning towards
    the first classes (the mix it was trained on): temperature and bias recover the
    known answer, the argmax moves back, and only a temperature cannot do that."""
    truth, labels = population(n=8000, seed=5)
    shift = np.array([2.0, 1.0, -1.0, 0.0])
    model = apply_temperature(truth, 0.5, shift)
    t, bias = fit_temperature_bias(model, labels)
    assert 1.8 < t < 2.2  # the known answer: T = 2, bias = -shift / 2 (the last class 0)
    np.testing.assert_allclose(bias, -shift / 2, atol=0.15)
    after = apply_temperature(model, t, bias)
    assert calibration_error(after, labels) < 0.025
    right = lambda p: (p.argmax(1) == labels).mean()  # noqa: E731
    assert right(after) > right(model) + 0.02 and abs(right(after) - right(truth)) < 0.01
    t_only = apply_temperature(model, fit_temperature(model, labels))
    assert nll(after, labels) < nll(t_only, labels) - 0.02
    np.testing.assert_allclose(remove_calibration(after, t, bias), model, atol=1e-9)
    report = calibrate({"age_band": model, "gender": truth[:, :2] / truth[:, :2].sum(1,
                        keepdims=True)}, {"age_band": labels, "gender": labels % 2},
                       bias_heads=("age_band",))
    assert report["age_band"]["bias"] == bias and "bias" not in report["gender"]
    assert fit_temperature_bias(model[:0], labels[:0]) == (1.0, [0.0] * 4)


def test_the_ece_floor_is_what_calibrated_models_show_on_as_many_examples():
    """Twenty calibrated populations of 400: their ECE averages the floor's mean and
    stays under its 95th percentile about 95% of the time; the floor shrinks with n."""
    observed, floors, inside = [], [], 0
    for seed in range(20):
        truth, labels = population(n=400, seed=100 + seed)
        floor = ece_floor(truth)
        observed.append(calibration_error(truth, labels))
        floors.append(floor["mean"])
        inside += observed[-1] <= floor["p95"]
    assert 0.75 < np.mean(observed) / np.mean(floors) < 1.33
    assert inside >= 16  # 19 expected
    truth, _ = population(n=6400, seed=7)
    assert ece_floor(truth)["mean"] < ece_floor(truth[:400])["mean"] / 2.5  # ~1/sqrt(n)


def test_an_over_confident_model_is_told_apart_from_the_floor():
    truth, labels = population(n=2000, seed=4)  # (1 in 20 calibrated ones lies above p95)
    sharp = apply_temperature(truth, 0.5)
    before = calibration_report(sharp, labels, 1.0)
    assert not before["consistent"] and before["ece_after"] > 2 * before["ece_floor"]["p95"]
    after = calibration_report(sharp, labels, fit_temperature(sharp, labels))
    assert after["consistent"]
    assert calibration_report(sharp[:0], labels[:0], 1.0)["ece_floor"]["mean"] is None


def test_the_trained_model_carries_its_temperature_and_inference_applies_it(tiny_run,
                                                                          tmp_path):
    from models.analyzer import FaceAnalyzer

    labels = json.loads((tiny_run["model_dir"] / "labels.json").read_text())
    assert set(labels["temperature"]) == {"gender", "age_band"}
    assert all(0.05 <= t <= 20 for t in labels["temperature"].values())
    assert labels["calibration"]["split"] == "val"
    assert labels["calibration"]["age_band"]["ece_after"] <= \
        labels["calibration"]["age_band"]["ece_before"] + 1e-9  # fitted on that split
    analyzer = FaceAnalyzer(tiny_run["model_dir"])
    batch = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    raw = analyzer.model(batch)
    got = analyzer.classify(batch)
    for head in ("gender", "age_band"):
        np.testing.assert_allclose(got[head],
                                   apply_temperature(raw[head], labels["temperature"][head]))
    # a model calibrated with a bias (train.calibration_bias): every path adds it
    biased = tmp_path / "biased"
    shutil.copytree(tiny_run["model_dir"], biased)
    bias = [0.5, -0.25, 0.25, 0.0]
    (biased / "labels.json").write_text(json.dumps({**labels, "bias": {"age_band": bias}}))
    got = FaceAnalyzer(biased).classify(batch)
    np.testing.assert_allclose(got["age_band"], apply_temperature(
        raw["age_band"], labels["temperature"]["age_band"], bias), rtol=1e-5)
    assert not np.allclose(got["age_band"], apply_temperature(
        raw["age_band"], labels["temperature"]["age_band"]), atol=1e-3)
