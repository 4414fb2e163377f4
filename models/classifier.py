"""The age-band + gender classifier: the original architecture, with a choice of backbone.

``build_classifier`` reproduces the notebook layer for layer on top of the backbone:
GAP -> Dropout(0.2) -> BN -> Dense(128, relu) -> Dropout(0.2) -> BN -> softmax heads
``gender`` (2) and ``age_band`` (4). With ``exact_age`` (labels with exact ages) the age
head is a softmax over the ages 20..59 (output ``age``, trained on a Gaussian around the
true age) and ``age_band`` is its sum over each band's ten years (a fixed layer), so the
band is read from the predicted age distribution. The model takes RGB uint8-range pixels
(0..255, ``size x size x 3``); the backbone's own preprocessing is a layer inside the
model (``models.preprocess.BackbonePreprocess``), so training, evaluation and inference
cannot disagree on it, and the saved ``.keras`` file loads in Keras safe mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.labels import AGE_BANDS, AGES, GENDERS, band_matrix
from models.runtime import load_keras

# backbone -> keras preprocessing mode applied by BackbonePreprocess
PREPROCESS_MODE = {"resnet50": "caffe", "mobilenet_v3_small": "none", "mobilenet": "tf",
                   "mobilenet_v2": "tf", "small_cnn": "unit", "mobilefacenet": "arcface"}
# backbones whose output is already a vector (an embedding): no pooling after them
EMBEDDING_BACKBONES = ("mobilefacenet",)
# backbone -> model.frozen_until -> the node whose output the frozen part ends with
FROZEN_CUTS = {"mobilefacenet": {"28px": "_plus3", "14px": "_plus9", "7px": "_plus11",
                                 "embedding": "fc1"}}


class ModelConfig(BaseModel):
    """Classifier architecture."""

    model_config = ConfigDict(extra="forbid")

    backbone: Literal["resnet50", "mobilenet_v3_small", "mobilenet", "mobilenet_v2",
                      "small_cnn", "mobilefacenet"] = Field(
        "resnet50", description="resnet50 (the original; GPU), mobilenet_v3_small / "
        "mobilenet (v1) / mobilenet_v2 / small_cnn for CPU runs; mobilefacenet: "
        "InsightFace's face-recognition network (112 px faces aligned by their landmarks; "
        "model.weights: the folder of its MXNet files; the quality recipe's)."
    )
    weights: str = Field(
        "none", description="'none' (random init, as the original), 'imagenet' (downloads: "
        "needs the internet), a path to a local Keras no-top weights file, or for "
        "mobilefacenet 'builtin' (its MXNet files, which ship with kface) or their folder "
        "(symbol + params, sha256 checked)."
    )
    alpha: float = Field(0.25, gt=0, le=1.0, description="Width multiplier for mobilenet "
                         "and mobilenet_v2 (pretrained files exist for v1 0.25/0.5/0.75/1 "
                         "and v2 0.35/0.5/0.75/1).")
    cnn_filters: list[int] = Field(
        [16, 32, 64, 128], min_length=1, description="small_cnn: filters of each "
        "two-conv block (each block halves the resolution).")
    dropout: float = Field(0.2, ge=0, lt=1)
    dense_units: int = Field(128, ge=8)
    backbone_bn: Literal["auto", "train", "frozen"] = Field(
        "auto", description="Run the backbone's BatchNormalization in inference mode "
        "('frozen': its ImageNet statistics are kept, as Keras' fine-tuning guide advises) "
        "or train it. 'auto': frozen with pretrained weights, trained from scratch."
    )
    flip_average: bool = Field(
        False, description="The saved model averages its predictions on the face and on "
        "its mirror image (test-time flip averaging: twice the inference work).")
    exact_age: bool = Field(
        False, description="When the labels have exact ages (a labelled folder's 'age' "
        "column), the age head predicts the age (20-59) and the band is read from it; "
        "without them (K-Face gives bands) the band head is trained alone.")
    bn_momentum: float = Field(
        0.99, gt=0, lt=1, description="BatchNormalization momentum of the head (and of "
        "small_cnn). Keras' 0.99 (the original) adapts slowly on small data sets: 0.9 there."
    )
    init: str = Field(
        "none", description="Start from a trained kface model instead of the backbone's "
        "weights alone: 'default' (the model shipped with kface) or a model folder. Every "
        "layer whose name and weight shapes match takes its weights (the backbone and the "
        "head's hidden layers; a head of other classes, such as K-Face's bands without "
        "exact ages, starts fresh). 'none': the backbone's weights (model.weights).")
    frozen_until: Literal["none", "28px", "14px", "7px", "embedding"] = Field(
        "none", description="mobilefacenet: the backbone up to the end of its stage at "
        "this resolution keeps its pretrained weights and only the rest (and the heads) "
        "trains; with train.feature_cache its output is computed once per face, which is "
        "what makes a CPU recipe fast ('14px': the first four stages, the quality "
        "recipe's; 'embedding': all of the backbone). 'none': everything trains.")

    @model_validator(mode="after")
    def _frozen_needs_the_face_backbone(self):
        if self.frozen_until != "none" and self.backbone not in FROZEN_CUTS:
            raise ValueError(f"frozen_until {self.frozen_until!r} is for "
                             f"{', '.join(FROZEN_CUTS)} (backbone is {self.backbone})")
        return self

    def key_settings(self) -> dict:
        """What cache keys read of this section (``model_key_settings``)."""
        return model_key_settings(self)


class WeightsError(RuntimeError):
    """Backbone weights (or the model ``model.init`` names) cannot be obtained (offline,
    or a bad local file)."""


def _backbone(cfg: ModelConfig, size: int):
    keras = load_keras()
    from keras import layers

    shape = (size, size, 3)
    weights: str | None = None if cfg.weights == "none" else cfg.weights
    if cfg.backbone == "mobilefacenet":
        return _mobilefacenet(weights, size)
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise WeightsError(f"model.weights: file {weights} not found")
    if cfg.backbone == "small_cnn":
        if weights is not None:
            raise WeightsError("small_cnn has no pretrained weights: use model.weights=none")
        inp = keras.Input(shape)
        x = inp
        for filters in cfg.cnn_filters:  # VGG-style blocks: ~0.12 GMAC at 96 px by default
            for _ in range(2):
                x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
                x = layers.BatchNormalization(momentum=cfg.bn_momentum)(x)
                x = layers.ReLU()(x)
            x = layers.MaxPooling2D()(x)
        return keras.Model(inp, x, name="small_cnn")
    builders = {
        "resnet50": lambda: keras.applications.ResNet50(
            weights=weights, include_top=False, input_shape=shape),
        "mobilenet_v3_small": lambda: keras.applications.MobileNetV3Small(
            weights=weights, include_top=False, input_shape=shape,
            include_preprocessing=True),
        "mobilenet": lambda: keras.applications.MobileNet(
            weights=weights, include_top=False, input_shape=shape, alpha=cfg.alpha),
        "mobilenet_v2": lambda: keras.applications.MobileNetV2(
            weights=weights, include_top=False, input_shape=shape, alpha=cfg.alpha),
    }
    try:
        return builders[cfg.backbone]()
    except Exception as exc:  # keras raises several types for downloads and bad files
        if weights == "imagenet":
            import re

            url = re.search(r"https?://\S+?\.h5", str(exc))
            fetch = (f"fetch {url.group(0)} on a machine with the internet and put it in "
                     f"~/.keras/models/ (Keras then loads it offline) or set model.weights "
                     f"to its path" if url else "download the Keras no-top file elsewhere "
                     "and set model.weights to its path")
            raise WeightsError(
                "model.weights=imagenet downloads the weights from the internet, which "
                f"failed ({type(exc).__name__}): {fetch}; or use model.weights=none"
            ) from exc
        if weights is not None:
            raise WeightsError(f"model.weights: {weights} does not fit backbone "
                               f"{cfg.backbone} at {size}px: {exc}") from exc
        raise


def _mobilefacenet(weights: str | None, size: int, **part):
    from models.mobilefacenet import INPUT_SIZE, MobileFaceNetError, build_mobilefacenet

    if size != INPUT_SIZE:
        raise WeightsError(f"mobilefacenet takes {INPUT_SIZE} px faces: set crops.size: "
                           f"{INPUT_SIZE} (got {size})")
    if weights is None or weights == "imagenet":
        raise WeightsError("mobilefacenet is built from InsightFace's MXNet files: set "
                           "model.weights to builtin (they ship with kface) or to their "
                           "folder")
    try:
        return build_mobilefacenet(weights, **part)
    except MobileFaceNetError as exc:
        raise WeightsError(str(exc)) from None


def _frozen_bn(cfg: ModelConfig) -> bool:
    return cfg.backbone_bn == "frozen" or (cfg.backbone_bn == "auto"
                                           and cfg.weights != "none")


def build_classifier(cfg: ModelConfig, size: int, exact_age: bool = False,
                     ages: tuple[int, ...] = AGES):
    """Build the classifier (a ``keras.Model``) for ``size x size`` RGB input (0..255):
    outputs ``gender`` and ``age_band``, and with ``exact_age`` also ``age`` over the
    classes ``ages`` (the band then sums the age distribution, ages outside 20-59
    counted towards the nearest band). With ``model.frozen_until`` it is the two parts
    of ``build_parts`` in a row, the first not trainable. Keras is imported here, not
    at module import, so that the config and the worker processes of other stages do
    not pay TensorFlow's start-up."""
    keras = load_keras()
    from models.preprocess import BackbonePreprocess

    if cfg.frozen_until != "none":
        return compose(*build_parts(cfg, size, exact_age, ages))
    inputs = keras.Input((size, size, 3), name="image")
    x = BackbonePreprocess(PREPROCESS_MODE[cfg.backbone], name="preprocess")(inputs)
    backbone = _backbone(cfg, size)
    x = backbone(x, training=False) if _frozen_bn(cfg) else backbone(x)
    return keras.Model(inputs, _heads(x, cfg, exact_age, ages), name="kface_classifier")


