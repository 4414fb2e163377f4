"""``kface stats``: the interval estimator on simulated populations with a known answer,
and the command on real predictions and tracks files."""

import json

import numpy as np
import pytest
from conftest import make_video, run_kface

from inference.stats import counts_with_intervals, mix_corrected_counts, soft_confusion


@pytest.fixture(scope="module")
def analyzer(tiny_run):
    from models.analyzer import FaceAnalyzer

    return FaceAnalyzer(tiny_run["model_dir"])


def draw(rng, probs):
    """One class per row, drawn from that row's probabilities."""
    return (rng.random(len(probs))[:, None] > np.cumsum(probs, 1)[:, :-1]).sum(1)


def test_intervals_cover_the_true_count_of_a_calibrated_population():
    """500 visitors whose class probabilities are calibrated (their classes drawn from
    them): over 400 shops the true count of each class falls inside the 95% interval in
    about 95% of them, and the estimate is unbiased."""
    rng = np.random.default_rng(0)
    names = ["20s", "30s", "40s", "50s"]
    inside, errors = np.zeros(4), []
    shops = 400
    for _ in range(shops):
        probs = rng.dirichlet([0.8, 0.6, 0.4, 0.3], size=500)
        truth = draw(rng, probs)
        counts = counts_with_intervals(probs, names)
        true = np.bincount(truth, minlength=4)
        for k, name in enumerate(names):
            c = counts[name]
            inside[k] += c["low"] <= true[k] <= c["high"]
        errors.append([counts[n]["estimate"] - true[k] for k, n in enumerate(names)])
    coverage = inside / shops
    assert np.all(coverage >= 0.92) and np.all(coverage <= 0.985), coverage
    assert np.all(np.abs(np.mean(errors, 0)) < 1.5)  # unbiased


def test_over_confident_probabilities_give_intervals_that_miss():
    """Why calibration matters: the same population with probabilities sharpened (an
    over-confident model) covers the truth far less often."""
    from models.calibration import apply_temperature

    rng = np.random.default_rng(1)
    inside, shops = 0, 200
    for _ in range(shops):
        probs = rng.dirichlet([0.8, 0.6, 0.4, 0.3], size=500)
        truth = draw(rng, probs)
        c = counts_with_intervals(apply_temperature(probs, 0.4), ["a", "b", "c", "d"])["d"]
        inside += c["low"] <= np.bincount(truth, minlength=4)[3] <= c["high"]
    assert inside / shops < 0.8


def test_mix_corrected_counts_cover_a_shop_whose_mix_differs():
    """A simulated model whose probabilities of a person of class k follow Dirichlet(1 +
    3 e_k) (weak, like the age head): summed probabilities lean towards an even mix, so a
    young shop's counts are biased and their intervals miss. With a reference of 150
    labelled people per class, the mix-corrected counts are closer to the truth and their
    95% intervals cover every class's true count in >= 90% of shops."""
    rng = np.random.default_rng(2)
    names, k = ["20s", "30s", "40s", "50s"], 4

    def people(classes):
        return np.array([rng.dirichlet(1 + 3 * np.eye(k)[c]) for c in classes])

    ref_truth = np.repeat(np.arange(k), 150)
    reference = soft_confusion(people(ref_truth), ref_truth, names)
    assert [reference["rows"][n]["people"] for n in names] == [150] * 4
    shops, inside, summed_in = 60, np.zeros(k), np.zeros(k)
    wrong = {"summed": [], "corrected": []}
    for _ in range(shops):
        truth = rng.choice(k, size=500, p=[0.55, 0.30, 0.10, 0.05])
        true = np.bincount(truth, minlength=k)
        probs = people(truth)
        corrected, effective = mix_corrected_counts(probs, reference, rng)
        assert effective > 200  # the importance draws are not degenerate
        for name, counts in (("summed", counts_with_intervals(probs, names)),
                             ("corrected", corrected)):
            est = np.array([counts[n]["estimate"] for n in names])
            wrong[name].append(np.abs(est - true).sum() / 1000)
            hits = np.array([counts[n]["low"] <= t <= counts[n]["high"]
                             for n, t in zip(names, true, strict=True)])
            if name == "corrected":
                inside += hits
                assert all(counts[n]["low"] <= counts[n]["estimate"] <= counts[n]["high"]
                           for n in names)
            else:
                summed_in += hits
    assert np.all(inside / shops >= 0.9), inside / shops
    assert (summed_in / shops).min() < 0.5  # the default interval misses such a shop
    assert np.mean(wrong["corrected"]) < 0.6 * np.mean(wrong["summed"]), wrong


