"""Train stage: the crop cache + split -> ``model/`` (model.keras, labels.json, history.json).

Input: face crops streamed from the crop shards (``tasks.crop_stream``: bounded memory,
shuffled across shards, decoded and augmented in worker threads); no full photo is read
during training. Runs on any Keras backend (``KERAS_BACKEND``: tensorflow, the default;
jax; torch). Callbacks: best checkpoint on validation age-band accuracy, early stopping
on validation age-band loss, TensorBoard (when TensorFlow is installed), CSV history,
and ``BackupAndRestore`` so a killed run resumes from its last finished epoch, with the
best checkpoint's value carried over. Mixed precision on a GPU (float16 with TensorFlow,
bfloat16 with JAX and PyTorch); ``MirroredStrategy`` with several GPUs on TensorFlow.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from core.labels import AGE_BANDS, AGES, GENDERS, age_classes, expected_age
from core.storage import file_sha256, fingerprint, write_json_atomic
from models.classifier import (
    ModelConfig,
    build_classifier,
    build_parts,
    compose,
    flip_averaged,
    initialise,
    load_classifier,
)
from models.runtime import accelerators, keras_backend, load_keras
from tasks.crop_stream import (
    AugmentConfig,
    CropSet,
    DecodeProcesses,
    crop_batches,
    has_exact_ages,
)

CODE_VERSION = "train-7"  # 6: exact-age head (model.exact_age); 7: its age line
log = logging.getLogger(__name__)

# training images/s on this project's 2-core CPU machine (measured, see docs/training.md),
# for the warning before a long CPU training; scaled by (size / 224)^2 for other sizes
CPU_IMAGES_PER_S_224 = {"resnet50": 5.0, "mobilenet_v3_small": 60.0, "mobilenet": 45.0,
                        "mobilenet_v2": 22.0, "small_cnn": 40.0,
                        "mobilefacenet": 6.2}  # (25 img/s at its 112 px)
LONG_CPU_TRAINING_S = 3 * 3600


class GPURequiredError(RuntimeError):
    """train.require_gpu is set and the Keras backend sees no GPU."""


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
    loss_weights: dict[Literal["gender", "age_band", "age"], float] = Field(
        default_factory=lambda: {"gender": 1.0, "age_band": 1.0, "age": 1.0},
        description="'age': the exact-age head's loss (model.exact_age), when trained.")
    age_sigma: float = Field(
        3.0, gt=0, description="model.exact_age: width in years of the Gaussian around the "
        "true age that the age head is trained to predict.")
    age_mean_weight: float = Field(
        0.0, ge=0, description="model.exact_age: add this times the absolute error, in "
        "tens of years, of the age head's mean age to its loss (the mean term of the "
        "mean-variance loss). 0: off.")
    ema_momentum: float | None = Field(
        None, gt=0, lt=1, description="Keep an exponential moving average of the weights "
        "(Polyak averaging, e.g. 0.99 per batch): validation, the best checkpoint and the "
        "saved model use the averaged weights. None: off.")
    class_weighting: Literal["none", "balanced"] = Field(
        "none", description="'balanced' weights each sample by its inverse age-band frequency.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    early_stopping_patience: int = Field(2, ge=0, description="0 disables early stopping.")
    seed: int = 777
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    steps_per_epoch: int | None = Field(
        None, ge=1, description="Batches per epoch (default: the whole training split); "
        "for quick trials and benchmarks.")
    feature_cache: bool = Field(
        True, description="With model.frozen_until: compute the frozen part's output once "
        "per face and its mirror image and train the rest on it (the augmentation is then "
        "the mirror only). False: the frozen part runs in every step (slower; "
        "train.augment applies).")
    shuffle_buffer_chunks: int = Field(
        64, ge=1, description="Row groups (64 crops each) shuffled together; memory holds "
        "twice this many.")
    workers: int = Field(2, ge=1, description="Threads decoding and augmenting crops "
                         "(with loader: processes, that many decoding processes).")
    loader: Literal["auto", "threads", "processes"] = Field(
        "auto", description="Where the crops are decoded and augmented: threads of the "
        "training process, or spawned processes (the decoding then leaves the training "
        "process's GIL, which on a GPU machine also drives the device). 'auto': processes "
        "when the Keras backend sees a GPU, threads on the CPU (as fast there). The same "
        "batches either way: a performance setting only (no cache key reads it).")
    calibration_bias: bool = Field(
        False, description="Calibrate the age band head with a bias per band beside its "
        "temperature (bias-corrected temperature scaling): its probabilities then follow "
        "the band mix of the people it is calibrated on (train.calibration_folder), and "
        "its most likely band may change. Off: a temperature only, which never changes "
        "the most likely band.")
    calibration_folder: str | None = Field(
        None, description="With data.folders: fit the calibration (temperatures, band "
        "bias, age line) on the validation people of this folder only (its name), the "
        "one most like the people the model will count. None: all the validation people.")
    require_gpu: bool = Field(
        False, description="Refuse to train when the Keras backend sees no GPU (instead of "
        "warning when the CPU training would be long).")

    def key_settings(self) -> dict:
        """What cache keys read of this section: without the settings of ``TRAIN_OFF``
        while they are off, so models trained before they existed stay current."""
        return self.model_dump(exclude={"loader"} | {k for k, off in TRAIN_OFF.items()
                                                     if getattr(self, k) == off})


# train settings added since models were first trained, with the value that means "off"
TRAIN_OFF = {"ema_momentum": None, "age_mean_weight": 0.0, "feature_cache": True,
             "calibration_bias": False, "calibration_folder": None}


def check_calibration_folder(cfg: TrainConfig, folders: list[str]) -> None:
    """Raise ValueError unless ``train.calibration_folder`` is unset or one of the run's
    ``data.folders`` (``folders``: their names)."""
    name = cfg.calibration_folder
    if name is not None and not folders:
        raise ValueError(f"train.calibration_folder: {name!r} needs several labelled folders "
                         "(data.folders); with one folder every validation person is of "
                         "it: leave it unset")
    if name is not None and name not in folders:
        raise ValueError(f"train.calibration_folder: {name!r} is not one of data.folders' "
                         f"names ({', '.join(folders)}): give one of them, or none")


def sample_weights(age_idx: np.ndarray, mode: str) -> np.ndarray:
    """Per-sample weights: 1, or inverse age-band frequency normalised to mean 1."""
    if mode == "none":
        return np.ones(len(age_idx), np.float32)
    counts = np.bincount(age_idx, minlength=len(AGE_BANDS)).astype(np.float64)
    per_class = np.where(counts > 0, len(age_idx) / (len(AGE_BANDS) * np.maximum(counts, 1)),
                         0.0)
    return per_class[age_idx].astype(np.float32)


def cpu_time_estimate(n_train: int, size: int, backbone: str, epochs: int) -> float:
    """Seconds a CPU training would take on this project's 2-core machine (a rough
    guide: the warning shows it, it decides nothing else)."""
    rate = CPU_IMAGES_PER_S_224.get(backbone, 5.0) * (224 / size) ** 2
    return n_train * epochs / rate


def check_device(n_train: int, size: int, backbone: str, cfg: TrainConfig) -> list[str]:
    """The GPUs the backend sees; with none, raise (``require_gpu``) or warn loudly when
    the estimated CPU time is long."""
    gpus = accelerators()
    if gpus:
        return gpus
    epochs = cfg.epochs if cfg.steps_per_epoch is None else math.ceil(
        cfg.epochs * cfg.steps_per_epoch * cfg.batch_size / max(1, n_train))
    estimate = cpu_time_estimate(n_train, size, backbone, epochs)
    message = (f"no GPU visible to Keras ({keras_backend()} backend): training {backbone} at "
               f"{size}px on {n_train:,} faces for {epochs} epochs would take about "
               f"{estimate / 3600:.1f} h on a 2-core CPU (GPU: pip install -e '.[gpu]', see "
               "docs/training.md)")
    if cfg.require_gpu:
        raise GPURequiredError(f"train.require_gpu is set and there is no GPU: {message}")
    if estimate > LONG_CPU_TRAINING_S:
        log.warning("WARNING: %s", message)
    return gpus


def legacy_exp_decay(epoch: int, lr: float = 0.0) -> float:
    """The original's schedule: 0.01 * exp(-0.1 * epoch) (ignores Adam's 1e-3)."""
    return 0.01 * math.exp(-0.1 * epoch)


def train_model(crops: CropSet, size: int, model_cfg: ModelConfig, cfg: TrainConfig,
                model_dir: Path, log_dir: Path, crop_spec: dict | None = None) -> dict:
    """Train and write ``model_dir/{model.keras,labels.json,history.json,history.csv}``.

    ``crops``: the crop shards and their index (``tasks.crop_stream.load_index``).
    ``crop_spec`` (the detector margin settings that made the training crops) is stored
    in labels.json so that inference cuts faces exactly as training did.

    Resumes from ``model_dir/backup`` if a previous run of the same training was killed,
    keeping the best checkpoint and its value. Returns a summary with the best epoch's
    validation metrics (the epoch of the saved model).
    """
    keras = load_keras()
    train, val = crops.splits["train"], crops.splits["val"]
    if train.empty or val.empty:
        raise ValueError(f"need examples in both splits (train {len(train)}, val {len(val)})")
    gpus = check_device(len(train), size, model_cfg.backbone, cfg)
    ages = exact_ages(model_cfg, train, val)
    heads = ["gender", "age_band", *(["age"] if ages else [])]
    model_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, history = fit_model(keras, crops, size, model_cfg, cfg, model_dir, log_dir,
                                    ages, heads, gpus)
    write_model_folder(model_dir, model_cfg, size, heads, ages, crop_spec, history, crops,
                       cfg)
    chosen = checkpoint.state  # the saved model's epoch and metrics, across resumes
    speed = history.train_images_per_s.iloc[-1] if "train_images_per_s" in history else None
    return {"epochs_run": int(len(history)), "best_epoch": chosen["epoch"] + 1,
            "val_gender_accuracy": chosen["val_gender_accuracy"],
            "val_age_band_accuracy": chosen["val_age_band_accuracy"],
            "train_examples": len(train), "val_examples": len(val), "heads": heads,
            "backend": keras_backend(), "gpus": gpus,
            "resumed_after_epochs": checkpoint.epochs_before,
            "last_epoch_train_images_per_s": None if speed is None else round(float(speed), 1)}


def fit_model(keras, crops: CropSet, size: int, model_cfg: ModelConfig, cfg: TrainConfig,
              model_dir: Path, log_dir: Path, ages: tuple[int, ...], heads: list[str],
              gpus: list[str]):
    """Build, start (``model.init``), compile and fit the network; the best epoch's
    model is left in ``model_dir/best.keras``. Returns the checkpoint callback (its
    ``state``: the best epoch and its metrics, across resumes) and the history."""
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(precision_policy(cfg, gpus))
    with _strategy(gpus).scope():
        fit = fit_plan(crops, size, model_cfg, cfg, model_dir, ages, gpus)
        if model_cfg.init != "none":
            started = initialise(fit.model, model_cfg.init)
            log.info("train: %d layers start from model.init %s", len(started),
                     model_cfg.init)
        compile_model(keras, fit.model, cfg, cfg.steps_per_epoch or len(fit.train), heads,
                      ages)
    history_csv = model_dir / "history.csv"
    checkpoint = best_checkpoint(keras, model_dir / "best.keras", "val_age_band_accuracy")
    fit.model.fit(fit.train, validation_data=fit.val, epochs=cfg.epochs,
                  callbacks=training_callbacks(keras, cfg, len(crops.splits["train"]),
                                               checkpoint, history_csv, model_dir, log_dir),
                  steps_per_epoch=cfg.steps_per_epoch, verbose=2)
    if fit.decoder is not None:  # the decoding processes (train.loader: processes)
        fit.decoder.close()
    del fit  # the saved checkpoint is the result: free the training graphs
    keras.backend.clear_session()  # before evaluation loads the model
    return checkpoint, pd.read_csv(history_csv).drop_duplicates("epoch", keep="last")


def write_model_folder(model_dir: Path, model_cfg: ModelConfig, size: int, heads: list[str],
                       ages: tuple[int, ...], crop_spec: dict | None, history: pd.DataFrame,
                       crops: CropSet, train_cfg: TrainConfig) -> None:
    """The serving model folder from the best checkpoint: ``model.keras`` (no optimizer
    state, which would double its file), ``history.json``, and ``labels.json`` with the
    calibration fitted on the validation people and the model's id."""
    best = model_dir / "best.keras"
    save_final_model(load_classifier(best, compile=False), model_cfg, size, ages, model_dir)
    best.unlink()
    shutil.rmtree(model_dir / "features", ignore_errors=True)  # (kept only for a resume)
    write_json_atomic(model_dir / "history.json",
                      {col: history[col].tolist() for col in history.columns})
    write_calibrated_labels(model_dir, model_labels(model_cfg, size, heads, ages, crop_spec),
                            crops, size, train_cfg)


