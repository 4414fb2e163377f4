"""The split stage: each face's split (train, val, test), by subject, as
``split.parquet``."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from core.storage import write_parquet_atomic
from flows.machinery import Stage, StageConfig, stage_log
from tasks import split


def _run(c: StageConfig, key: str) -> dict:
    faces = pq.read_table(c.folder.faces).to_pandas()
    if faces.empty:
        raise split.SplitError(_no_faces_message(c))
    table, report = split.split_faces(faces, c.split)
    write_parquet_atomic(c.folder.split, pa.Table.from_pandas(table, preserve_index=False),
                         key)
    logger = stage_log()
    logger.info("split (%s): %s rows, subjects %s", c.split.strategy, report["rows"],
                report["subjects"])
    if report.get("warning"):
        logger.warning("split: %s", report["warning"])
    return {"rows_in": len(faces), "rows_out": len(table), **report}


def _no_faces_message(c: StageConfig) -> str:
    """Why no face reached the split, from the merge summary's counts of detections."""
    merge_summary = c.upstream_summary("faces")
    counts = merge_summary.get("detection_status_counts", {})
    problems = "; ".join(f"{reason} {n}"
                         for by_reason in merge_summary.get("detection_errors", {}).values()
                         for reason, n in sorted(by_reason.items()))
    return (f"no faces to split: of {merge_summary.get('rows_in', 0)} photos, detection "
            f"found a face in {counts.get('ok', 0)}, none in {counts.get('no_face', 0)}, and "
            f"{counts.get('error', 0) + counts.get('unreadable', 0)} could not be used"
            + (f" ({problems}; examples in {c.folder.stages})" if problems else "")
            + f"; {merge_summary.get('faces', 0)} of the faces have labels"
            + (" (check that the labels' subject IDs match the photos)"
               if counts.get("ok") and not merge_summary.get("faces") else ""))


ROW = Stage(name="split", work=split.split_faces, reads=("faces",), writes="split",
            sections=("split",), code_version=split.CODE_VERSION, scope="data",
            key_settings=("split",), run=_run)