def build_parts(cfg: ModelConfig, size: int, exact_age: bool = False,
                ages: tuple[int, ...] = AGES):
    """The classifier in two parts at ``model.frozen_until``: the frozen part (the image
    to the backbone's output at the cut; not trainable) and the trained part (that
    output to the heads). Training on cached features fits the second alone
    (``tasks.feature_cache``); ``compose`` joins them into the classifier."""
    keras = load_keras()
    from models.preprocess import BackbonePreprocess

    cut = FROZEN_CUTS[cfg.backbone][cfg.frozen_until]
    image = keras.Input((size, size, 3), name="image")
    x = BackbonePreprocess(PREPROCESS_MODE[cfg.backbone], name="preprocess")(image)
    lower = keras.Model(image, _mobilefacenet(cfg.weights, size, name="frozen_backbone",
                                              stop=cut)(x, training=False), name="frozen")
    lower.trainable = False
    features = keras.Input(lower.output.shape[1:], name="features")
    x = features
    if cut != "fc1":  # (the embedding itself: nothing of the backbone is left to train)
        top = _mobilefacenet(cfg.weights, size, name="trained_backbone", start=cut)
        x = top(x, training=False) if _frozen_bn(cfg) else top(x)
    upper = keras.Model(features, _heads(x, cfg, exact_age, ages), name="trained")
    return lower, upper