def write_calibrated_labels(model_dir: Path, labels: dict, crops: CropSet, size: int,
                            cfg: TrainConfig) -> dict:
    """Fit the calibration of ``model_dir/model.keras`` on the validation people
    (``fit_calibration``) and write ``labels.json``: ``labels`` with the calibration's
    keys replaced and the model's id. Also all a run does when only the calibration
    settings (``CALIBRATION_SETTINGS``) changed: the network is kept. Returns the
    calibration."""
    calibration, age_line = fit_calibration(model_dir / "model.keras", crops.splits["val"],
                                            crops.files, size,
                                            tuple(labels.get("ages", ())), cfg)
    labels = {k: v for k, v in labels.items() if k not in CALIBRATION_KEYS}
    labels.update(calibration_labels(calibration, cfg.calibration_folder, age_line))
    # one id for the network with its calibration (both make the probabilities) and its
    # exports: kface stats checks a reference's
    labels["model_id"] = fingerprint(file_sha256(model_dir / "model.keras"),
                                     *(labels.get(k) for k in CALIBRATION_KEYS))
    write_json_atomic(model_dir / "labels.json", labels)
    return calibration


def exact_ages(model_cfg: ModelConfig, train: pd.DataFrame, val: pd.DataFrame
               ) -> tuple[int, ...]:
    """The exact-age head's classes: the training ages (20-59, wider where ``data.ages``
    kept more), or none when the head is off or the labels give bands only."""
    if not model_cfg.exact_age:
        return ()
    if not has_exact_ages(train, val):
        log.info("model.exact_age: the labels give age bands only (no exact age for every "
                 "face, as with K-Face): training the age-band head alone")
        return ()
    return age_classes(int(train.age.min()), int(train.age.max()))