def test_the_moments_read_a_mix_the_means_cannot():
    """Two classes whose people get the same mean probabilities: class a's people are
    unsure (near 0.5), class b's confident either way (near 0 or 1). Their means cannot
    tell a shop's mix; the squares can, so the corrected counts find a shop of 80% a and
    cover it. A reference without the moments (a kface before them) still works, on the
    means alone: its interval stays wide, as it must."""
    rng = np.random.default_rng(5)
    names = ["a", "b"]

    def people(classes):
        unsure = rng.beta(40, 40, len(classes))
        confident = np.where(rng.random(len(classes)) < 0.5, rng.beta(1, 30, len(classes)),
                             rng.beta(30, 1, len(classes)))
        p = np.where(classes == 0, unsure, confident)
        return np.stack([p, 1 - p], 1)

    ref_truth = np.repeat([0, 1], 200)
    reference = soft_confusion(people(ref_truth), ref_truth, names)
    truth = rng.choice(2, size=500, p=[0.8, 0.2])
    true = np.bincount(truth, minlength=2)
    probs = people(truth)
    counts, _ = mix_corrected_counts(probs, reference, rng)
    assert abs(counts["a"]["estimate"] - true[0]) < 25, (counts, true)
    assert counts["a"]["low"] <= true[0] <= counts["a"]["high"], (counts, true)
    means_only = {**reference, "rows": {n: {k: v for k, v in r.items() if k != "moments"}
                                        for n, r in reference["rows"].items()}}
    counts, _ = mix_corrected_counts(probs, means_only, rng)
    assert counts["a"]["high"] - counts["a"]["low"] > 200, counts


def test_a_reference_from_before_the_moments_is_read_with_a_warning(tmp_path):
    """A soft_confusion.json of an older kface (no moments) still corrects counts, on the
    means alone, and says so; so does one with fewer than 30 people of a class."""
    from core.labels import AGE_BANDS, GENDERS
    from inference.stats import load_reference, reference

    rng = np.random.default_rng(6)
    names = {"age_band": list(AGE_BANDS), "gender": list(GENDERS)}
    truth = {"age_band": np.repeat(np.arange(4), 40), "gender": np.tile([0, 1], 80)}
    probs = {"age_band": rng.dirichlet(np.ones(4), 160), "gender": rng.dirichlet([1, 1], 160)}
    made = reference(probs, truth, names)
    path = tmp_path / "soft_confusion.json"
    path.write_text(json.dumps(made))
    warnings = load_reference(path, names)[1]
    assert not any("before 2026-12-05" in w for w in warnings)
    # 20 people per band x gender cell: those cells on the means alone, said once
    assert sum("cells are corrected on the mean probabilities alone" in w
               for w in warnings) == 1, warnings
    for head in made["heads"].values():
        for row in head["rows"].values():
            del row["moments"]
    path.write_text(json.dumps(made))
    ref, warnings = load_reference(path, names)
    assert any("before 2026-12-05" in w and "mean probabilities alone" in w
               for w in warnings), warnings
    counts, _ = mix_corrected_counts(probs["age_band"][:50], ref["heads"]["age_band"], rng)
    assert abs(sum(c["estimate"] for c in counts.values()) - 50) < 0.5


def test_a_model_that_cannot_tell_the_bands_apart_gives_wide_intervals():
    """Every band's people get the same probabilities (an untrained model): the shop's
    mix cannot be read from them, so the corrected counts must stay wide, not pile the
    visitors into one band with a narrow interval."""
    rng = np.random.default_rng(4)
    names = ["20s", "30s", "40s", "50s"]
    ref_truth = np.repeat(np.arange(4), [16, 16, 5, 3])
    reference = soft_confusion(rng.dirichlet([40, 55, 45, 20], len(ref_truth)), ref_truth,
                               names)
    counts, _ = mix_corrected_counts(rng.dirichlet([40, 55, 45, 20], 12), reference, rng)
    assert all(counts[n]["estimate"] < 8 for n in names), counts
    assert all(counts[n]["high"] - counts[n]["low"] >= 4 for n in names), counts


