"""The evaluate stage: the trained model scored on the test people (or the validation
people when the split has no test split), into the experiment's ``reports/``; and the
experiments' table (``kface experiments``)."""

from __future__ import annotations

import json
from pathlib import Path

from core.labels import AGES
from core.run_folder import RunFolder
from flows.machinery import Stage, StageConfig, in_run, stage_log, work_seconds
from flows.stages.crops import crop_index
from flows.stages.train import ROW as train_row
from models.calibration import model_calibration
from models.scoring import write_report
from tasks import evaluate, select, train


def _run(c: StageConfig, key: str) -> dict:
    from models.classifier import load_classifier

    folder = c.folder
    index = crop_index(c)
    model = load_classifier(folder.model_file)
    model_labels = json.loads((folder.model / "labels.json").read_text())
    metrics = evaluate.evaluation_metrics(model, index, c.crops.size,
                                          synthetic_labels=labels_are_synthetic(c.data),
                                          calibration=model_calibration(model_labels),
                                          ages=tuple(model_labels.get("ages", AGES)),
                                          age_line=model_labels.get("age_calibration"))
    report_path = write_report(metrics, train.load_history(folder.model),
                               c.upstream_summary("split"), c.upstream_summary("faces"),
                               folder.reports)
    scored = metrics["scored_split"]
    if in_run():  # the report in the Prefect UI
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_markdown_artifact(key="kface-report", markdown=report_path.read_text(),
                                 description="Evaluation report")
        create_table_artifact(key="kface-metrics", table=[
            {"head": h, "split": scored, "accuracy": metrics[h]["accuracy"],
             "ci95": metrics[h]["ci95"]["accuracy"], "macro_f1": metrics[h]["macro_f1"],
             "majority_baseline": metrics[h]["baselines"]["majority_class"]["accuracy"]}
            for h in ("gender", "age_band")], description=f"Metrics on the {scored} split")
    logger = stage_log()
    for warning in metrics["warnings"]:
        logger.warning("evaluate: %s", warning)
    g, a = metrics["gender"], metrics["age_band"]
    logger.info("evaluate (%s, %d subjects): gender %.3f [%.3f-%.3f], age band %.3f "
                "[%.3f-%.3f] (majority class %.3f), within one band %.3f; report %s", scored,
                metrics["subjects"], g["accuracy"], *g["ci95"]["accuracy"], a["accuracy"],
                *a["ci95"]["accuracy"], a["baselines"]["majority_class"]["accuracy"],
                a["accuracy_within_one_band"], report_path)
    return {"rows_in": metrics["examples"], "rows_out": metrics["examples"],
            "report": str(report_path), "scored_split": scored,
            f"{scored}_gender_accuracy": g["accuracy"],
            f"{scored}_age_band_accuracy": a["accuracy"],
            f"{scored}_age_band_within_one": a["accuracy_within_one_band"],
            "warnings": metrics["warnings"]}


def labels_are_synthetic(data: select.DataConfig) -> bool:
    """Whether the sample generator marked this dataset's labels as made up."""
    from tasks.sample_data import SYNTHETIC_MARKER

    folders = {Path(data.root)}
    for label_file in (data.metadata, data.labels):
        if label_file:
            folders.add(Path(label_file).parent)
    return any((folder / SYNTHETIC_MARKER).exists() for folder in folders)


ROW = Stage(name="evaluate", work=evaluate.evaluation_metrics,
            reads=("model", "crops", "faces", "split"), writes="reports",
            sections=("data", "crops"), code_version=evaluate.CODE_VERSION,
            scope="experiment", stale_detail="the model or the test people changed",
            key_in="summary", run=_run)


def list_experiments(out: Path) -> list[dict]:
    """One summary per ``OUT/experiments/<name>/``: its recipe (from its config.yaml),
    the scored metrics, training time and state (evaluated / trained / training
    unfinished / not trained)."""
    import yaml

    rows = []
    for name in RunFolder(out).experiment_names():
        folder = RunFolder(out, name)
        config_file = folder.experiment_config
        cfg = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
        trained_summary = train_row.stored_summary(folder)
        scored_summary = ROW.stored_summary(folder)
        scored = scored_summary.get("scored_split", "")
        trained = folder.model_file.exists()
        state = ("evaluated" if scored_summary else "trained") if trained else "not trained"
        if any(folder.experiment_dir.glob(".training-*")):  # killed, or running now
            state = ("training unfinished" if state == "not trained"
                     else f"{state}; a newer training unfinished")
        metric = {name: scored_summary.get(f"{scored}_{name}") for name in (
            "gender_accuracy", "age_band_accuracy", "age_band_within_one")}
        metric = {k: f"{v:.3f}" if isinstance(v, float) else "-" for k, v in metric.items()}
        # (a run that only refitted the calibration keeps the training's time)
        trained_seconds = work_seconds(trained_summary)
        rows.append({
            "name": name,
            "backbone": cfg.get("model", {}).get("backbone", "-"),
            "input_size": cfg.get("crops", {}).get("size", "-"),
            "epochs": (f"{trained_summary['epochs_run']}/"
                       f"{cfg.get('train', {}).get('epochs', '?')}" if trained_summary else "-"),
            "gender": metric["gender_accuracy"], "age_band": metric["age_band_accuracy"],
            "within_one": metric["age_band_within_one"], "scored": scored or "-",
            "training": (f"{trained_seconds / 60:.1f} min" if trained_summary else "-"),
            "state": state,
            "model": str(folder.model),
        })
    return rows