def loader_kind(cfg: TrainConfig, gpus: list[str]) -> str:
    """``train.loader`` with 'auto' resolved: decoding processes on a GPU, threads on the
    CPU (there the two are equally fast, ``bench/bench_loader.py``; on a GPU the threads
    share one GIL with the loop that feeds the device)."""
    if cfg.loader == "auto":
        return "processes" if gpus else "threads"
    return cfg.loader


def precision_policy(cfg: TrainConfig, gpus: list[str]) -> str:
    """Mixed precision on a GPU (float16 on TensorFlow, bfloat16 on JAX and PyTorch)."""
    if cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and gpus):
        return "mixed_float16" if keras_backend() == "tensorflow" else "mixed_bfloat16"
    return "float32"


@dataclass
class FitPlan:
    """What ``fit`` trains and on what: the whole classifier on the streamed crops, or,
    with ``model.frozen_until`` and ``train.feature_cache``, its trained part on the
    frozen part's cached output (``tasks.feature_cache``)."""

    model: object
    train: object
    val: object
    decoder: DecodeProcesses | None = None  # train.loader: processes, for both streams


def fit_plan(crops: CropSet, size: int, model_cfg: ModelConfig, cfg: TrainConfig,
             model_dir: Path, ages: tuple[int, ...], gpus: list[str]) -> FitPlan:
    train, val = crops.splits["train"], crops.splits["val"]
    sigma = cfg.age_sigma if ages else None
    weights = sample_weights(train.age_idx.to_numpy(), cfg.class_weighting)
    if model_cfg.frozen_until != "none" and cfg.feature_cache:
        from tasks.feature_cache import cache_features, feature_batches

        log.info("train: the backbone up to %s is frozen; its output for every face and its "
                 "mirror is computed once (the augmentation is the mirror only)",
                 model_cfg.frozen_until)
        lower, upper = build_parts(model_cfg, size, bool(ages), ages or AGES)
        cached = {name: cache_features(lower, split, crops.files, size,
                                       model_dir / "features" / f"{name}.npy",
                                       workers=cfg.workers)
                  for name, split in (("train", train), ("val", val))}
        return FitPlan(upper, feature_batches(
            cached["train"], train, cfg.batch_size, seed=cfg.seed, weights=weights,
            age_sigma=sigma, age_classes=ages or AGES, workers=cfg.workers),
            feature_batches(cached["val"], val, cfg.batch_size, age_sigma=sigma,
                            age_classes=ages or AGES, workers=cfg.workers))
    decoder = (DecodeProcesses(cfg.workers, cfg.batch_size, size)
               if loader_kind(cfg, gpus) == "processes" else None)
    return FitPlan(
        build_classifier(model_cfg, size, exact_age=bool(ages), ages=ages or AGES),
        crop_batches(train, crops.files, size, cfg.batch_size, seed=cfg.seed,
                     augment_cfg=cfg.augment, weights=weights,
                     buffer_chunks=cfg.shuffle_buffer_chunks, workers=cfg.workers,
                     age_sigma=sigma, age_classes=ages or AGES, decoder=decoder),
        crop_batches(val, crops.files, size, cfg.batch_size, workers=cfg.workers,
                     buffer_chunks=cfg.shuffle_buffer_chunks, age_sigma=sigma,
                     age_classes=ages or AGES, decoder=decoder), decoder)


