"""Calibrated probabilities: one temperature per head, fitted after training.

A network trained with cross-entropy is often over-confident: its top probability is
higher than its accuracy (measured on held-out All-Age-Faces people: age band 0.590 mean
top probability against 0.534 accuracy). Temperature scaling (Guo et al., 2017) divides
the logits by one number ``T`` per head, fitted on the validation split by minimising
the negative log-likelihood; ``T > 1`` softens, ``T < 1`` sharpens, and the argmax (so the
accuracy) never changes. The heads end in a softmax, so the logits are recovered as
``log p`` (up to a constant per row, which the softmax ignores). The expected calibration
error (ECE) is the bin-weighted gap between the top probability and the accuracy, 15
equal-width bins; beside it, the ECE a perfectly calibrated model would show on as many
examples (``ece_floor``: the gap is never zero on finite data). NumPy only: every
inference path applies the temperature, the light install included.

A temperature cannot move the argmax, so it cannot correct a head whose classes are
mixed unlike the people it is calibrated for: the age band head of a model trained on
faces that are mostly in their 20s (UTKFace) leans towards the 20s and 30s on All-Age-Faces
people. **Bias-corrected temperature scaling** (``fit_temperature_bias``; Alexandari et
al., 2020) adds one bias per class, ``softmax(log p / T + b)``, fitted the same way: it
moves the probabilities to the class mix of the people it is fitted on (and the argmax
with them).
"""

from __future__ import annotations

import numpy as np

BINS = 15
FLOOR_DRAWS = 200
T_RANGE = (0.05, 20.0)


def apply_temperature(probs: np.ndarray, temperature: float,
                      bias: np.ndarray | list[float] | None = None) -> np.ndarray:
    """``softmax(log(probs) / temperature + bias)`` per row (``bias``: one per class, or
    None)."""
    probs = np.asarray(probs, np.float64)
    if (temperature == 1.0 and bias is None) or probs.size == 0:
        return probs
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def remove_calibration(probs: np.ndarray, temperature: float,
                       bias: np.ndarray | list[float] | None = None) -> np.ndarray:
    """The probabilities that ``apply_temperature(..., temperature, bias)`` turned into
    ``probs`` (the model's own, before its calibration)."""
    if bias is not None:
        probs = apply_temperature(probs, 1.0, -np.asarray(bias, np.float64))
    return apply_temperature(probs, 1 / temperature)


CLASS_HEADS = ("gender", "age_band")


def model_calibration(labels: dict) -> dict[str, tuple[float, list[float] | None]]:
    """Per class head that a model's ``labels.json`` calibrates: its temperature and its
    bias (None without ``train.calibration_bias``). Empty for a model trained before
    calibration (its probabilities are used as they come)."""
    return {head: (float(t), labels.get("bias", {}).get(head))
            for head, t in labels.get("temperature", {}).items() if head in CLASS_HEADS}


def calibrate_heads(probs: dict[str, np.ndarray],
                    calibration: dict[str, tuple[float, list[float] | None]]) -> dict:
    """``probs`` with each calibrated head through its temperature and bias."""
    return {**probs, **{head: apply_temperature(probs[head], t, bias)
                        for head, (t, bias) in calibration.items() if head in probs}}


