"""Decoding one image file and fitting it to the configured resolution (PIL), for the dataset readers of
:mod:`ddkit.data.registry`: a bad file raises :class:`DataError` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ddkit.errors import DataError


def fit_image(img: Any, resolution: int, channels: int) -> np.ndarray:
    """Resize the shorter side to ``resolution`` and center-crop (bicubic), as IDC's
    ``transforms.Resize(size), transforms.CenterCrop(size)`` (snu-mllab/Efficient-Dataset-Condensation
    data.py). Returns uint8 [resolution, resolution, channels]."""
    from PIL import Image, ImageOps

    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (resolution, resolution):
        img = ImageOps.fit(
            img, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5)
        )
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def open_image(path: Path, expect_size: int | None = None) -> Any:
    """Open and fully decode an image file (PIL).

    Raises:
        DataError: unreadable/truncated file, or (``expect_size``) not ``expect_size``x``expect_size``.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            img = im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: unreadable image ({msg})") from None
    if expect_size is not None and img.size != (expect_size, expect_size):
        raise DataError(
            f"{path}: wrong resolution {img.size[0]}x{img.size[1]}, expected {expect_size}x{expect_size}"
        )
    return img
