"""``kface stats``: people per age band, gender and their joint cells, with 95% intervals,
from a predictions file (``predictions.json``: each face is a visitor) or a tracks file
(``tracks.jsonl``: each counted visitor).

Two estimators (which one: ``visitor_stats``; for the shipped model's visitors the
mix-corrected one with its own reference, unless ``--summed``):

- **Summed probabilities** (``--summed``, or a model without a reference): each visitor
  adds their calibrated probabilities to the counts, and the interval is that of a sum
  of independent Bernoulli draws with those probabilities (Poisson-binomial: variance
  ``sum p (1 - p)``, normal approximation, clipped to 0..N). Right when the
  probabilities are calibrated for the people counted: a shop whose mix is that of the
  people the model was calibrated on (its validation people: with
  ``train.calibration_bias``, their band mix). A shop whose age mix differs gets counts
  that lean towards that mix, and an interval that misses (held-out people, 500 visitors
  of a young or an older shop: 13-19% of visitors in a wrong band, coverage near 0;
  ``bench/bench_counts.py``).
- **Mix-corrected** (``--reference``, a ``soft_confusion.json`` that ``kface evaluate``
  writes for labelled photos of people like the shop's, or the shipped model's own,
  ``models/data/default/soft_confusion.json``): label-shift estimation in the
  spirit of BBSE (Lipton et al. 2018), in Bayesian form. The reference says, per true
  class, what the model's probabilities look like (their mean, one row of the *soft
  confusion*, and covariance), and the same of their *moments*: each probability but the
  last (they sum to one) and its square (``moment_features``). A shop's mix ``pi`` then
  predicts the visitors' mean moments ``pi @ M`` with a known spread (the visitors' own
  noise and the reference's finite size); a flat Dirichlet prior on ``pi`` and that
  Gaussian likelihood give a posterior (adaptive importance sampling, a fixed seed), whose
  mean is the estimate, and whose draws of the realised counts (multinomial) give the 95%
  interval. The squares tell a class whose people the model is unsure of from one whose
  people it splits between two confident answers, which the means alone cannot: with the
  shipped model they put 0.3-0.7 points fewer of a young or older shop's visitors in a
  wrong band on the run's own AAF validation and test people (500 visitors; chosen there,
  before the held-out people were counted), 0.4-1.2 points fewer on the held-out people.
  A class with fewer than ``FEW_PEOPLE`` reference people, or a reference from a kface
  before 2026-12-05, gives the means alone.
  It assumes only that people of one class look to the model the same in the shop as in
  the reference (label shift), not that the shop's mix is the training mix. The reference
  must come from people like the shop's: one from another population (the model's own
  validation split of AAF and UTKFace faces, for AAF-only people) biases it. Measured with
  the shipped model on held-out people (500 visitors, a reference of 955;
  ``bench/bench_counts.py``, docs/model.md): the interval covers every band's true count
  in at least 96% of shops at every mix, and is about +-50 visitors per band; 6.9% / 7.7%
  of a young / an older shop's visitors land in a wrong band (7.3% / 8.9% by the means
  alone), 5.6-5.7% with a perfect reference.

NumPy only (it runs in the light install).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from core.storage import write_json_atomic

Z95 = 1.959964
INTERVAL_COVERS = ("the sampling noise given the model's probabilities, not a shop whose "
                   "age mix differs from the training data's: there the age-band counts "
                   "lean towards the training mix (held-out people, 500 visitors of a "
                   "young or older shop: 13-19% of visitors in a wrong band; "
                   "docs/training.md, 'Counts a shop can trust'). For such a shop give "
                   "--reference: a soft_confusion.json of kface evaluate on labelled "
                   "people like the shop's")
CORRECTED_COVERS = ("the visitors' sampling noise, the reference's finite size and any mix "
                    "of classes in the shop, provided the reference's people look to the "
                    "model like the shop's (conservative: the realised counts are drawn "
                    "anew from each posterior mix)")
REFERENCE_FILE = "soft_confusion.json"
MIX_DRAWS = 20_000  # importance-sampling draws of the shop's mix, over MIX_ROUNDS
MIX_ROUNDS = 8
MAX_ROUNDS = 32
MIX_DF = 5  # the proposals' Student t
FEW_DRAWS = 200  # effective draws below which the interval is rough (a warning)
MIN_PEOPLE = 2  # per class of a reference: a mean and a covariance need two
FEW_PEOPLE = 30  # per class of a reference: below this a warning, and the means alone


class StatsError(ValueError):
    """The input is not a predictions or tracks file this command can count."""


def visitor_probabilities(path: Path
                          ) -> tuple[dict[str, list[str]], np.ndarray, np.ndarray, dict]:
    """The class names, per visitor the gender and age-band probabilities, and what made
    them: a predictions file's ``model`` and ``detector``, a tracks file's model id
    (``{"model": {"id": ...}}``; the id None in a file of a kface before 2026-12)."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"{path} not found: give a predictions.json (kface predict) or a "
                         "tracks.jsonl (kface video)")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            visitors = [r for r in rows if r.get("counted", True)]
            made_by = {"model": {"id": next((r.get("model_id") for r in rows), None)}}
        else:
            from inference.predict import read_predictions

            made_by, entries = read_predictions(path)
            visitors = [f for e in entries for f in e["faces"]]
            made_by = made_by or {"model": {"id": None}}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        why = (f"not JSON: {str(exc).splitlines()[0]}" if isinstance(exc, ValueError)
               else "not the fields kface writes")
        raise StatsError(f"{path} is not a kface predictions or tracks file ({why}): give "
                         "a predictions.json (kface predict) or a tracks.jsonl (kface "
                         "video)") from None
    if any("age_band_probs" not in v or "gender_probs" not in v for v in visitors):
        raise StatsError(f"{path} has no probabilities per visitor (a tracks file of an "
                         "older kface): run kface video again")
    if not visitors:
        return {"gender": [], "age_band": []}, np.zeros((0, 2)), np.zeros((0, 4)), made_by
    names = {"gender": list(visitors[0]["gender_probs"]),
             "age_band": list(visitors[0]["age_band_probs"])}
    gender = np.array([[v["gender_probs"][n] for n in names["gender"]] for v in visitors])
    band = np.array([[v["age_band_probs"][n] for n in names["age_band"]] for v in visitors])
    return names, gender, band, made_by


