"""Counts per period from the visitors store: a day per hour, a week per day, or eight
weeks per week, per camera or for the whole shop, per age band, gender and band x
gender, each with the estimate and 95% interval of ``kface stats`` (``inference.stats``:
mix-corrected with the shipped model's reference for its visitors, or with a shop's own
``soft_confusion.json`` when given), the thin-counts rule, and the camera downtime that
overlaps each period. ``kface counts`` prints it and the dashboard's JSON endpoint
serves it: one function, ``shop_counts``, for both.

Periods are the shop's local time (``tz``, an IANA name such as ``Asia/Seoul``; default:
this machine's). Each period's estimate uses ``PERIOD_DRAWS`` importance draws (the
total of the view, ``inference.stats.MIX_DRAWS``): 0.1 s instead of 0.35 s a period,
bounds within a visitor of each other (docs/inference.md). Finished periods are cached
in the process (keyed on their visitors), so a dashboard's refresh recomputes only the
period that is still filling.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np

from core.labels import AGE_BANDS, GENDERS
from inference.stats import joint_names, probability_stats
from inference.store import Store

PERIODS = {"hour": "a day, per hour", "day": "a week (Monday to Sunday), per day",
           "week": "eight weeks, per week (the chosen day's week last)"}
PERIOD_DRAWS = 4_000
HEADS = ("age_band", "gender", "joint")
_CACHE: dict[tuple, dict] = {}
_CACHE_SIZE = 2_000


class CountsError(ValueError):
    """A request for counts that cannot be answered (a bad day, period or zone)."""


def _zone(tz: str | None):
    if tz is None:
        return None
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise CountsError(f"time zone {tz!r} not known: give an IANA name such as "
                          "Europe/Berlin or Asia/Seoul") from None


def _epoch(moment: datetime, zone) -> float:
    """A local wall-clock time as epoch seconds (this machine's zone when None)."""
    return moment.replace(tzinfo=zone).timestamp() if zone else moment.timestamp()


def _local(ts: float, zone) -> datetime:
    return datetime.fromtimestamp(ts, zone) if zone else datetime.fromtimestamp(ts)


def period_bounds(day: date, period: str, tz: str | None = None
                  ) -> list[tuple[float, float, str]]:
    """The periods of the view around ``day`` (``PERIODS``) as (start, end, label) in
    epoch seconds, the label the local start (``2026-12-07T14:00``)."""
    if period not in PERIODS:
        raise CountsError(f"period {period!r}: choose one of {', '.join(PERIODS)}")
    zone = _zone(tz)
    midnight = datetime(day.year, day.month, day.day)
    if period == "hour":
        starts = [midnight + timedelta(hours=h) for h in range(25)]
        fmt = "%Y-%m-%dT%H:00"
    elif period == "day":
        monday = midnight - timedelta(days=day.weekday())
        starts = [monday + timedelta(days=d) for d in range(8)]
        fmt = "%Y-%m-%d"
    else:
        monday = midnight - timedelta(days=day.weekday())
        starts = [monday - timedelta(weeks=w) for w in range(7, -2, -1)]
        fmt = "%Y-%m-%d"
    return [(_epoch(a, zone), _epoch(b, zone), a.strftime(fmt))
            for a, b in zip(starts, starts[1:], strict=False)]


def _zeros() -> dict:
    names = {"age_band": list(AGE_BANDS), "gender": list(GENDERS)}
    names["joint"] = joint_names(names)
    return {h: {c: {"estimate": 0.0, "low": 0.0, "high": 0.0} for c in names[h]}
            for h in HEADS}


def _estimate(visitors: dict[str, np.ndarray], index: np.ndarray, reference: Path | None,
              draws: int) -> dict:
    n = len(index)
    if n == 0:
        return {"visitors": 0, **_zeros(), "thin": False, "warnings": []}
    models = Counter(visitors["model_id"][index].tolist())
    model_id = models.most_common(1)[0][0]
    key = (int(visitors["id"][index].sum()), n, int(visitors["id"][index].max()),
           str(reference), draws, model_id)
    if key in _CACHE:
        return dict(_CACHE[key])
    names = {"gender": list(GENDERS), "age_band": list(AGE_BANDS)}
    stats = probability_stats(names, visitors["gender"][index], visitors["age_band"][index],
                              model_id, reference, allow_other_model=True, draws=draws)
    if len(models) > 1:
        stats["warnings"].append(f"{len(models)} models counted these visitors: corrected "
                                 f"as {model_id[:12]}'s")
    out = {"visitors": n, **{h: stats[h] for h in HEADS}, "thin": stats["thin"],
           "warnings": stats["warnings"], "estimator": stats["estimator"],
           "reference_source": stats.get("reference_source")}
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = out
    return dict(out)


def _down_seconds(outages: list[dict], start: float, end: float) -> dict[str, float]:
    per_camera: dict[str, float] = {}
    for o in outages:
        overlap = min(end, o["until"]) - max(start, o["started_at"])
        if overlap > 0:
            per_camera[o["camera"]] = round(per_camera.get(o["camera"], 0.0) + overlap, 1)
    return per_camera


def shop_counts(store: Store, day: date, period: str = "hour", camera: str | None = None,
                reference: Path | None = None, tz: str | None = None,
                now: float | None = None) -> dict:
    """The counts of the view of ``day`` per ``period`` (``PERIODS``), of ``camera`` (None:
    the whole shop), with the visitors who entered in each period (``counted`` ones):
    ``periods`` (each: start, end, label, visitors, ``age_band``/``gender``/``joint``
    with estimate, low, high, ``thin``, warnings, ``downtime`` seconds per camera,
    ``future``) and ``total`` over the view. Docs: data-contracts.md, "Counts"."""
    clock = time.perf_counter()
    now = time.time() if now is None else now
    bounds = period_bounds(day, period, tz)
    start, end = bounds[0][0], bounds[-1][1]
    visitors = store.visitors_between(start, end, camera)
    outages = store.downtime_between(start, end, camera, now)
    cameras = store.cameras(start, end)
    queried = time.perf_counter() - clock
    edges = np.searchsorted(visitors["entered_at"], [b[0] for b in bounds] + [end])
    periods = []
    for (a, b, label), lo, hi in zip(bounds, edges, edges[1:], strict=False):
        entry = {"label": label, "start": a, "end": b, "future": a > now,
                 "downtime": _down_seconds(outages, a, min(b, now))}
        entry.update(_estimate(visitors, np.arange(lo, hi), reference, PERIOD_DRAWS))
        periods.append(entry)
    from inference.stats import MIX_DRAWS

    total = _estimate(visitors, np.arange(len(visitors["id"])), reference, MIX_DRAWS)
    total["downtime"] = _down_seconds(outages, start, min(end, now))
    return {"day": day.isoformat(), "period": period, "view": PERIODS[period],
            "camera": camera, "timezone": tz or "local", "store": store.shown,
            "cameras": cameras,
            "reference": str(reference) if reference else None,
            "periods": periods, "total": total,
            "seconds": {"query": round(queried, 4),
                        "all": round(time.perf_counter() - clock, 4)}}


def counts_csv(counts: dict) -> str:
    """``shop_counts`` as CSV: a row per period (and one for the total), a column per
    band x gender cell's estimate, low and high, then the visitors and downtime."""
    cells = list(_zeros()["joint"])
    heads = ["period", "visitors"] + [f"{c}_{k}" for c in cells
                                               for k in ("estimate", "low", "high")]
    heads += ["thin", "downtime_seconds"]
    lines = [",".join(heads)]
    for p in counts["periods"] + [{**counts["total"], "label": "total"}]:
        row = [p["label"], str(p["visitors"])]
        row += [f"{p['joint'][c][k]:g}" for c in cells for k in ("estimate", "low", "high")]
        row += [str(p["thin"]).lower(), f"{sum(p['downtime'].values()):g}"]
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"
