"""The toy preset's FID feature network: a small digits classifier trained with a fixed seed.

Inception-v3 (the paper's feature network) is a download and needs 299×299 inputs, about 9 img/s
on a laptop CPU; the toy preset must run offline in minutes. So the toy FID uses the 64-d
penultimate features of a CNN trained here on the toy dataset itself. Like Inception for
ImageNet-like images, it is a network trained to tell the dataset's classes apart, so its
features respond to whether a sample looks like a real digit. The numbers are comparable only
between runs that use the same feature file (its sha256 is in the FID results and the report).

It is saved as TorchScript with the Inception interface clean-fid uses: float images (N, C, H, W)
in [0, 255] -> features (N, D), plus a ``meta.json`` extra file (input resolution and channels,
accuracy, seed). C is the dataset's: 1 for the grayscale digits.
"""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import torch
from torch import nn

from ect.errors import BadInput
from ect.fileio import write_bytes_atomic

META_FILE = "meta.json"


class DigitsFeatureNet(nn.Module):
    """conv 16×16 -> 8×8 -> 4×4, then a 64-d feature layer; ``head`` classifies (training only)."""

    def __init__(self, resolution: int, feature_dim: int = 64, num_classes: int = 10, channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * (resolution // 4) ** 2, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x / 127.5 - 1)  # features, from [0, 255] pixels as clean-fid passes them


def train_feature_net(images: np.ndarray, labels: np.ndarray, out_path, seed: int = 0, epochs: int = 30,
                      batch: int = 64, lr: float = 2e-3, holdout: float = 0.2) -> dict:
    """Train on (1 - holdout) of the images, measure accuracy on the rest, save TorchScript. Returns meta."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] % 4:
        raise BadInput(f"feature net needs 1- or 3-channel images with a resolution divisible by 4, got "
                         f"{images.shape}")
    num_classes = int(labels.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    y = torch.from_numpy(labels).long()
    order = torch.randperm(len(x), generator=gen)
    n_test = int(len(x) * holdout)
    test, train = order[:n_test], order[n_test:]
    net = DigitsFeatureNet(images.shape[1], num_classes=num_classes, channels=images.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        perm = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(net.head(net(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net.head(net(x[test])).argmax(1) == y[test]).float().mean().item() if n_test else float("nan")
    meta = {"kind": "digits-classifier", "resolution": images.shape[1], "channels": images.shape[-1],
            "feature_dim": 64, "seed": seed,
            "epochs": epochs, "train_images": len(train), "holdout_accuracy": accuracy}
    buf = io.BytesIO()
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format clean-fid's Inception uses
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(net), buf, _extra_files={META_FILE: json.dumps(meta)})
    write_bytes_atomic(out_path, buf.getvalue())
    return meta