def counts_with_intervals(probs: np.ndarray, names: list[str]) -> dict[str, dict]:
    """Per class: the expected count and its 95% interval (see the module docstring)."""
    probs = np.asarray(probs, np.float64)
    n = len(probs)
    estimate = probs.sum(0) if n else np.zeros(len(names))
    half = Z95 * np.sqrt((probs * (1 - probs)).sum(0)) if n else np.zeros(len(names))
    return {name: {"estimate": round(float(e), 1), "low": round(float(max(0.0, e - h)), 1),
                   "high": round(float(min(n, e + h)), 1)}
            for name, e, h in zip(names, estimate, half, strict=True)}


def moment_features(probs: np.ndarray) -> np.ndarray:
    """The statistics of each visitor whose mean the mix-corrected estimator matches: the
    probabilities of every class but the last (they sum to one), then their squares."""
    p = np.asarray(probs, np.float64)[:, :-1]
    return np.hstack([p, p ** 2])


def _mean_cov(x: np.ndarray) -> dict:
    return {"mean": x.mean(0).round(6).tolist() if len(x) else None,
            "cov": np.cov(x.T).round(8).tolist() if len(x) >= MIN_PEOPLE else None}


def soft_confusion(probs: np.ndarray, truth: np.ndarray, names: list[str],
                   subjects: np.ndarray | None = None) -> dict:
    """A head's soft confusion on labelled faces: per true class, how many people (by
    ``subjects``; faces when there are none), the mean of the model's probabilities (one
    row, over faces) and their covariance, and the same of their ``moment_features``."""
    probs, truth = np.asarray(probs, np.float64), np.asarray(truth)
    moments = moment_features(probs)
    rows = {}
    for k, name in enumerate(names):
        p = probs[truth == k]
        people = len(p) if subjects is None else len(set(np.asarray(subjects)[truth == k]))
        rows[name] = {"people": int(people), "faces": int(len(p)), **_mean_cov(p),
                      "moments": _mean_cov(moments[truth == k])}
    return {"classes": list(names), "moments": "the probabilities of every class but the "
            "last, then their squares", "rows": rows}


def joint_probabilities(band: np.ndarray, gender: np.ndarray) -> np.ndarray:
    """Per visitor, the age band x gender cells' probabilities (the heads independent)."""
    return (band[:, :, None] * gender[:, None, :]).reshape(
        len(band), band.shape[1] * gender.shape[1])


