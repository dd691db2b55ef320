"""scikit-learn's bundled handwritten digits (1,797 real 8×8 images, offline) as 16×16 grayscale.

The toy preset's dataset: real images that install with scikit-learn, so the whole pipeline runs
with no download. Pixels 0..16 are scaled to 0..255 and upsampled 2× by pixel replication (no
interpolation: the result is exactly reproducible). One channel: the digits are gray, and a model
of three equal channels would spend its capacity (and our CPU) on copies.
"""
from __future__ import annotations

import numpy as np

from ect.data import DatasetError


def digits_images(resolution: int = 16) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    if resolution < 8 or resolution % 8:
        raise DatasetError(f"digits resolution must be a multiple of 8, not {resolution}")
    digits = load_digits()
    gray = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8)
    factor = resolution // 8
    gray = gray.repeat(factor, axis=1).repeat(factor, axis=2)
    return gray[..., None], digits.target.astype(np.int64)
