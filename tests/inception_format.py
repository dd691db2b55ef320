"""A small TorchScript module with the interface of clean-fid's ``inception-2015-12-05.pt``.

``forward(x, return_features=True)`` takes float images in [0, 255] at any size and resizes them to
299×299 inside (as the real file does for ``legacy_tensorflow``); ``layers`` takes 299×299 images
already normalised to [-1, 1] (``clean`` mode). Both return 2048-d features. Not Inception:
a random projection, enough to exercise every code path of the real file.
"""
from __future__ import annotations

import io
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.proj = nn.Linear(3 * 8 * 8, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.pool(x).flatten(1)))


class _InceptionLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


def inception_like_bytes(seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the real file's format
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(_InceptionLike().eval()), buf)
    return buf.getvalue()
