"""The label vocabulary, in one place: the classes of the two heads, the exact-age head's
ages, and the rule that puts an age in its band. Selection, training, evaluation and
every inference path read them from here."""

from __future__ import annotations

GENDERS = ("M", "F")
AGE_BANDS = ("20s", "30s", "40s", "50s")
AGES = tuple(range(20, 60))  # the exact-age head's classes (ten per band)


def age_to_band(age: float) -> str | None:
    """Map an age in years to '20s'..'50s'; None outside 20-59 (and for NaN)."""
    if age != age or age < 20 or age >= 60:
        return None
    return AGE_BANDS[int(age) // 10 - 2]


def band_matrix():
    """``len(AGES) x len(AGE_BANDS)``: 1 where the age lies in the band."""
    import numpy as np

    return np.array([[age_to_band(a) == band for band in AGE_BANDS] for a in AGES],
                    dtype="float32")


def expected_age(age_probs):
    """Years: the mean of each row's distribution over ``AGES`` (the ``age`` head)."""
    import numpy as np

    return np.asarray(age_probs, np.float64) @ np.asarray(AGES, np.float64)
