"""Feature extractors: uint8 images to features, one per metric, each from a verified file on local disk.

Nothing is downloaded here. Inception is clean-fid's wrapper on our checked copy of the TorchScript
file; the toy's digits classifier is TorchScript we trained; DINOv2 is our own ViT on the official
weights (``ect/metrics/dinov2.py``). Images are resized as clean-fid's ``clean`` mode does (PIL bicubic on
float pixels) to an Inception-style network's input size, or as EDM2 does for DINOv2.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ect.fileio import sha256_file, verify_sha256, verify_zip
from ect.metrics import FD_DINOV2, INCEPTION_FILE, METRICS, FIDError


def load_feature_net(path, sha256: str | None = None, device="cpu"):
    """Verify (when ``sha256`` is given), then load a TorchScript feature network. Returns (net, meta, sha256)."""
    digest = verify_sha256(path, sha256) if sha256 else sha256_file(path)
    verify_zip(path)
    extra = {"meta.json": ""}
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but Inception's feature file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except RuntimeError as exc:
        raise FIDError(f"cannot load feature network {path} (not TorchScript?): {exc}") from exc
    try:
        meta = json.loads(extra["meta.json"]) if extra["meta.json"] else {}
    except ValueError:
        meta = None
    if type(meta) is not dict or type(meta.get("resolution", 16)) is not int or not 4 <= meta.get("resolution", 16) \
            <= 1024 or meta.get("channels", 3) not in (1, 3) or type(meta.get("channels", 3)) is not int:
        raise FIDError(f"feature network {path}: its meta.json must give an integer resolution (4-1024) and 1 or 3 "
                       "channels")
    return net.eval(), meta, digest


class FeatureExtractor:
    """uint8 NHWC images -> features, the way clean-fid computes them in one ``mode``.

    ``inception``: clean-fid's ``InceptionV3W`` on our verified file; ``legacy_tensorflow`` feeds
    native-size images and lets the TorchScript resize them (the StyleGAN2-ADA/EDM/ECT protocol),
    ``clean`` resizes to 299 with PIL bicubic first. ``digits-classifier`` (toy): ``clean``
    resizing to the network's own input size. ``dinov2`` (mode ``fd_dinov2``): DINOv2's class token,
    EDM2's preprocessing (``ect/metrics/dinov2.py``). Grayscale images go to an RGB network as three
    equal channels.
    """

    def __init__(self, path, kind: str, mode: str, sha256: str | None = None, device="cpu"):
        if mode not in METRICS:
            raise FIDError(f"FID mode must be one of {METRICS}, not {mode!r}")
        if (kind == "dinov2") != (mode == FD_DINOV2):
            raise FIDError(f"FD_DINOv2 and only it takes the dinov2 network, not mode {mode!r} with {kind!r}")
        self.kind, self.mode, self.device = kind, mode, torch.device(device)
        self.resize = None
        if kind == "dinov2":
            from ect.metrics.dinov2 import load_dinov2

            self.sha256 = verify_sha256(path, sha256) if sha256 else sha256_file(path)
            verify_zip(path, FIDError)
            self.net = load_dinov2(path).to(self.device)
            return
        if kind == "inception":
            from cleanfid.inception_torchscript import InceptionV3W
            if Path(path).name != INCEPTION_FILE:
                raise FIDError(f"clean-fid loads Inception from a file named {INCEPTION_FILE}, not {Path(path).name}")
            self.sha256 = verify_sha256(path, sha256) if sha256 else sha256_file(path)
            try:
                with warnings.catch_warnings():  # clean-fid's wrapper loads the file just verified
                    warnings.simplefilter("ignore", FutureWarning)
                    self.net = InceptionV3W(str(Path(path).parent), download=False,
                                            resize_inside=mode == "legacy_tensorflow").to(self.device).eval()
            except RuntimeError as exc:
                raise FIDError(f"cannot load feature network {path} (not TorchScript?): {exc}") from exc
            self.input_size = None if mode == "legacy_tensorflow" else 299
            self.channels = 3
        elif kind == "digits-classifier":
            if mode != "clean":
                raise FIDError("the digits-classifier feature network supports only the 'clean' mode")
            self.net, meta, self.sha256 = load_feature_net(path, sha256, self.device)
            self.input_size, self.channels = meta["resolution"], meta.get("channels", 3)
        else:
            raise FIDError(f"unknown feature network kind {kind!r}")
        self.resize = resizer(self.input_size) if self.input_size else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.kind == "dinov2":  # its own preprocessing: EDM2's resize to 224 and ImageNet normalisation
            from ect.metrics.dinov2 import extract_features

            return extract_features(self.net, images, self.device, batch_size=len(images) or 1)
        if images.shape[-1] != self.channels:
            if images.shape[-1] != 1:
                raise FIDError(f"the feature network takes {self.channels}-channel images, not {images.shape[-1]}")
            images = np.repeat(images, self.channels, axis=-1)  # grayscale as RGB (Inception)
        if self.resize is not None and images.shape[1:3] != (self.input_size, self.input_size):
            images = np.stack([self.resize(img) for img in images])
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2).to(self.device)
        with torch.no_grad():
            return self.net(x).double().cpu().numpy()


def resizer(size: int):
    """clean-fid's ``clean`` resizer (PIL bicubic, float32, no quantisation) to ``size``×``size``."""
    from cleanfid.resize import make_resizer
    return make_resizer("PIL", False, "bicubic", (size, size))


def compute_features(images: np.ndarray, extractor: FeatureExtractor, batch: int = 256,
                     progress: bool = False) -> np.ndarray:
    """uint8 NHWC images -> (N, D) float64 features."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise FIDError(f"FID needs uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    if batch < 1:
        raise FIDError(f"batch must be at least 1, not {batch}")
    chunks = range(0, len(images), batch)
    return np.concatenate([extractor(images[i:i + batch]) for i in tqdm(
        chunks, desc=f"features ({extractor.mode})", unit="batch", disable=not progress)])


def extractors(kind: str, sha256: str | None, modes, path, device, dinov2=None,
               dinov2_sha256: str | None = None) -> dict[str, FeatureExtractor]:
    """One feature extractor per FID mode (the first mode is the headline number), and one for FD_DINOv2 when
    ``dinov2`` (its weights file) is given."""
    out = {mode: FeatureExtractor(path, kind, mode, sha256, device) for mode in modes if mode != FD_DINOV2}
    if dinov2 is not None:
        out[FD_DINOV2] = FeatureExtractor(dinov2, "dinov2", FD_DINOV2, dinov2_sha256, device)
    return out


def feature_moments(images: np.ndarray, extractor: FeatureExtractor, batch: int = 256,
                    progress: bool = False) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, Σ f, Σ f fᵀ) of the images' features in float64, a batch at a time: ImageNet's 1.28M
    features would take 21 GB at once, and moments of shards add up."""
    total, outer = None, None
    for i in tqdm(range(0, len(images), batch), desc=f"features ({extractor.mode})", unit="batch", disable=not progress):
        f = compute_features(images[i:i + batch], extractor, batch)
        total = f.sum(axis=0) if total is None else total + f.sum(axis=0)
        outer = f.T @ f if outer is None else outer + f.T @ f
    if total is None:
        raise FIDError("no images to compute statistics of")
    return len(images), total, outer