def compile_model(keras, model, cfg: TrainConfig, steps: int, heads: list[str],
                  ages: tuple[int, ...]) -> None:
    """Adam (cosine-decayed by default) on each head's loss, with accuracy metrics."""
    from models.losses import AgeLoss

    lr = (keras.optimizers.schedules.CosineDecay(cfg.learning_rate, steps * cfg.epochs,
                                                 alpha=0.01)
          if cfg.lr_schedule == "cosine" else cfg.learning_rate)
    model.compile(
        optimizer=keras.optimizers.Adam(lr, use_ema=cfg.ema_momentum is not None,
                                        ema_momentum=cfg.ema_momentum or 0.99),
        loss={"gender": "sparse_categorical_crossentropy",
              "age_band": "sparse_categorical_crossentropy",
              **({"age": AgeLoss(cfg.age_mean_weight, list(ages))} if ages else {})},
        loss_weights={h: cfg.loss_weights.get(h, 1.0) for h in heads},
        metrics={"gender": ["accuracy"], "age_band": ["accuracy"]},
    )


def training_callbacks(keras, cfg: TrainConfig, examples: int, checkpoint, history_csv: Path,
                       model_dir: Path, log_dir: Path) -> list:
    """Timer, best checkpoint, CSV history, backup (last: an epoch it has saved is in the
    checkpoint and the CSV), TensorBoard, the legacy schedule and early stopping."""
    callbacks = [
        epoch_timer(keras, cfg.batch_size, examples),
        # the averaged weights are validated and checkpointed (swapped before the others)
        *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema_momentum else []),
        checkpoint,
        keras.callbacks.CSVLogger(str(history_csv), append=True),
        async_safe(keras.callbacks.BackupAndRestore(str(model_dir / "backup"),
                                                    double_checkpoint=True)),
    ]
    if _tensorboard_available():
        # (no graph: writing it reads the model from the batch hook, which on JAX syncs
        # the training state from another thread while the next step consumes it)
        callbacks.append(async_safe(keras.callbacks.TensorBoard(log_dir=str(log_dir),
                                                                write_graph=False)))
    if cfg.lr_schedule == "legacy_exp":
        callbacks.append(keras.callbacks.LearningRateScheduler(legacy_exp_decay))
    if cfg.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_age_band_loss", mode="min", patience=cfg.early_stopping_patience))
    return callbacks