def uncalibrate_heads(probs: dict[str, np.ndarray],
                      calibration: dict[str, tuple[float, list[float] | None]]) -> dict:
    """The model's own probabilities of the calibrated heads, before ``calibrate_heads``."""
    return {head: remove_calibration(probs[head], t, bias)
            for head, (t, bias) in calibration.items() if head in probs}


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    picked = np.asarray(probs, np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` in ``T_RANGE`` that minimises the NLL of ``labels`` (golden-section search
    on log T; the NLL is convex in 1/T). 1.0 when there is nothing to fit on."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return 1.0
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return nll(apply_temperature(probs, float(np.exp(log_t))), labels)

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return round(float(np.exp((lo + hi) / 2)), 4)


def fit_temperature_bias(probs: np.ndarray, labels: np.ndarray, iterations: int = 100
                         ) -> tuple[float, list[float]]:
    """The ``T`` and per-class ``bias`` (the last class's 0) that minimise the NLL of
    ``labels`` under ``softmax(log p / T + bias)``: a convex problem in ``1/T`` and the
    bias, solved by Newton's method with step halving. ``(1.0, zeros)`` when there is
    nothing to fit on; ``T`` kept within ``T_RANGE``."""
    labels = np.asarray(labels)
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))
    n, k = logp.shape
    if n == 0:
        return 1.0, [0.0] * k
    onehot = np.eye(k)[labels]
    # d logits / d theta per example: theta = (1/T, bias of every class but the last)
    design = np.concatenate([logp[:, :, None],
                             np.broadcast_to(np.eye(k)[:, :k - 1], (n, k, k - 1))], axis=2)

    def loss_and_probs(theta: np.ndarray) -> tuple[float, np.ndarray]:
        logits = design @ theta
        logits -= logits.max(axis=1, keepdims=True)
        log_q = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(-(log_q * onehot).sum() / n), np.exp(log_q)

    theta = np.zeros(k)
    theta[0] = 1.0
    loss, q = loss_and_probs(theta)
    for _ in range(iterations):
        grad = np.einsum("nkp,nk->p", design, q - onehot) / n
        weights = q[:, :, None] * np.eye(k) - q[:, :, None] * q[:, None, :]
        hessian = np.einsum("nkp,nkl,nlq->pq", design, weights, design) / n
        step = np.linalg.solve(hessian + 1e-9 * np.eye(k), grad)
        size = 1.0
        while size > 1e-6:
            new_loss, new_q = loss_and_probs(theta - size * step)
            if new_loss <= loss:
                break
            size /= 2
        else:
            break
        theta, done = theta - size * step, loss - new_loss < 1e-12
        loss, q = new_loss, new_q
        if done:
            break
    temperature = float(np.clip(1 / max(theta[0], 1e-12), *T_RANGE))
    return round(temperature, 4), [round(float(b), 4) for b in theta[1:]] + [0.0]


def _bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum((confidence * bins).astype(int), bins - 1)


def _ece(which: np.ndarray, correct: np.ndarray, confidence: np.ndarray, bins: int) -> float:
    """Sum over bins of n/N * |accuracy - confidence| = |hits - summed confidence| / N."""
    return float(np.abs(np.bincount(which, correct, bins)
                        - np.bincount(which, confidence, bins)).sum() / len(which))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per confidence bin with examples: its range, count, mean top probability and
    accuracy (the reliability diagram's bars)."""
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    which = _bin_of(confidence, bins)
    return [{"low": b / bins, "high": (b + 1) / bins, "n": int((which == b).sum()),
             "confidence": float(confidence[which == b].mean()),
             "accuracy": float(correct[which == b].mean())}
            for b in range(bins) if (which == b).any()]


def calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of n/N * |accuracy - confidence|."""
    probs = np.asarray(probs, np.float64)
    if len(probs) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    return _ece(_bin_of(confidence, bins), probs.argmax(axis=1) == np.asarray(labels),
                confidence, bins)


def ece_floor(probs: np.ndarray, bins: int = BINS, draws: int = FLOOR_DRAWS,
              seed: int = 0) -> dict:
    """The ECE that a *perfectly calibrated* model with these probabilities would show on
    this many examples: labels drawn from the probabilities themselves (consistency
    resampling, Broecker & Smith 2007; the top class is right with probability equal to
    the top probability), ``draws`` times. ECE is a sum of absolute gaps, so sampling noise
    alone makes it positive: on a few hundred or thousand examples it is several points
    (952 held-out people, the quality recipe: 0.036 on average), and an ECE at or below
    this floor's 95th percentile is what a calibrated model shows (``consistent``)."""
    confidence = np.asarray(probs, np.float64).max(axis=1) if len(probs) else np.zeros(0)
    n = len(confidence)
    if n == 0:
        return {"mean": None, "p95": None, "draws": 0}
    which = _bin_of(confidence, bins)
    rng = np.random.default_rng(seed)
    eces = [_ece(which, rng.random(n) < confidence, confidence, bins) for _ in range(draws)]
    return {"mean": float(np.mean(eces)), "p95": float(np.percentile(eces, 95)),
            "draws": draws}


def calibration_report(probs: np.ndarray, labels: np.ndarray, temperature: float,
                       bins: bool = False, bias: list[float] | None = None) -> dict:
    """One head's calibration at ``temperature`` (and ``bias``): the ECE and the mean top
    probability before and after it (None without examples), and with ``bins`` the
    reliability bins before and after (the reliability diagram's points)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    after = apply_temperature(probs, temperature, bias)
    some = len(labels) > 0
    floor = ece_floor(after)
    ece_after = calibration_error(after, labels)
    report = {"temperature": float(temperature),
              **({"bias": [float(b) for b in bias]} if bias is not None else {}),
              "ece_before": calibration_error(probs, labels),
              "ece_after": ece_after,
              "ece_floor": floor,  # what a calibrated model shows on this many examples
              "consistent": bool(some and ece_after <= floor["p95"]),
              "mean_confidence_before": float(probs.max(1).mean()) if some else None,
              "mean_confidence_after": float(after.max(1).mean()) if some else None}
    if bins:
        report.update(reliability_before=reliability(probs, labels),
                      reliability_after=reliability(after, labels))
    return report


def fit_age_line(predicted: np.ndarray, true: np.ndarray) -> dict:
    """The straight line that maps the exact-age head's expected ages onto the true ages
    best (least squares, on the validation people): a face's estimate leans towards the
    ages the model saw most, and the line moves it where those people's true ages lie on
    average, as a temperature calibrates the class probabilities. With the mean absolute
    error before and after (on the data given)."""
    predicted, true = np.asarray(predicted, np.float64), np.asarray(true, np.float64)
    slope, intercept = np.linalg.lstsq(np.column_stack([predicted, np.ones_like(predicted)]),
                                       true, rcond=None)[0]
    return {"slope": float(slope), "intercept": float(intercept), "examples": int(len(true)),
            "mae_before": float(np.abs(predicted - true).mean()),
            "mae_after": float(np.abs(slope * predicted + intercept - true).mean())}


def calibrate(probs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
              bias_heads: tuple[str, ...] = ()) -> dict:
    """Per head in ``labels``: the fitted temperature (and for ``bias_heads`` a bias per
    class, ``fit_temperature_bias``), and the ECE and mean top probability before and
    after, with the accuracy before (all on the data given)."""
    result = {}
    for head, truth in labels.items():
        if head in bias_heads:
            temperature, bias = fit_temperature_bias(probs[head], truth)
        else:
            temperature, bias = fit_temperature(probs[head], truth), None
        result[head] = {**calibration_report(probs[head], truth, temperature, bias=bias),
                        "examples": int(len(truth)),
                        "accuracy": float(np.mean(np.argmax(probs[head], 1) == truth))
                        if len(truth) else None}
    return result
