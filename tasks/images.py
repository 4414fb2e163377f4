"""Decoding photos robustly: one function that every stage uses to read an image.

Bad files (empty, truncated, not an image, unreadable, too large, broken links) raise
``ImageError`` with a one-line reason; callers turn that into an ``error`` row.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # we apply our own limit, with a clear message

_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageError(ValueError):
    """An image cannot be decoded; ``str(exc)`` is the reason."""


def image_header(path: Path) -> tuple[int, int, str]:
    """Return ``(width, height, format)`` from the file header without decoding pixels."""
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with Image.open(path) as im:
            return im.size[0], im.size[1], (im.format or "").upper()
    except FileNotFoundError as exc:
        raise ImageError("file not found (missing file or broken symlink)") from exc
    except PermissionError as exc:
        raise ImageError("permission denied") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not a recognised image format") from exc
    except OSError as exc:
        raise ImageError(f"cannot read header: {exc}") from exc


def reduction_factor(width: int, height: int, fmt: str, min_side: int) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) keeping the short side >= ``min_side``."""
    if fmt != "JPEG" or min_side <= 0:
        return 1
    factor = 1
    for f in (2, 4, 8):
        if min(width, height) / f >= min_side:
            factor = f
    return factor


def load_image(path: Path, min_decode_side: int = 0,
               max_pixels: int = 200_000_000) -> tuple[np.ndarray, int, int, int]:
    """Decode ``path`` to a BGR uint8 array.

    Returns ``(image, width, height, factor)``: ``width``/``height`` are the full-size
    dimensions (as stored, EXIF orientation applied), ``factor`` the reduction used.
    """
    width, height, fmt = image_header(path)
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} = {width * height:,} pixels exceeds detector.max_pixels "
            f"({max_pixels:,}): possible decompression bomb"
        )
    factor = reduction_factor(width, height, fmt, min_decode_side)
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc}") from exc
    if fmt == "JPEG" and b"\xff\xd9" not in buf[-1024:].tobytes():
        # libjpeg pads a truncated file with grey and only warns; treat it as an error
        raise ImageError("truncated JPEG (no end-of-image marker)")
    image = cv2.imdecode(buf, _REDUCED.get(factor, cv2.IMREAD_COLOR))
    if image is None:
        raise ImageError(f"OpenCV cannot decode this {fmt or 'file'} (truncated or corrupt)")
    h, w = image.shape[:2]
    if factor == 1:
        width, height = w, h
    elif (w > h) != (width > height) and w != h:  # EXIF rotation swapped the axes
        width, height = height, width
    return image, width, height, factor
