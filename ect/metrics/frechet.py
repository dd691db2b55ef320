"""Feature statistics and the Fréchet distance, in float64.

Statistics follow clean-fid: mean and unbiased covariance. The Fréchet distance is computed from symmetric
eigendecompositions, because clean-fid's uses ``scipy.linalg.sqrtm(disp=...)``, which SciPy 1.18 removes.
A statistics file (``.npz``, no pickles) holds a mean and covariance per metric and a JSON meta.
"""
from __future__ import annotations

import io
import json

import numpy as np

from ect.fileio import open_npz, write_bytes_atomic
from ect.metrics import METRICS, FIDError

MAX_FEATURE_DIM = 8192  # Inception's features are 2048-d, DINOv2 ViT-L's 1024, ViT-g's 1536
MAX_STATS_BYTES = MAX_FEATURE_DIM**2 * 8 + 4096  # one covariance and its header


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(features) < 2:
        raise FIDError(f"need at least 2 images for FID statistics, got {len(features)}")
    features = features.astype(np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64, clamped at 0.

    tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2): A S2 A is symmetric PSD, so its
    square root's trace is the sum of the square roots of its eigenvalues.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise FIDError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    try:
        with np.errstate(over="raise", invalid="raise"):
            a = _sqrt_psd(s1)
            eig = np.linalg.eigvalsh(a @ s2 @ a)
            tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
            diff = mu1 - mu2
            distance = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    except (np.linalg.LinAlgError, FloatingPointError) as exc:
        raise FIDError(f"the Frechet distance of these statistics is not computable ({exc}): "
                       "they are not a feature network's") from None
    if not np.isfinite(distance):
        raise FIDError("the Frechet distance of these statistics is not finite: they are not a feature network's")
    return max(distance, 0.0)


def save_stats(path, stats: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
    """Reference statistics per FID mode: ``{mode: (mu, sigma)}``."""
    arrays = {f"{k}_{mode}": v for mode, (mu, sigma) in stats.items() for k, v in (("mu", mu), ("sigma", sigma))}
    buf = io.BytesIO()
    np.savez(buf, **arrays, meta=np.array(json.dumps({**meta, "modes": list(stats)}, sort_keys=True)))
    write_bytes_atomic(path, buf.getvalue())


def load_stats(path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Reference statistics from `ect fid-stats`, every field checked: modes we know, a finite float64 mean and
    covariance of matching dimensions, a JSON meta."""
    with open_npz(path, "FID statistics", FIDError, MAX_STATS_BYTES) as f:
        meta = json.loads(str(f["meta"]))
        modes = meta.get("modes") if type(meta) is dict else None
        if not (type(modes) is list and modes and all(type(m) is str and m in METRICS for m in modes)):
            raise FIDError(f"cannot read FID statistics {path}: its meta names no metrics")
        stats = {m: (f[f"mu_{m}"], f[f"sigma_{m}"]) for m in modes}
    for mode, (mu, sigma) in stats.items():
        if not (mu.dtype == np.float64 and sigma.dtype == np.float64 and mu.ndim == 1 and 0 < len(mu) <= MAX_FEATURE_DIM
                and sigma.shape == (len(mu), len(mu)) and np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise FIDError(f"FID statistics {path}: {mode} must be a finite float64 mean (D,) and covariance (D, D)")
    return stats, meta


def fid_of_sets(features: np.ndarray, mu_ref, sigma_ref, sets: int) -> list[float]:
    """Split the features (ordered by seed) into ``sets`` equal, consecutive sets; FID of each."""
    if sets < 1 or len(features) < 2 * sets:
        raise FIDError(f"cannot split {len(features)} samples into {sets} sets of at least 2")
    size = len(features) // sets
    return [frechet_distance(*statistics(features[i * size:(i + 1) * size]), mu_ref, sigma_ref) for i in range(sets)]




def moments_to_statistics(count: int, total: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance from (count, Σ f, Σ f fᵀ)."""
    if count < 2:
        raise FIDError(f"need at least 2 images for FID statistics, got {count}")
    mu = total / count
    return mu, (outer - count * np.outer(mu, mu)) / (count - 1)