def save_final_model(best, model_cfg: ModelConfig, size: int, ages: tuple[int, ...],
                     model_dir: Path) -> None:
    """``model_dir/model.keras``: the best checkpoint (with ``frozen_until`` and the feature
    cache, the trained part it holds on a fresh frozen part), wrapped to average its
    answers with the mirror image's when ``model.flip_average``; written to a temporary
    file and renamed."""
    model = best
    if model_cfg.frozen_until != "none" and best.name == "trained":
        lower, _ = build_parts(model_cfg, size, bool(ages), ages or AGES)
        model = compose(lower, best)
    if model_cfg.flip_average:
        model = flip_averaged(model)
    tmp = model_dir / ".model.tmp.keras"
    model.save(tmp)
    tmp.replace(model_dir / "model.keras")


def model_labels(model_cfg: ModelConfig, size: int, heads: list[str], ages: tuple[int, ...],
                 crop_spec: dict | None) -> dict:
    """``labels.json`` but its calibration (``calibration_labels``): what every inference
    path needs to use the model as trained."""
    return {
        "gender": list(GENDERS), "age_band": list(AGE_BANDS), "input_size": size,
        "input": "RGB uint8 0..255, face box with margin resized (INTER_AREA)",
        "backbone": model_cfg.backbone, "outputs": heads,
        **({"ages": list(ages)} if ages else {}),
        "flip_average": model_cfg.flip_average,
        "crop": {"size": size, **(crop_spec or {})},
    }