def joint_names(names: dict[str, list[str]]) -> list[str]:
    return [f"{a}_{g}" for a in names["age_band"] for g in names["gender"]]


def reference(probs: dict[str, np.ndarray], truth: dict[str, np.ndarray],
              names: dict[str, list[str]], subjects: np.ndarray | None = None) -> dict:
    """The ``soft_confusion.json`` of labelled faces (``probs``/``truth`` per head,
    ``gender`` and ``age_band``): the soft confusion of each head and of the joint cells,
    people counted by ``subjects`` (the labels' ``subject_id``; faces without one, and it
    says so in ``counted``)."""
    joint_truth = truth["age_band"] * len(names["gender"]) + truth["gender"]
    people = len(truth["age_band"]) if subjects is None else len(set(subjects))
    return {"about": "per true class: how many labelled people, the mean (a row of the soft "
                     "confusion) and covariance of the model's calibrated probabilities, "
                     "and of their moments; kface stats --reference corrects counts for a "
                     "shop's mix with it",
            "people": int(people), "faces": int(len(truth["age_band"])),
            "counted": "faces (the labels have no subject_id)" if subjects is None
                       else "people (the labels' subject_id)",
            "heads": {"age_band": soft_confusion(probs["age_band"], truth["age_band"],
                                                 names["age_band"], subjects),
                      "gender": soft_confusion(probs["gender"], truth["gender"],
                                               names["gender"], subjects),
                      "joint": soft_confusion(joint_probabilities(probs["age_band"],
                                                                  probs["gender"]),
                                              joint_truth, joint_names(names), subjects)}}


