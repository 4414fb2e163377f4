"""Decoding photos robustly: one function that every stage uses to read an image.

Bad files (empty, truncated, not an image, unreadable, too large, broken links) raise
``ImageError`` with a one-line message and a short ``reason``; callers turn that into an
``error`` row. A read that fails for a passing reason (EIO, a timeout, a stale NFS handle:
``TRANSIENT_ERRNOS``) is retried a few times with back-off (``read_file``); if it still
fails the error is ``transient`` and the stages retry that photo on their next run, while
a file that was read but is not a valid image stays a final error.
"""

from __future__ import annotations

import errno
import io
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
Image.MAX_IMAGE_PIXELS = None  # we apply our own limit, with a clear message

_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


# errors of a read that may well succeed a moment later (network and flaky disks)
TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY,
    errno.ENOTCONN, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
    errno.ENETDOWN, errno.ENETUNREACH, errno.ENOLCK, errno.EREMOTEIO})
READ_ATTEMPTS = 3  # first try + 2 retries, 0.2 s and 0.8 s apart


class ImageError(ValueError):
    """An image cannot be used; ``str(exc)`` is the message, ``reason`` a short code
    (``empty``, ``missing``, ``permission``, ``io``, ``not_image``, ``truncated``,
    ``corrupt``, ``too_large``, ``decode``) and ``transient`` whether a later run may
    succeed without the file changing (``io`` and ``permission``)."""

    def __init__(self, message: str, reason: str = "corrupt", transient: bool = False):
        super().__init__(message)
        self.reason = reason
        self.transient = transient


def read_file(path: Path, attempts: int = READ_ATTEMPTS, delay: float = 0.2) -> bytes:
    """The file's bytes; a transient OS error is retried ``attempts - 1`` times with
    back-off (``delay``, then 4x), then raised as a transient ``ImageError``."""
    for attempt in range(attempts):
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError as exc:
            raise ImageError("file not found (missing file or broken symlink)",
                             "missing") from exc
        except PermissionError as exc:
            # fixed by a chmod, which does not change the file's mtime: retry next run
            raise ImageError("permission denied", "permission", transient=True) from exc
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS:
                raise ImageError(f"cannot read file: {exc.strerror or exc}", "io") from exc
            if attempt == attempts - 1:
                raise ImageError(f"read failed {attempts} times: {exc.strerror or exc} "
                                 "(retried on the next run)", "io", transient=True) from exc
            time.sleep(delay * 4 ** attempt)
    raise AssertionError("unreachable")


def image_header(data: bytes) -> tuple[int, int, str]:
    """Return ``(width, height, format)`` from the file's header bytes (no decoding)."""
    if not data:
        raise ImageError("empty file (0 bytes)", "empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0], im.size[1], (im.format or "").upper()
    except UnidentifiedImageError as exc:
        raise ImageError("not a recognised image format", "not_image") from exc
    except OSError as exc:
        raise ImageError(f"cannot read header: {exc}", "corrupt") from exc


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
    data = read_file(Path(path))  # one read: header and pixels come from these bytes
    width, height, fmt = image_header(data)
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} = {width * height:,} pixels exceeds detector.max_pixels "
            f"({max_pixels:,}): possible decompression bomb", "too_large"
        )
    factor = reduction_factor(width, height, fmt, min_decode_side)
    if fmt == "JPEG" and b"\xff\xd9" not in data[-1024:]:
        # libjpeg pads a truncated file with grey and only warns; treat it as an error
        raise ImageError("truncated JPEG (no end-of-image marker)", "truncated")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8),
                         _REDUCED.get(factor, cv2.IMREAD_COLOR))
    if image is None:
        raise ImageError(f"OpenCV cannot decode this {fmt or 'file'} (truncated or corrupt)",
                         "decode")
    h, w = image.shape[:2]
    if factor == 1:
        width, height = w, h
    elif (w > h) != (width > height) and w != h:  # EXIF rotation swapped the axes
        width, height = height, width
    return image, width, height, factor


@dataclass(frozen=True)
class ImageRoots:
    """Where a manifest's paths live. One folder (``root / path``), or several labelled
    folders by name: then a path's first part names its folder (``aaf/0001.jpg`` is
    ``folders['aaf'] / '0001.jpg'``). Small and picklable: worker processes get it."""

    root: Path
    folders: tuple[tuple[str, Path], ...] = ()

    def __call__(self, rel: str) -> Path:
        if not self.folders:
            return Path(self.root) / rel
        name, _, rest = rel.partition("/")
        for folder, root in self.folders:
            if folder == name:
                return Path(root) / rest
        raise ImageError(f"{rel}: no labelled folder named {name!r} in this run", "missing")


def as_roots(root: Path | ImageRoots) -> ImageRoots:
    """``root`` as ``ImageRoots`` (a plain folder is the one root)."""
    return root if isinstance(root, ImageRoots) else ImageRoots(Path(root))
