"""Inputs for depth compensation, shared by its tests and its benchmark: a sample photo as Preprocess
hands it over, and the same photo with its top half out of focus (a synthetic depth of field)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps


def at_1024(path: Path) -> Image.Image:
    """The photo at `path` oriented, RGB, 1024 px on its long edge."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    image.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
    return image


def with_background_blur(image: Image.Image, sigma: float) -> np.ndarray:
    """`image` with its top half Gaussian-blurred: a background out of focus behind a sharp foreground."""
    array = np.array(image)
    half = array.shape[0] // 2
    array[:half] = np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)))[:half]
    return array