# labels.json's keys that the calibration writes, and the train settings that change only
# them: a run whose other settings and inputs are unchanged refits these on the kept
# network (seconds) instead of training anew (the train row's partial_settings)
CALIBRATION_KEYS = ("temperature", "bias", "calibration", "age_calibration")
CALIBRATION_SETTINGS = ("calibration_bias", "calibration_folder")


def calibration_labels(calibration: dict, calibration_folder: str | None,
                       age_line: dict | None) -> dict:
    """``labels.json``'s calibration keys (``CALIBRATION_KEYS``) for a fitted calibration
    (``fit_calibration``)."""
    return {
        # divide each head's logits by this before the softmax (every inference path does)
        "temperature": {h: c["temperature"] for h, c in calibration.items()},
        # then add this bias per class (train.calibration_bias)
        **({"bias": bias} if (bias := {h: c["bias"] for h, c in calibration.items()
                                       if "bias" in c}) else {}),
        "calibration": {"split": "val", **({"folder": calibration_folder}
                                           if calibration_folder else {}), **calibration},
        # the exact-age head's line onto the true ages (expected_age applies it)
        **({"age_calibration": age_line} if age_line else {}),
    }


def fit_calibration(model_file: Path, val: pd.DataFrame, files: list[Path], size: int,
                    ages: tuple[int, ...], cfg: TrainConfig) -> tuple[dict, dict | None]:
    """Fitted on the validation split's predictions of the saved model
    (``models.calibration``), of ``cfg.calibration_folder``'s people only when set: a
    temperature per class head (gender, age band; with ``cfg.calibration_bias`` the age
    band's bias per band too), with the ECE before and after; and with an exact-age head
    (``ages``), the line that maps its expected age onto the true ages
    (``fit_age_line``)."""
    from models.calibration import calibrate, fit_age_line
    from tasks.evaluate import predict_frame

    if cfg.calibration_folder is not None and "source" in val:
        val = val[val.source == cfg.calibration_folder]
    probs = predict_frame(load_classifier(model_file), val, files, size)
    temperatures = calibrate(probs, {"gender": val.gender_idx.to_numpy(),
                                     "age_band": val.age_idx.to_numpy()},
                             bias_heads=("age_band",) if cfg.calibration_bias else ())
    line = (fit_age_line(expected_age(probs["age"], ages), val.age.to_numpy())
            if ages and "age" in probs else None)
    return temperatures, line


