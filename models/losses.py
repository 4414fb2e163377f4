"""The exact-age head's loss (kept apart so that importing the model config does not
import Keras; registered so that a saved, compiled model reloads in safe mode)."""

from __future__ import annotations

import keras

from core.labels import AGES


@keras.saving.register_keras_serializable(package="kface")
class AgeLoss(keras.losses.Loss):
    """Cross-entropy against the soft age targets (a Gaussian around the true age), plus
    ``mean_weight`` times the absolute difference, in tens of years, between the
    predicted distribution's mean age and the target's: the mean term of the
    mean-variance loss (Pan et al., CVPR 2018). The cross-entropy alone treats a
    prediction 15 years off like one 8 years off once both are far from the Gaussian;
    the mean term pulls the expected age, which is the age the product reports, towards
    the truth. ``mean_weight`` 0 is the plain cross-entropy."""

    def __init__(self, mean_weight: float = 0.0, ages: list[int] | None = None,
                 name: str = "age_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.mean_weight = float(mean_weight)
        self.ages = list(ages or AGES)  # the head's classes

    def call(self, y_true, y_pred):
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        loss = keras.losses.categorical_crossentropy(y_true, y_pred)
        if self.mean_weight:
            ages = keras.ops.convert_to_tensor(self.ages, dtype=y_pred.dtype) / 10.0
            error = keras.ops.abs(keras.ops.sum(y_pred * ages, axis=-1)
                                  - keras.ops.sum(y_true * ages, axis=-1))
            loss = loss + self.mean_weight * error
        return loss

    def get_config(self) -> dict:
        return {**super().get_config(), "mean_weight": self.mean_weight, "ages": self.ages}
