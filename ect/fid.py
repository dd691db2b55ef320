"""FID: features from a TorchScript feature network on local disk, reference statistics, Fréchet distance.

The feature network is a file (Inception's ``inception-2015-12-05.pt`` for the paper presets, the
toy preset's digits classifier otherwise) verified by sha256 before it is loaded; nothing is
downloaded here. Images are resized as clean-fid's ``clean`` mode does (PIL bicubic on float
pixels) to the network's input size. Statistics follow clean-fid: mean and unbiased covariance
in float64. The Fréchet distance is computed here from symmetric eigendecompositions, because
clean-fid's uses ``scipy.linalg.sqrtm(disp=...)``, which SciPy 1.18 removes.
"""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import torch
from tqdm import tqdm

from ect.fileio import sha256_file, verify_sha256, write_bytes_atomic


class FIDError(ValueError):
    pass


def load_feature_net(path, sha256: str | None = None, device="cpu"):
    """Verify (when ``sha256`` is given), then load the TorchScript feature network. Returns (net, meta, sha256)."""
    digest = verify_sha256(path, sha256) if sha256 else sha256_file(path)
    extra = {"meta.json": ""}
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but Inception's feature file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except RuntimeError as exc:
        raise FIDError(f"cannot load feature network {path} (not TorchScript?): {exc}") from exc
    meta = json.loads(extra["meta.json"]) if extra["meta.json"] else {}
    return net.eval(), meta, digest


def resizer(size: int):
    """clean-fid's ``clean`` resizer (PIL bicubic, float32, no quantisation) to ``size``×``size``."""
    from cleanfid.resize import make_resizer
    return make_resizer("PIL", False, "bicubic", (size, size))


def compute_features(images: np.ndarray, net, input_size: int, batch: int = 256, device="cpu",
                     progress: bool = False) -> np.ndarray:
    """uint8 NHWC images -> (N, D) float64 features."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise FIDError(f"FID needs uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    resize = resizer(input_size) if images.shape[1:3] != (input_size, input_size) else None
    feats = []
    for i in tqdm(range(0, len(images), batch), desc="features", unit="batch", disable=not progress):
        chunk = images[i:i + batch]
        if resize is not None:
            chunk = np.stack([resize(img) for img in chunk])
        x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).permute(0, 3, 1, 2).to(device)
        with torch.no_grad():
            feats.append(net(x).double().cpu().numpy())
    return np.concatenate(feats)


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
    a = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(a @ s2 @ a)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean), 0.0)


def save_stats(path, mu, sigma, meta: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, sort_keys=True)))
    write_bytes_atomic(path, buf.getvalue())


def load_stats(path) -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["mu"], f["sigma"], json.loads(str(f["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise FIDError(f"cannot read FID statistics {path}: {exc}") from exc


def fid_of_sets(features: np.ndarray, mu_ref, sigma_ref, sets: int) -> list[float]:
    """Split the features (ordered by seed) into ``sets`` equal, consecutive sets; FID of each."""
    if sets < 1 or len(features) < 2 * sets:
        raise FIDError(f"cannot split {len(features)} samples into {sets} sets of at least 2")
    size = len(features) // sets
    return [frechet_distance(*statistics(features[i * size:(i + 1) * size]), mu_ref, sigma_ref) for i in range(sets)]