def load_reference(path: Path, names: dict[str, list[str]]) -> tuple[dict, list[str]]:
    """A ``soft_confusion.json`` (its ``heads``, and the ``model`` and ``detector`` it was
    made with) checked against the visitors' classes, and warnings. The
    age band and gender heads need ``MIN_PEOPLE`` labelled people per class; a joint cell
    with fewer drops the joint head (its cells are then counted by summed probabilities)."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"reference {path} not found: run kface evaluate on labelled photos "
                         f"of people like the shop's and give its {REFERENCE_FILE}")
    wanted = {"age_band": names["age_band"], "gender": names["gender"],
              "joint": joint_names(names)}
    try:
        data = json.loads(path.read_text())
        heads = data["heads"]
        people = {h: {c: int(heads[h]["rows"][c]["people"]) for c in heads[h]["classes"]}
                  for h in wanted}
    except (ValueError, KeyError, TypeError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise StatsError(f"reference {path} is not a {REFERENCE_FILE} of kface evaluate "
                         f"({what})") from None
    for head, classes in wanted.items():
        if list(people[head]) != classes:
            raise StatsError(f"reference {path}: its {head} classes {list(people[head])} are "
                             f"not the visitors' {classes}")
    for head in ("age_band", "gender"):
        for cls, n in people[head].items():
            if n < MIN_PEOPLE:
                raise StatsError(f"reference {path}: {n} labelled people of {cls}; at least "
                                 f"{MIN_PEOPLE} are needed (label more people of {cls})")
    few = [c for c, n in people["joint"].items() if n < MIN_PEOPLE]
    warnings = [f"the reference has {people['joint'][c]} labelled people of {c}: the age "
                f"band x gender cells are not corrected (summed probabilities)" for c in few]
    if few:
        del heads["joint"]
    warnings += [f"the reference has only {n} labelled people of {c}: its interval is "
                 f"wide, and {head} is corrected on the mean probabilities alone"
                 for head in ("age_band", "gender") for c, n in people[head].items()
                 if n < FEW_PEOPLE]
    thin = [] if few else [c for c, n in people["joint"].items() if n < FEW_PEOPLE]
    if thin:
        warnings.append(f"the reference has fewer than {FEW_PEOPLE} labelled people of "
                        f"{', '.join(thin)}: the age band x gender cells are corrected on "
                        "the mean probabilities alone")
    if any("moments" not in row for row in heads["age_band"]["rows"].values()):
        warnings.append("the reference was made by a kface before 2026-12-05: counts are "
                        "corrected on its mean probabilities alone (run kface evaluate "
                        "again for the estimator that also matches their squares)")
    return {**data, "heads": heads}, warnings


def _log_t(z: np.ndarray, centre: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """Log density of a multivariate Student t (``MIX_DF`` degrees of freedom, scale
    ``chol @ chol.T``)."""
    d, df = len(centre), MIX_DF
    maha = (np.linalg.solve(chol, (z - centre).T) ** 2).sum(0)
    return (math.lgamma((df + d) / 2) - math.lgamma(df / 2) - d / 2 * math.log(df * math.pi)
            - np.log(np.diag(chol)).sum() - (df + d) / 2 * np.log1p(maha / df))


def _log_ratios(pi: np.ndarray) -> np.ndarray:
    """Mixes as log-ratios to the last class (and back: ``_mixes``)."""
    pi = np.clip(pi, 1e-300, None)
    return np.log(pi[:, :-1]) - np.log(pi[:, -1:])


def _mixes(z: np.ndarray) -> np.ndarray:
    full = np.hstack([z, np.zeros((len(z), 1))])
    e = np.exp(full - full.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _posterior(log_likelihood, k: int, rng: np.random.Generator, draws: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Mixes drawn by adaptive importance sampling under a flat Dirichlet prior, and their
    normalised weights: the first round draws from the prior, each later round from a
    Student t fitted to the weighted draws so far (in log-ratio coordinates, where it can
    follow the correlations between classes), and every draw is weighted against the
    mixture of all rounds' proposals; after ``MIX_ROUNDS``, more rounds (up to
    ``MAX_ROUNDS``) while fewer than ``FEW_DRAWS`` draws carry the weight."""
    d = k - 1
    log_prior = math.lgamma(k)  # the flat Dirichlet's density, (k-1)!
    per_round = draws // MIX_ROUNDS
    pi = rng.dirichlet(np.ones(k), per_round)
    log_lik = log_likelihood(pi)
    proposals: list[tuple[np.ndarray, np.ndarray]] = []
    # per draw, the log density of the prior and every proposal so far, summed (logaddexp)
    # in the proposals' order: each round adds the newest proposal to the earlier draws
    # and all proposals to its new draws, instead of summing every pair anew
    log_q = np.zeros(0)
    for round_ in range(MAX_ROUNDS):
        z = _log_ratios(pi)
        jacobian = np.log(np.clip(pi, 1e-300, None)).sum(1)  # log-ratios -> mixes
        have = len(log_q)
        if proposals and have:
            c, chol = proposals[-1]
            log_q = np.logaddexp(log_q, _log_t(z[:have], c, chol) - jacobian[:have])
        fresh = np.full(len(pi) - have, log_prior)
        for c, chol in proposals:
            fresh = np.logaddexp(fresh, _log_t(z[have:], c, chol) - jacobian[have:])
        log_q = np.concatenate([log_q, fresh])
        log_w = log_lik + log_prior - (log_q - math.log(1 + len(proposals)))
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        enough = round_ >= MIX_ROUNDS - 1 and 1 / (w ** 2).sum() >= FEW_DRAWS
        if enough or round_ == MAX_ROUNDS - 1:
            break  # (a narrow posterior, many visitors: more rounds until it is found)
        centre = w @ z  # the next proposal: the weighted draws' spread, widened 2x
        scatter = 2 * ((z - centre) * w[:, None]).T @ (z - centre) + 1e-6 * np.eye(d)
        chol = np.linalg.cholesky(scatter)
        proposals.append((centre, chol))
        t = rng.standard_normal((per_round, d)) * np.sqrt(
            MIX_DF / rng.chisquare(MIX_DF, per_round))[:, None]
        new = _mixes(centre + t @ chol.T)
        pi, log_lik = np.vstack([pi, new]), np.concatenate([log_lik, log_likelihood(new)])
    return pi, w


