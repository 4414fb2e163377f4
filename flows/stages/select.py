"""The select stage: the usable photos of the dataset, with their content hashes and
labels, as ``manifest.parquet``."""

from __future__ import annotations

from core.labelled import DatasetError
from core.storage import (
    content_digest,
    readers_table_digest,
    store_readers_digest,
    table_digest,
    write_json_atomic,
    write_parquet_atomic,
)
from flows.machinery import Stage, StageConfig, stage_log
from tasks import select


def _scan(c: StageConfig):
    """The selected photos with their sha256 (read only where the stat cache has no
    entry of that size and mtime: ``core.content``)."""
    return c.memo_get("scan", lambda: select.select_images(
        c.data, c.selection, c.folder.file_hashes, save_hashes=c.writing))


def _source(c: StageConfig) -> str:
    """The scan's result (paths below the root, sizes, content, labels), not where the
    root or the labels file is. A K-Face tree whose walk sees the names the manifest's
    scan saw, each photo with the manifest's size and mtime, gives the manifest's digest
    without parsing and hashing (``select.manifest_is_current``: 583,200 photos in ~3 s
    instead of ~15 s)."""
    stored = ROW.stored_summary(c.folder)
    if select.manifest_is_current(c.data, c.selection, c.folder.manifest,
                                  stored.get("listing_digest")):
        if c.writing:  # a manifest of a kface before 2026-12-04: store its readers' digest
            store_readers_digest(c.folder.manifest, ROW.readers_leave_out)
        return content_digest(c.folder.manifest)
    table, report = _scan(c)
    digest = table_digest(table)
    if (c.writing and stored and report.listing_digest != stored.get("listing_digest")
            and digest == content_digest(c.folder.manifest)):
        # the manifest is current but its summary lacks this walk's names (a run folder
        # of a kface before 2026-12, or a copied tree): record them for the next time
        write_json_atomic(ROW.summary_file(c.folder),
                          {**stored, "listing_digest": report.listing_digest})
    return digest


def _same_for_readers(c: StageConfig) -> str | None:
    """When the scan differs from the manifest in the photos' mtimes only (a copied or
    touched tree), what status says; else None."""
    table, _ = _scan(c)
    if readers_table_digest(table, ROW.readers_leave_out) != c.readers_digest(ROW):
        return None
    return ("what the stages after it read is unchanged (the photos, their content and "
            "labels; file times may differ, as in a copied tree): the run rewrites the "
            "manifest and recomputes nothing after it")


def _check(c: StageConfig) -> None:
    select.check_dataset(c.data)


def _run(c: StageConfig, key: str) -> dict:
    table, report = _scan(c)
    write_parquet_atomic(c.folder.manifest, table, key,
                         readers_leave_out=ROW.readers_leave_out)
    summary = {"rows_in": report.images, "rows_out": table.num_rows,
               "subjects": len(set(table.column("subject_id").to_pylist())),
               **report.as_dict()}
    scanned = ("of the photos in the selected accessory, light and expression folders, "
               "the others not read; cameras chosen by file name"
               if c.data.layout == "kface" else "of the labelled photos")
    logger = stage_log()
    logger.info("select: %d of %d images selected (%d subjects; %s); %d files not in the "
                "layout%s; %d photos read for their content hash (new, changed or copied; "
                "the others by their size and mtime)", table.num_rows, report.images,
                summary["subjects"], scanned, report.unrecognised,
                f", e.g. {report.unrecognised_examples[:3]}" if report.unrecognised else "",
                report.files_hashed)
    if report.excluded_labels:
        logger.warning("select: %d labelled images excluded: %s", report.excluded_labels,
                       report.excluded_label_examples[:5])
    return summary


ROW = Stage(name="select", work=select.select_images, reads=(), writes="manifest",
            sections=("data", "selection"), code_version=select.CODE_VERSION, scope="data",
            key_settings=("data.layout", "data.resolution", "selection"),
            stale_detail="the dataset or selection changed", check=_check,
            errors=(DatasetError,), source=_source, run=_run,
            readers_leave_out=("mtime_ns",), same_for_readers=_same_for_readers)