def init_model_file(init: str) -> Path:
    """The ``model.keras`` that ``model.init`` names ('default': the shipped model's)."""
    folder = (Path(__file__).resolve().parent / "data" / "default" if init == "default"
              else Path(init))
    path = folder if folder.suffix == ".keras" else folder / "model.keras"
    if not path.is_file():
        raise WeightsError(f"model.init: {path} not found: give 'default' (the shipped "
                               "model) or a trained model folder with its model.keras")
    return path


def check_weights(cfg: ModelConfig) -> None:
    """Raise WeightsError (or MobileFaceNetError) unless the files ``cfg`` names are
    there: the model ``init`` starts from, MobileFaceNet's folder of MXNet files (present,
    sha256 as published), or a Keras no-top weights file ('imagenet' and 'none' need
    none)."""
    from models.mobilefacenet import weight_files

    if cfg.init != "none":
        init_model_file(cfg.init)
    if cfg.backbone == "mobilefacenet":
        weight_files(cfg.weights)
    elif cfg.weights not in ("none", "imagenet") and not Path(cfg.weights).is_file():
        raise WeightsError(f"model.weights: file {cfg.weights} not found (a Keras no-top "
                           "weights file, 'imagenet' or 'none')")


# model settings added since models were first trained, with the value that means "off"
MODEL_OFF = {"frozen_until": "none", "init": "none"}


def model_key_settings(cfg: ModelConfig) -> dict:
    """The model section as cache keys see it: a weights file replaced by its sha256 and
    a weights folder (MobileFaceNet's) by its files' (not their path), the model ``init``
    starts from by its file's, and without the settings of ``MODEL_OFF`` while they are
    off (models trained before they existed stay current)."""
    from core.storage import file_sha256

    settings = cfg.model_dump(mode="json", exclude={
        k for k, off in MODEL_OFF.items() if getattr(cfg, k) == off})
    weights = Path(cfg.weights)
    if cfg.backbone == "mobilefacenet" and cfg.weights not in ("none", "imagenet"):
        from models.mobilefacenet import MobileFaceNetError, weight_files

        # the files the network is built from, wherever they are ('builtin' or a folder;
        # before 2026-12-07 every file of the folder, a TFLite copy beside them included)
        try:
            settings["weights"] = [file_sha256(f) for f in sorted(weight_files(cfg.weights))]
        except MobileFaceNetError:  # missing: the run's checks say so in one line
            pass
    elif cfg.weights not in ("none", "imagenet") and weights.is_file():
        settings["weights"] = file_sha256(weights)
    elif cfg.weights not in ("none", "imagenet") and weights.is_dir():
        settings["weights"] = [file_sha256(f) for f in sorted(weights.iterdir())
                               if f.is_file()]
    if cfg.init != "none":
        settings["init"] = file_sha256(init_model_file(cfg.init))
    return settings