def mix_corrected_counts(probs: np.ndarray, head: dict, rng: np.random.Generator,
                         draws: int = MIX_DRAWS) -> tuple[dict[str, dict], float]:
    """Per class: the posterior mean count and 95% interval of the realised counts, for
    visitors with ``probs`` and a reference ``head`` (see the module docstring); and the
    effective number of importance draws. The likelihood's spread is taken at a fixed
    mix (first the even one, then the first posterior's mean): a spread that moved with
    each drawn mix would favour the mixes where it is smallest, the corners of a model
    that cannot tell the classes apart."""
    names = head["classes"]
    k, n = len(names), len(probs)
    if n == 0:
        return {c: {"estimate": 0.0, "low": 0.0, "high": 0.0} for c in names}, 0.0
    rows = [head["rows"][c] for c in names]
    people = np.array([r["people"] for r in rows], np.float64)
    if all("moments" in r for r in rows) and people.min() >= FEW_PEOPLE:
        mean = np.array([r["moments"]["mean"] for r in rows], np.float64)
        cov = np.array([r["moments"]["cov"] for r in rows], np.float64)
        observed = moment_features(probs).mean(0)
    else:  # the means alone: a reference of few people per class, or of an older kface
        mean = np.array([r["mean"] for r in rows], np.float64)[:, :-1]
        cov = np.array([r["cov"] for r in rows], np.float64)[:, :-1, :-1]
        observed = np.asarray(probs, np.float64)[:, :-1].mean(0)
    d = mean.shape[1]
    second = cov + mean[:, :, None] * mean[:, None, :]  # E[f f^T] per class

    def log_likelihood_at(mix: np.ndarray):
        """The Gaussian log-likelihood of the observed mean moments, their spread at
        ``mix``: the visitors' own (n of them) and the reference's finite size."""
        mu = mix @ mean
        var = ((np.einsum("k,kij->ij", mix, second) - np.outer(mu, mu)) / n
               + np.einsum("k,kij->ij", mix ** 2, cov / people[:, None, None])
               + 1e-10 * np.eye(d))
        inv = np.linalg.inv(var)

        def log_likelihood(pi: np.ndarray) -> np.ndarray:
            diff = observed - pi @ mean
            return -0.5 * np.einsum("mi,ij,mj->m", diff, inv, diff)
        return log_likelihood

    mix = np.full(k, 1 / k)
    for _ in range(2):
        pi, w = _posterior(log_likelihood_at(mix), k, rng, draws)
        mix = w @ pi
    pick = rng.choice(len(pi), size=4000, p=w)
    realised = rng.multinomial(n, pi[pick] / pi[pick].sum(1, keepdims=True))
    estimate = n * (w @ pi)
    low, high = np.percentile(realised, [2.5, 97.5], axis=0)
    return ({c: {"estimate": round(float(e), 1), "low": round(float(lo), 1),
                 "high": round(float(hi), 1)}
             for c, e, lo, hi in zip(names, estimate, low, high, strict=True)},
            float(1 / (w ** 2).sum()))


def check_reference_model(ref: dict, model_id: str | None, path: Path,
                          allow_other_model: bool = False) -> list[str]:
    """Refuse (StatsError) a reference made by another model than the counted visitors'
    unless ``allow_other_model``; warnings where either side does not record its model."""
    made = ref.get("model")
    ref_id = made.get("id") if isinstance(made, dict) else None
    if ref_id is None or model_id is None:
        return ["the reference or the visitors' file does not record its model (made by a "
                "kface before 2026-12): count with the model the reference was made with"]
    if ref_id != model_id and not allow_other_model:
        raise StatsError(f"reference {path} was made with another model ({made.get('name')}, "
                         f"id {ref_id[:12]}) than these visitors (id {model_id[:12]}): run "
                         "kface evaluate with the counting model, or --allow-other-model")
    return ([f"the reference was made with another model ({made.get('name')}): the "
             "correction assumes it sees people as this one does"]
            if ref_id != model_id else [])


def check_reference_for_model(path: Path | None, model_id: str | None,
                              allow_other_model: bool = False) -> None:
    """Before minutes of video: the reference ``path`` (None: none) is a
    soft_confusion.json for these classes, made by the model ``model_id`` (StatsError
    otherwise, unless ``allow_other_model``)."""
    from core.labels import AGE_BANDS, GENDERS

    if path is not None:
        ref, _ = load_reference(path, {"gender": list(GENDERS), "age_band": list(AGE_BANDS)})
        check_reference_model(ref, model_id, path, allow_other_model)


