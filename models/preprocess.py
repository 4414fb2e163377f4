"""The model's input preprocessing layer (kept apart so that importing the model config
does not import Keras)."""

from __future__ import annotations

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="kface")
class BackbonePreprocess(layers.Layer):
    """Map RGB 0..255 pixels to what a backbone expects.

    ``caffe``: RGB->BGR and ImageNet mean subtraction (ResNet50); ``tf``: scale to
    [-1, 1] (MobileNet v1); ``arcface``: ``(x - 127.5) / 128`` (InsightFace's
    MobileFaceNet); ``unit``: scale to [0, 1]; ``none``: unchanged (MobileNetV3
    rescales inside itself).
    """

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        x = keras.ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            x = x[..., ::-1] - keras.ops.convert_to_tensor([103.939, 116.779, 123.68],
                                                           dtype=x.dtype)
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        elif self.mode == "arcface":
            x = (x - 127.5) * 0.0078125
        elif self.mode == "unit":
            x = x / 255.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="kface")
class HorizontalFlip(layers.Layer):
    """Mirror images left-right (NHWC): the second view of ``flip_averaged``."""

    def call(self, x):
        return keras.ops.flip(x, axis=-2)
