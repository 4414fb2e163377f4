"""The label vocabulary, in one place: the classes of the two heads, the exact-age head's
ages, and the rule that puts an age in its band. Selection, training, evaluation and
every inference path read them from here.

The exact-age head's classes are ``AGES`` (20-59, ten per band) unless a run's data
keeps wider ages (``data.ages``, e.g. 15-69): then the head covers them too, and an age
below 20 or above 59 counts towards the nearest band (20s, 50s), so the four band
probabilities still sum to one and counts stay 20s-50s. A model records its ages in
``labels.json`` (``ages``)."""

from __future__ import annotations

GENDERS = ("M", "F")
AGE_BANDS = ("20s", "30s", "40s", "50s")
AGES = tuple(range(20, 60))  # the exact-age head's default classes (ten per band)
BAND_AGES = (AGES[0], AGES[-1])  # the ages the bands span


def age_to_band(age: float) -> str | None:
    """Map an age in years to '20s'..'50s'; None outside 20-59 (and for NaN)."""
    if age != age or age < 20 or age >= 60:
        return None
    return AGE_BANDS[int(age) // 10 - 2]


def nearest_band(age: float) -> str | None:
    """The band of an age, ages below 20 counted as 20s and above 59 as 50s (None for
    NaN): the band an out-of-band face trains."""
    if age != age:
        return None
    return age_to_band(min(max(float(age), BAND_AGES[0]), BAND_AGES[1]))


def in_bands(age: float) -> bool:
    """Whether an exact age lies in the bands' 20-59 (faces outside only train)."""
    return age == age and BAND_AGES[0] <= age < BAND_AGES[1] + 1


def age_classes(low: int, high: int) -> tuple[int, ...]:
    """The exact-age head's classes for ages ``low`` to ``high`` (never narrower than
    20-59)."""
    return tuple(range(min(low, BAND_AGES[0]), max(high, BAND_AGES[1]) + 1))


def band_matrix(ages=AGES):
    """``len(ages) x len(AGE_BANDS)``: 1 where the age counts towards the band (ages
    outside 20-59 towards the nearest one)."""
    import numpy as np

    return np.array([[nearest_band(a) == band for band in AGE_BANDS] for a in ages],
                    dtype="float32")


def expected_age(age_probs, ages=AGES, line: dict | None = None):
    """Years: the mean of each row's distribution over ``ages`` (the ``age`` head's
    classes, ``labels.json``'s ``ages``), through the model's validation-fitted ``line``
    (``labels.json``'s ``age_calibration``: slope, intercept) when it has one, kept
    within the ages."""
    import numpy as np

    years = np.asarray(age_probs, np.float64) @ np.asarray(ages, np.float64)
    if line:
        years = np.clip(line["slope"] * years + line["intercept"], min(ages), max(ages))
    return years
