"""Scanning speed of the select stage on a generated K-Face tree (empty files; the full
6 x 30 x 3 x 20 grid per subject, 10,800 files each): our scan, which lists only the
selected accessory/light/expression folders, vs a full walk of the tree with the same
exact selection (the previous select stage) and vs the original's ``os.walk`` +
substring loop, same tree, same run, page cache warm for all.
``python bench/bench_scan.py [--subjects 400]`` (400: 4.32M files, ~17 GB of inodes'
worth of metadata; building the tree takes several minutes, kept for reruns)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.select import (  # noqa: E402
    DataConfig,
    SelectionConfig,
    _walk,
    is_selected,
    parse_kface_path,
    select_images,
)


def make_tree(root: Path, subjects: int) -> int:
    n = 0
    flags = os.O_CREAT | os.O_WRONLY
    for s_i in range(subjects):
        for s in range(1, 7):
            for light in range(1, 31):
                for e in range(1, 4):
                    d = os.path.join(root, "High_Resolution", f"{19062400 + s_i:08d}",
                                     f"S{s:03d}", f"L{light}", f"E{e:02d}")
                    os.makedirs(d, exist_ok=True)
                    for c in range(1, 21):
                        os.close(os.open(os.path.join(d, f"C{c}.jpg"), flags, 0o644))
                        n += 1
    return n


def original(root: Path) -> int:
    sel = SelectionConfig()
    lists = (sel.accessories, sel.lights, sel.cameras, sel.expressions)
    found = []
    for dirpath, _, files in os.walk(root / "High_Resolution"):
        for f in files:
            if ".jpg" in f:
                path = os.path.join(dirpath, f)
                if all(any(u in path for u in values) for values in lists):
                    found.append(path)
    return len(found)


def full_walk(root: Path) -> int:
    """The previous select stage: every file of the tree parsed, then the exact rule."""
    sel = SelectionConfig()
    n = 0
    for parts, entry in _walk(str(root / "High_Resolution"), ()):
        attrs = parse_kface_path(parts)
        if attrs and is_selected(attrs, "", sel):
            entry.stat()
            n += 1
    return n


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=19, help="x10,800 files each")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "scan")
    args = ap.parse_args()
    root = args.work / f"tree-{args.subjects}"
    marker = root / "done"
    if not marker.exists():
        make_tree(root, args.subjects)
        marker.touch()
    files = args.subjects * 6 * 30 * 3 * 20
    original(root)  # warm the page cache for all three
    n_orig, t_orig = timed(original, root)
    n_full, t_full = timed(full_walk, root)
    (table, report), t_ours = timed(select_images, DataConfig(root=root), SelectionConfig())
    print(json.dumps({
        "subjects": args.subjects, "files": files, "selected_ours": table.num_rows,
        "selected_full_walk": n_full, "selected_original": n_orig,
        "files_listed_ours": report.images + report.annotations,
        "ours_s": round(t_ours, 2), "full_walk_s": round(t_full, 2),
        "original_s": round(t_orig, 2),
        "ratio_full_walk_over_ours": round(t_full / t_ours, 1),
        "ratio_original_over_ours": round(t_orig / t_ours, 1),
        "ours_includes": "listing of the selected folders, regex parse, stat of selected "
                         "files, manifest table",
    }, indent=2))


if __name__ == "__main__":
    main()
