"""Scanning speed: paths/s of the select stage on a generated K-Face tree of >= 200,000
files (empty files; the full 6 x 30 x 3 x 20 grid per subject), vs the original's
``os.walk`` + substring loop on the same tree, same run.
``python bench/bench_scan.py [--subjects 19]``"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.select import DataConfig, SelectionConfig, select_images  # noqa: E402


def make_tree(root: Path, subjects: int) -> int:
    n = 0
    for s_i in range(subjects):
        for s in range(1, 7):
            for light in range(1, 31):
                for e in range(1, 4):
                    d = (root / "High_Resolution" / f"{19062400 + s_i:08d}" / f"S{s:03d}"
                         / f"L{light}" / f"E{e:02d}")
                    d.mkdir(parents=True, exist_ok=True)
                    for c in range(1, 21):
                        (d / f"C{c}.jpg").touch()
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
    original(root)  # warm the page cache for both
    t = time.perf_counter()
    n_orig = original(root)
    t_orig = time.perf_counter() - t
    t = time.perf_counter()
    table, report = select_images(DataConfig(root=root), SelectionConfig())
    t_ours = time.perf_counter() - t
    print(json.dumps({
        "files": files, "selected_ours": table.num_rows, "selected_original": n_orig,
        "ours_s": round(t_ours, 2), "ours_paths_s": round(files / t_ours),
        "original_s": round(t_orig, 2), "original_paths_s": round(files / t_orig),
        "ours_includes": "regex parse of every path, stat of selected files, manifest table",
    }, indent=2))


if __name__ == "__main__":
    main()
