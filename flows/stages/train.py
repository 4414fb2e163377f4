"""The train stage: the age-band + gender classifier trained on the crops of the train
people, chosen and calibrated on the validation people, into the experiment's
``model/``. A change of the calibration settings only refits the calibration."""

from __future__ import annotations

import json
import shutil

from core.storage import replace_folder, write_bytes_atomic
from flows.machinery import Stage, StageConfig, stage_log
from flows.stages.crops import crop_index
from models.classifier import WeightsError
from models.detector import gives_landmarks
from models.mobilefacenet import MobileFaceNetError
from tasks import train


def _check(c: StageConfig) -> None:
    from models.classifier import check_weights

    check_weights(c.model)


def _run(c: StageConfig, key: str) -> dict:
    folder = c.folder
    # train beside the current model; it is replaced only once the new one is complete,
    # and a killed training of the same settings resumes from its own folder
    work = folder.experiment_dir / f".training-{key[:16]}"
    for other in folder.experiment_dir.glob(".training-*"):
        if other != work:
            shutil.rmtree(other)  # an unfinished training of other settings
    work.mkdir(parents=True, exist_ok=True)
    index = crop_index(c)
    crop_spec = {"margin": c.detector.margin, "margin_mode": c.detector.margin_mode,
                 "detector": c.detector.kind,
                 "align": c.crops.align and gives_landmarks(c.detector.kind)}
    result = train.train_model(index, c.crops.size, c.model, c.train, work, folder.logs,
                               crop_spec)
    write_bytes_atomic(folder.experiment_config, c.recipe_yaml().encode())
    replace_folder(work, folder.model)
    stage_log().info("train: %d epochs; best epoch %d: val gender %.3f, val age band %.3f",
                     result["epochs_run"], result["best_epoch"],
                     result["val_gender_accuracy"], result["val_age_band_accuracy"])
    return {"rows_in": result["train_examples"] + result["val_examples"],
            "rows_out": result["train_examples"], **result}


def _recalibrate(c: StageConfig, key: str) -> dict:
    """Only the calibration settings changed: refit the calibration of the trained
    network on the validation people, rewrite labels.json (the network, its history and
    any export stay)."""
    folder = c.folder
    index = crop_index(c)
    labels = json.loads((folder.model / "labels.json").read_text())
    calibration = train.write_calibrated_labels(folder.model, labels, index, c.crops.size,
                                                c.train)
    write_bytes_atomic(folder.experiment_config, c.recipe_yaml().encode())
    band = calibration["age_band"]
    stage_log().info(
        "train: the calibration settings changed: refitted on %d validation faces of the "
        "trained network (age band ECE %.3f -> %.3f%s), no training", band["examples"],
        band["ece_before"], band["ece_after"], ", a bias per band" if "bias" in band else "")
    return {"recalibrated": {"age_band_ece": band["ece_after"],
                             "examples": band["examples"],
                             "folder": c.train.calibration_folder,
                             "bias": c.train.calibration_bias}}


ROW = Stage(name="train", work=train.train_model, reads=("crops", "faces", "split"),
            writes="model", sections=("data", "detector", "crops", "model", "train"),
            code_version=train.CODE_VERSION, scope="experiment",
            key_settings=("crops", "model", "train"),
            stale_detail="inputs or model/train settings changed", check=_check,
            errors=(WeightsError, MobileFaceNetError), key_in="summary", run=_run,
            partial_settings=tuple(f"train.{k}" for k in train.CALIBRATION_SETTINGS),
            partial_run=_recalibrate,
            # (a labels.json removed by hand: train anew)
            partial_needs=lambda folder: (folder.model / "labels.json").is_file(),
            partial_detail="refits the calibration on the trained network (seconds) "
                           "instead of training anew")