def test_stats_of_predictions_and_tracks(analyzer, scenes_dir, aaf_dir, tmp_path):
    from inference.predict import predict_images
    from inference.video import analyze_video

    predict_images(analyzer, [scenes_dir / "insightface_t1.jpg"], tmp_path / "p")
    res = run_kface("stats", str(tmp_path / "p" / "predictions.json"), "--out",
                    str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["visitors"] == 6
    assert stats["made_by"] == {k: v for k, v in json.loads(
        (tmp_path / "p" / "predictions.json").read_text()).items() if k != "images"}
    assert stats["made_by"]["model"]["id"] == stats["model_id"] and "detector" in \
        stats["made_by"]
    for head in ("age_band", "gender", "joint"):
        total = sum(c["estimate"] for c in stats[head].values())
        assert abs(total - 6) < 0.2, head  # the probabilities of six people
        assert all(0 <= c["low"] <= c["estimate"] <= c["high"] <= 6
                   for c in stats[head].values())
    assert sum(stats["diagnostic_most_likely_class"]["age_band"].values()) == 6
    assert "20s_M" in res.stdout and "most likely" not in res.stdout  # one headline
    clip = tmp_path / "clip.mp4"
    make_video(clip, aaf_dir)
    analyze_video(analyzer, str(clip), tmp_path / "v", min_seconds=2.5)  # counts A only
    res = run_kface("stats", str(tmp_path / "v" / "tracks.jsonl"), "--out",
                    str(tmp_path / "t"))
    assert res.returncode == 0, res.stderr[-2000:]
    counted = json.loads((tmp_path / "t" / "stats.json").read_text())
    assert counted["visitors"] == 1 and counted["made_by"]["model"]["id"] == stats["model_id"]


def test_video_stats_with_a_reference(tiny_run, aaf_dir, tmp_path):
    """video --stats --reference writes mix-corrected counts with intervals into its
    stats.json; --reference without --stats, or a reference that is not one, is one line
    before any frame is read."""
    from core.labels import AGE_BANDS, GENDERS
    from inference.stats import reference

    rng = np.random.default_rng(3)
    truth = {"age_band": np.repeat(np.arange(4), 40), "gender": np.tile([0, 1], 80)}
    probs = {"age_band": np.array([rng.dirichlet(1 + 3 * np.eye(4)[c])
                                   for c in truth["age_band"]]),
             "gender": np.array([rng.dirichlet(1 + 9 * np.eye(2)[c])
                                 for c in truth["gender"]])}
    ref = tmp_path / "soft_confusion.json"
    ref.write_text(json.dumps(reference(probs, truth, {"age_band": list(AGE_BANDS),
                                                       "gender": list(GENDERS)})))
    clip = tmp_path / "clip.mp4"
    make_video(clip, aaf_dir)
    model = str(tiny_run["model_dir"])
    res = run_kface("video", str(clip), "--model", model, "--out", str(tmp_path / "v"),
                    "--stats", "--reference", str(ref))
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((tmp_path / "v" / "stats.json").read_text())
    assert stats["estimator"].startswith("mix-corrected") and stats["visitors"] == 2
    assert stats["people"] == {c: stats["joint"][c] for c in stats["people"]}  # headline
    for head in ("age_band", "gender", "joint"):
        assert abs(sum(c["estimate"] for c in stats[head].values()) - 2) < 0.2, head
        assert all(0 <= c["low"] <= c["estimate"] <= c["high"] <= 2
                   for c in stats[head].values())
    res = run_kface("video", str(clip), "--model", model, "--out", str(tmp_path / "w"),
                    "--reference", str(ref))
    assert res.returncode == 2 and "add --stats" in res.stderr
    res = run_kface("video", str(clip), "--model", model, "--out", str(tmp_path / "w"),
                    "--summed")
    assert res.returncode == 2 and "add --stats" in res.stderr
    res = run_kface("video", str(clip), "--model", model, "--out", str(tmp_path / "w"),
                    "--stats", "--reference", str(clip))
    assert res.returncode == 2 and "is not a soft_confusion.json" in res.stderr
    assert not (tmp_path / "w").exists()


def test_stats_of_a_file_without_probabilities_is_one_line(tmp_path):
    old = tmp_path / "tracks.jsonl"
    old.write_text(json.dumps({"track_id": 1, "frames": 30, "class": "30s_M"}) + "\n")
    res = run_kface("stats", str(old), "--out", str(tmp_path / "s"))
    assert res.returncode == 2 and "no probabilities per visitor" in res.stderr
    res = run_kface("stats", str(tmp_path / "missing.json"), "--out", str(tmp_path / "s"))
    assert res.returncode == 2 and "not found" in res.stderr
    assert not (tmp_path / "s").exists()


def test_counts_too_few_to_split_by_band_say_so():
    """The one thin-counts rule (kface stats, video --stats, the counts per period): three
    visitors, even confident ones, are too few to split by band with the shipped
    reference; 400 like them are not. Summed probabilities follow the same rule."""
    from core.labels import AGE_BANDS, GENDERS
    from inference.stats import probability_stats
    from inference.video import chart_note
    from models.analyzer import DEFAULT_MODEL

    model_id = json.loads((DEFAULT_MODEL / "labels.json").read_text())["model_id"]
    names = {"gender": list(GENDERS), "age_band": list(AGE_BANDS)}
    rng = np.random.default_rng(5)
    for n, thin in ((3, True), (400, False)):
        band = rng.dirichlet([9, 1, 1, 1], n)
        gender = rng.dirichlet([1, 9], n)
        for summed in (False, True):
            stats = probability_stats(names, gender, band, model_id, summed=summed)
            assert stats["thin"] is thin, (n, summed, stats["age_band"])
            assert any("too few visitors" in w for w in stats["warnings"]) is thin
            note = chart_note(stats)  # what people.png says under its title
            assert ("too few visitors" in note) is thin
            assert note.startswith(f"{n} visitors, " + ("summed" if summed else
                                   "mix-corrected with the shipped model's own reference"))
