"""The merge stage: each detected face joined with its subject's age and gender, as
``faces.parquet`` (K-Face: the metadata CSV; other layouts: the labels the select stage
read)."""

from __future__ import annotations

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from core.storage import write_parquet_atomic
from flows.machinery import MissingInputError, Stage, StageConfig, stage_log
from tasks import detect, labels


def _check(c: StageConfig) -> None:
    """The K-Face metadata CSV, parsed whole (400 rows: about a second)."""
    if c.data.layout == "kface":
        if c.data.metadata is None:
            raise labels.LabelsError("the merge stage needs the K-Face metadata CSV: "
                                     "--metadata FILE (data.metadata)")
        labels.read_metadata(c.data.metadata)


def _run(c: StageConfig, key: str) -> dict:
    producer, view = c.upstream("detections")
    shards, folder = producer.shards(view), c.folder
    manifest = pq.read_table(folder.manifest).to_pandas()
    missing = [s.filename for s in shards if not (folder.detections / s.filename).exists()]
    if missing:  # (a --stages merge run after subjects were added)
        raise MissingInputError(
            f"merge: {len(missing)} planned detection shard(s) not on disk (e.g. "
            f"{folder.detections / missing[0]}): run with --stages detect,merge")
    # only the planned shards: files of an earlier plan are never merged
    detections = pads.dataset([str(folder.detections / s.filename) for s in shards],
                              schema=detect.DETECTIONS_SCHEMA, format="parquet"
                              ).to_table().to_pandas()
    _check(c)
    metadata = labels.read_metadata(c.data.metadata) if c.data.layout == "kface" else None
    table, report = labels.merge_faces(manifest, detections, metadata)
    write_parquet_atomic(folder.faces, table, key)
    logger = stage_log()
    logger.info("merge: %d faces of %d subjects from %d detections; per class %s",
                table.num_rows, report["subjects"], len(detections),
                report["joint_class_counts"])
    if report.get("subjects_without_labels"):
        logger.warning("merge: %d subjects have images but no metadata row (excluded): %s",
                       report["subjects_without_labels"],
                       report["subjects_without_labels_list"][:10])
    failed = detections[detections.status.isin(["error", "unreadable"])]
    return {"rows_in": len(detections), "rows_out": table.num_rows, **report,
            "detection_status_counts": detections.status.value_counts().to_dict(),
            "detection_errors": {status: rows.reason.fillna("unknown").value_counts().to_dict()
                                 for status, rows in failed.groupby("status")}}


ROW = Stage(name="merge", work=labels.merge_faces, reads=("manifest", "detections"),
            writes="faces", sections=("data",), code_version=labels.CODE_VERSION,
            scope="data", key_settings=("data.metadata",), check=_check,
            errors=(labels.LabelsError,), run=_run)