def shipped_reference(model_id: str | None) -> Path | None:
    """The shipped model's own reference (``models/data/default/soft_confusion.json``)
    when the visitors were counted by that model (the same model id), else None."""
    from models.analyzer import DEFAULT_MODEL

    path = DEFAULT_MODEL / REFERENCE_FILE
    try:
        made = json.loads(path.read_text())["model"]["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if model_id is not None and made == model_id else None


def visitor_stats(path: Path, reference_path: Path | None = None,
                  allow_other_model: bool = False, summed: bool = False) -> dict:
    """Counts with intervals for ``age_band``, ``gender`` and their ``joint`` cells (the
    two heads taken as independent for each visitor): mix-corrected with a reference
    (``soft_confusion.json`` of the same model; see ``check_reference_model``), which
    for visitors of the shipped model is its own (``shipped_reference``) unless another
    is given; by summed probabilities with ``summed`` or where there is none. The
    counts by each visitor's most likely class are beside, as a diagnostic
    (``diagnostic_most_likely_class``), and what made the visitors (``made_by``)."""
    names, gender, band, made_by = visitor_probabilities(path)
    stats = probability_stats(names, gender, band, made_by.get("model", {}).get("id"),
                              reference_path, allow_other_model, summed)
    return {"input": str(path), **stats, "made_by": made_by}


def probability_stats(names: dict[str, list[str]], gender: np.ndarray, band: np.ndarray,
                      model_id: str | None, reference_path: Path | None = None,
                      allow_other_model: bool = False, summed: bool = False,
                      draws: int = MIX_DRAWS) -> dict:
    """``visitor_stats`` of visitors given as their class ``names`` and per visitor the
    ``gender`` and ``band`` probabilities, made by the model ``model_id``; ``draws``:
    the mix-corrected estimator's importance draws. Counts too few to split by band
    get a warning (``thin_counts``)."""
    shipped = reference_path is None and not summed
    if shipped:
        reference_path = shipped_reference(model_id)
    joint = joint_probabilities(band, gender)
    probs = {"age_band": band, "gender": gender, "joint": joint}
    classes = {**names, "joint": joint_names(names)}
    argmax = {h: {n: int((p.argmax(1) == i).sum()) for i, n in enumerate(classes[h])}
              for h, p in probs.items()}
    stats = {"model_id": model_id, "visitors": int(len(band)),
             "diagnostic_most_likely_class": argmax, "warnings": []}
    if reference_path is None or not len(band):  # (nobody to count: nothing to correct)
        stats.update({"estimator": "sum of calibrated probabilities; 95% Poisson-binomial "
                                   "interval", "interval_covers": INTERVAL_COVERS})
        stats.update({h: counts_with_intervals(probs[h], classes[h]) for h in probs})
        return thin_counts(stats)
    ref, stats["warnings"] = load_reference(reference_path, names)
    stats["warnings"] += check_reference_model(ref, model_id, reference_path,
                                               allow_other_model)
    heads = ref["heads"]
    rng = np.random.default_rng(0)  # the same input gives the same numbers
    stats.update({"estimator": "mix-corrected (Bayesian label shift on the probabilities' "
                               "means and squares, flat Dirichlet prior) with the "
                               "reference; 95% posterior interval",
                  "reference": str(reference_path), "interval_covers": CORRECTED_COVERS,
                  "reference_source": "the shipped model's own" if shipped else "given",
                  "reference_model": ref.get("model"), "reference_detector": ref.get("detector")})
    for h in probs:
        if h not in heads:  # a joint cell the reference lacks people of
            stats[h] = counts_with_intervals(probs[h], classes[h])
            continue
        stats[h], effective = mix_corrected_counts(probs[h], heads[h], rng, draws)
        if effective < FEW_DRAWS:
            stats["warnings"].append(f"{h}: only {effective:.0f} effective posterior draws: "
                                     "its interval is rough")
    return thin_counts(stats)


THIN_SHARE = 0.5  # a band's 95% interval wider than this share of the visitors: too few


def thin_counts(stats: dict) -> dict:
    """Mark counts too few to split by age band: where some band's 95% interval spans
    more than ``THIN_SHARE`` of the visitors, ``stats["thin"]`` is True and a warning
    says so (the estimate is then mostly the prior's or the model's guess). The one rule
    for ``kface stats``, ``kface video --stats`` and the counts per period."""
    n = stats["visitors"]
    widths = [c["high"] - c["low"] for c in stats["age_band"].values()]
    stats["thin"] = bool(n) and max(widths, default=0) > THIN_SHARE * n
    if stats["thin"]:
        stats["warnings"].append(
            f"too few visitors ({n}) to split by age band: a band's 95% interval spans "
            f"more than {THIN_SHARE:.0%} of them; read the totals, or a longer period")
    return stats


def write_stats_json(stats: dict, out: Path) -> Path:
    path = Path(out) / "stats.json"
    write_json_atomic(path, stats)
    return path