def initialise(model, init: str) -> list[str]:
    """Give each layer of ``model`` (nested models searched) the weights of the layer of
    the same name in the model ``init`` names, where every weight's shape matches;
    returns the names of the layers set."""
    if init == "none":
        return []

    def layers_by_name(m, found):
        for layer in m.layers:
            if hasattr(layer, "layers"):
                layers_by_name(layer, found)
            elif layer.weights:
                found.setdefault(layer.name, layer)
        return found

    source = layers_by_name(load_classifier(init_model_file(init), compile=False), {})
    done = []
    for name, layer in layers_by_name(model, {}).items():
        other = source.get(name)
        if other is not None and [w.shape for w in other.weights] == [
                w.shape for w in layer.weights]:
            layer.set_weights(other.get_weights())
            done.append(name)
    return done


def compose(lower, upper):
    """The classifier: ``upper`` on ``lower``'s output (``build_parts``)."""
    keras = load_keras()
    image = keras.Input(lower.input.shape[1:], name="image")
    return keras.Model(image, upper(lower(image)), name="kface_classifier")


def _heads(x, cfg: ModelConfig, exact_age: bool, ages: tuple[int, ...]) -> dict:
    """The original's head on the backbone's output ``x``: pooling (unless the backbone
    gives an embedding), dropout, batch norm, dense 128, dropout, batch norm, and the
    softmax outputs."""
    from keras import layers

    if cfg.backbone not in EMBEDDING_BACKBONES:
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    # named, so that model.init finds them in another model of the same recipe
    x = layers.Dropout(cfg.dropout, name="head_dropout_1")(x)
    x = layers.BatchNormalization(momentum=cfg.bn_momentum, name="head_norm_1")(x)
    x = layers.Dense(cfg.dense_units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(cfg.dropout, name="head_dropout_2")(x)
    x = layers.BatchNormalization(momentum=cfg.bn_momentum, name="head_norm_2")(x)
    gender = layers.Dense(len(GENDERS), activation="softmax", name="gender",
                          dtype="float32")(x)
    if not exact_age:
        band = layers.Dense(len(AGE_BANDS), activation="softmax", name="age_band",
                            dtype="float32")(x)
        return {"gender": gender, "age_band": band}
    age = layers.Dense(len(ages), activation="softmax", name="age", dtype="float32")(x)
    to_band = layers.Dense(len(AGE_BANDS), use_bias=False, trainable=False,
                           name="age_band", dtype="float32")
    band = to_band(age)
    to_band.set_weights([band_matrix(ages)])
    return {"gender": gender, "age_band": band, "age": age}


def age_targets(ages, sigma: float, classes: tuple[int, ...] = AGES):
    """Soft targets over the age head's ``classes``: a Gaussian of ``sigma`` years around
    each age, normalised to sum 1 (nearby ages are near misses, not plain errors)."""
    import numpy as np

    diff = np.asarray(classes, np.float32)[None, :] - np.asarray(ages, np.float32)[:, None]
    weights = np.exp(-0.5 * (diff / sigma) ** 2)
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def flip_averaged(model):
    """A model whose outputs average ``model``'s on the image and on its mirror image
    (the trained model is a layer inside it; saved and reloaded like any classifier)."""
    keras = load_keras()
    from models.preprocess import HorizontalFlip

    inputs = keras.Input(model.input_shape[1:], name="image")
    direct, mirrored = model(inputs), model(HorizontalFlip(name="mirror")(inputs))
    outputs = {head: keras.layers.Average(name=head, dtype="float32")(
        [direct[head], mirrored[head]]) for head in direct}
    return keras.Model(inputs, outputs, name="kface_classifier_flip_averaged")


def single_view_network(model):
    """The trained network inside a ``flip_averaged`` model (what answers one view), or
    None when ``model`` is not one."""
    inner = [layer for layer in model.layers if layer.name == "kface_classifier"]
    if model.name != "kface_classifier_flip_averaged" or len(inner) != 1:
        return None
    return inner[0]


def load_classifier(path: Path, compile: bool = True):
    """Load a saved classifier in Keras safe mode (our custom layers are registered);
    ``compile=False`` leaves out its optimizer and losses (a model to save for serving)."""
    keras = load_keras()

    import models.losses  # noqa: F401  registers AgeLoss
    import models.preprocess  # noqa: F401  registers BackbonePreprocess

    return keras.saving.load_model(Path(path), safe_mode=True, compile=compile)