def epoch_timer(keras, batch_size: int, examples: int):
    """A callback adding ``train_seconds`` (the epoch's training, validation left out)
    and ``train_images_per_s`` to each epoch's logs (so to history.csv/json).

    It has no per-batch hook: one would make Keras wait for every step's result before
    it prepares the next (its callbacks run asynchronously only when no callback hooks
    batches), which starves a GPU. The epoch's images are its steps' (Keras' ``steps``
    parameter) times the batch size, the last batch counted at its size."""
    import time

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.trained = time.perf_counter(), None

        def on_test_begin(self, logs=None):
            if self.trained is None:  # validation at the end of an epoch (Keras has
                self.trained = time.perf_counter() - self.start  # synced the steps)

        def on_epoch_end(self, epoch, logs=None):
            seconds = self.trained or (time.perf_counter() - self.start)
            steps = self.params.get("steps") or math.ceil(examples / batch_size)
            images = min(steps * batch_size, examples)
            if logs is not None:
                logs["train_seconds"] = seconds
                logs["train_images_per_s"] = images / seconds

    return EpochTimer()


def async_safe(callback):
    """Mark a Keras callback whose per-batch hook neither saves nor reads the model
    (BackupAndRestore saving per epoch; TensorBoard without its graph) as safe to call
    asynchronously, so that it does not make Keras wait for every step (see
    ``epoch_timer``). A hook that reads ``self.model`` is not: on JAX that syncs the
    training state while the next step consumes it."""
    callback.async_safe = True
    return callback


def best_checkpoint(keras, path: Path, monitor: str):
    """A callback keeping the best epoch's model at ``path`` (written to a temporary file,
    then renamed: a kill never leaves half a model) and its epoch and metrics in
    ``path.json``. A resumed training starts from that stored best value, so a worse
    first epoch after the resume does not replace a better checkpoint, and the reported
    best epoch is always the saved model's."""
    state_path = path.with_suffix(".json")

    class BestCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.state = (json.loads(state_path.read_text())
                          if state_path.exists() and path.exists() else None)
            self.epochs_before = 0 if self.state is None else self.state["epochs_seen"]

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            value = float(logs[monitor])
            seen = max(epoch + 1, self.epochs_before)
            if self.state is None or value > self.state[monitor]:
                tmp = path.with_name(f".{path.stem}.tmp.keras")
                self.model.save(tmp)
                tmp.replace(path)
                self.state = {"epoch": epoch, **{k: float(v) for k, v in logs.items()
                                                 if k.startswith("val_")}}
            self.state["epochs_seen"] = seen
            write_json_atomic(state_path, self.state)

    return BestCheckpoint()


def _strategy(gpus: list[str]):
    """TensorFlow's MirroredStrategy over several GPUs; else a no-op scope."""
    import contextlib

    if keras_backend() == "tensorflow" and len(gpus) > 1:
        import tensorflow as tf

        return tf.distribute.MirroredStrategy()
    return type("Default", (), {"scope": staticmethod(contextlib.nullcontext)})()


def _tensorboard_available() -> bool:
    """Keras' TensorBoard callback writes with TensorFlow, which a JAX or PyTorch machine
    may lack."""
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def load_history(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "history.json").read_text())
