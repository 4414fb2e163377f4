"""Ground-truth face boxes beside photos: ``Cnn.txt`` next to ``Cnn.jpg``, one line
``left top right bottom`` in pixels, as K-Face ships for some photos and as the sample
generator writes for every placed face."""

from __future__ import annotations

from pathlib import Path

Box = tuple[int, int, int, int]


def write_box_file(path: Path, box: Box) -> None:
    """Write ``box`` as one line ``left top right bottom``."""
    Path(path).write_text(" ".join(str(int(v)) for v in box) + "\n")


def read_box_file(path: Path) -> Box:
    """Read a ground-truth ``Cnn.txt``: one line ``left top right bottom`` (pixels)."""
    values = Path(path).read_text().split()
    if len(values) != 4:
        raise ValueError(f"{path}: expected 'left top right bottom', got {values!r}")
    left, top, right, bottom = (int(v) for v in values)
    return left, top, right, bottom
