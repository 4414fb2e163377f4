"""Train stage: the crop cache + split -> ``model/`` (model.keras, labels.json, history.json).

Input pipeline: crop JPEG bytes (already face-sized) -> parallel decode -> augmentation ->
batch -> prefetch; no full photo is read during training. Callbacks: best checkpoint on
validation age-band accuracy, early stopping on validation age-band loss, TensorBoard,
CSV history, and ``BackupAndRestore`` so a crashed run resumes from its last epoch.
Mixed precision on a GPU; ``MirroredStrategy`` with several GPUs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from models.classifier import AGE_CLASSES, GENDER_CLASSES, ModelConfig, build_classifier
from models.runtime import load_tensorflow
from tasks.storage import write_json_atomic

CODE_VERSION = "train-4"


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flip: bool = True
    rotation: float = Field(0.05, ge=0, le=0.5, description="Max rotation, fraction of 2*pi.")
    zoom: float = Field(0.1, ge=0, lt=1)
    brightness: float = Field(0.1, ge=0, lt=1, description="Max brightness change (0..1).")


class TrainConfig(BaseModel):
    """Optimisation settings."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0, description="Adam's initial learning rate.")
    lr_schedule: Literal["cosine", "constant", "legacy_exp"] = Field(
        "cosine", description="'legacy_exp' is the original's 0.01 * exp(-0.1 * epoch), which "
        "replaces learning_rate from the first epoch."
    )
    loss_weights: dict[Literal["gender", "age_band"], float] = Field(
        default_factory=lambda: {"gender": 1.0, "age_band": 1.0})
    class_weighting: Literal["none", "balanced"] = Field(
        "none", description="'balanced' weights each sample by its inverse age-band frequency.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    early_stopping_patience: int = Field(2, ge=0, description="0 disables early stopping.")
    seed: int = 777
    mixed_precision: Literal["auto", "on", "off"] = "auto"


def load_examples(crops_dir: Path, faces_path: Path, split_path: Path
                  ) -> dict[str, pd.DataFrame]:
    """Join crops, labels and split: ``{"train": df, "val": df, "test": df}`` with image bytes and
    class indices (``gender_idx``, ``age_idx``) plus the label/attribute columns."""
    crops = pads.dataset(crops_dir, format="parquet").to_table().to_pandas()
    crops = crops[crops.error.isna()].drop(columns="error")
    faces = pq.read_table(faces_path).to_pandas()
    split = pq.read_table(split_path).to_pandas()
    rows = faces.merge(split, on="path").merge(crops, on="path")
    rows["gender_idx"] = rows.gender.map(GENDER_CLASSES.index).astype("int32")
    rows["age_idx"] = rows.age_band.map(AGE_CLASSES.index).astype("int32")
    return {s: rows[rows.split == s].reset_index(drop=True) for s in ("train", "val", "test")}


def sample_weights(age_idx: np.ndarray, mode: str) -> np.ndarray:
    """Per-sample weights: 1, or inverse age-band frequency normalised to mean 1."""
    if mode == "none":
        return np.ones(len(age_idx), np.float32)
    counts = np.bincount(age_idx, minlength=len(AGE_CLASSES)).astype(np.float64)
    per_class = np.where(counts > 0, len(age_idx) / (len(AGE_CLASSES) * np.maximum(counts, 1)),
                         0.0)
    return per_class[age_idx].astype(np.float32)


def make_dataset(frame: pd.DataFrame, size: int, batch_size: int, training: bool,
                 cfg: TrainConfig | None = None):
    """tf.data pipeline over crop bytes: (shuffle) -> parallel decode -> (augment) ->
    batch -> prefetch. Yields ``(images, {"gender", "age_band"}, weights)``."""
    load_tensorflow()
    import tensorflow as tf

    weights = sample_weights(frame.age_idx.to_numpy(),
                             cfg.class_weighting if (cfg and training) else "none")
    data = tf.data.Dataset.from_tensor_slices((
        frame.image.to_numpy(dtype=object).astype(bytes),
        {"gender": frame.gender_idx.to_numpy(), "age_band": frame.age_idx.to_numpy()},
        weights,
    ))
    if training:
        data = data.shuffle(len(frame), seed=cfg.seed if cfg else None,
                            reshuffle_each_iteration=True)

    def decode(jpeg, labels, weight):
        image = tf.io.decode_jpeg(jpeg, channels=3)
        image = tf.cast(tf.ensure_shape(image, (size, size, 3)), tf.float32)
        return image, labels, weight

    data = data.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    data = data.batch(batch_size)
    if training and cfg is not None:
        augment = augmentation_layers(cfg.augment, cfg.seed)
        if augment is not None:
            data = data.map(lambda x, y, w: (augment(x, training=True), y, w),
                            num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


def augmentation_layers(cfg: AugmentConfig, seed: int):
    """Keras preprocessing layers for the configured augmentation (None if all off)."""
    load_tensorflow()
    import keras

    steps = []
    if cfg.flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation:
        steps.append(keras.layers.RandomRotation(cfg.rotation, fill_mode="nearest", seed=seed))
    if cfg.zoom:
        steps.append(keras.layers.RandomZoom(cfg.zoom, fill_mode="nearest", seed=seed))
    if cfg.brightness:
        steps.append(keras.layers.RandomBrightness(cfg.brightness, value_range=(0, 255),
                                                   seed=seed))
    return keras.Sequential(steps) if steps else None


def legacy_exp_decay(epoch: int, lr: float = 0.0) -> float:
    """The original's schedule: 0.01 * exp(-0.1 * epoch) (ignores Adam's 1e-3)."""
    return 0.01 * math.exp(-0.1 * epoch)


def train_model(examples: dict[str, pd.DataFrame], size: int, model_cfg: ModelConfig,
                cfg: TrainConfig, model_dir: Path, log_dir: Path,
                crop_spec: dict | None = None) -> dict:
    """Train and write ``model_dir/{model.keras,labels.json,history.json,history.csv}``.

    ``crop_spec`` (the detector margin settings that made the training crops) is stored
    in labels.json so that inference cuts faces exactly as training did.

    Resumes from ``model_dir/backup`` if a previous run of the same training crashed.
    Returns a summary with the best epoch's validation metrics.
    """
    load_tensorflow()
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(cfg.seed)
    gpus = tf.config.list_physical_devices("GPU")
    if cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and gpus):
        keras.mixed_precision.set_global_policy("mixed_float16")
    else:
        keras.mixed_precision.set_global_policy("float32")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    train, val = examples["train"], examples["val"]
    if train.empty or val.empty:
        raise ValueError(f"need examples in both splits (train {len(train)}, val {len(val)})")
    train_ds = make_dataset(train, size, cfg.batch_size, True, cfg)
    val_ds = make_dataset(val, size, cfg.batch_size, False)
    steps = math.ceil(len(train) / cfg.batch_size)
    model_dir.mkdir(parents=True, exist_ok=True)
    with strategy.scope():
        model = build_classifier(model_cfg, size)
        if cfg.lr_schedule == "cosine":
            lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, steps * cfg.epochs,
                                                        alpha=0.01)
        else:
            lr = cfg.learning_rate
        model.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss={"gender": "sparse_categorical_crossentropy",
                  "age_band": "sparse_categorical_crossentropy"},
            loss_weights=dict(cfg.loss_weights),
            metrics={"gender": ["accuracy"], "age_band": ["accuracy"]},
        )
    best = model_dir / "best.keras"
    callbacks = [
        keras.callbacks.BackupAndRestore(str(model_dir / "backup")),
        keras.callbacks.ModelCheckpoint(str(best), monitor="val_age_band_accuracy",
                                        mode="max", save_best_only=True),
        keras.callbacks.TensorBoard(log_dir=str(log_dir)),
        keras.callbacks.CSVLogger(str(model_dir / "history.csv"), append=True),
    ]
    if cfg.lr_schedule == "legacy_exp":
        callbacks.append(keras.callbacks.LearningRateScheduler(legacy_exp_decay))
    if cfg.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_age_band_loss", mode="min", patience=cfg.early_stopping_patience))
    model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=callbacks,
              shuffle=False, verbose=2)  # the dataset shuffles itself
    history = pd.read_csv(model_dir / "history.csv").drop_duplicates("epoch", keep="last")
    best.replace(model_dir / "model.keras")  # atomic rename of the best checkpoint
    best_row = history.loc[history.val_age_band_accuracy.idxmax()]
    write_json_atomic(model_dir / "history.json",
                      {col: history[col].tolist() for col in history.columns})
    write_json_atomic(model_dir / "labels.json", {
        "gender": list(GENDER_CLASSES), "age_band": list(AGE_CLASSES), "input_size": size,
        "input": "RGB uint8 0..255, face box with margin resized (INTER_AREA)",
        "backbone": model_cfg.backbone, "outputs": ["gender", "age_band"],
        "crop": {"size": size, **(crop_spec or {})},
    })
    return {"epochs_run": int(len(history)), "best_epoch": int(best_row.epoch) + 1,
            "val_gender_accuracy": float(best_row.val_gender_accuracy),
            "val_age_band_accuracy": float(best_row.val_age_band_accuracy),
            "train_examples": len(train), "val_examples": len(val)}


def load_history(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "history.json").read_text())
