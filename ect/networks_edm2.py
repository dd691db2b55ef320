"""EDM2's magnitude-preserving U-Net and its preconditioning, with ECT's ImageNet changes.

Parameter and buffer names and shapes follow EDM2 exactly (``unet.enc.16x16_block0.attn_qkv.weight``,
``unet.emb_fourier.freqs`` ...), so the ``ema`` state dict of an EDM2 snapshot loads by name. The
arithmetic is EDM2's (docs/imagenet.md, "The network"); the code is our own.

ECT's ImageNet branch changes three things, all here: ``dropout_res`` (dropout only in blocks at
resolutions <= it), a switch to turn forced weight normalisation off (the loss's target pass must
neither rewrite the live weights nor normalise them twice), and no log-variance head on the student
(``logvar_channels: 0``). Its preconditioning is EDM2's in train and eval mode alike (no σ_min shift).
"""
from __future__ import annotations

import contextlib
import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from ect.networks import (
    Blocks,
    Filter,
    ImageChannels,
    LabelDim,
    Multiplier,
    Multipliers,
    Probability,
    Resolution,
    Resolutions,
    SigmaData,
    Width,
)
from ect.typed import Bound

Balance = Annotated[float, Bound(ge=0, le=1)]

MP_SILU_GAIN = 0.596  # E[silu(x)^2]^0.5 for x ~ N(0, 1): keeps unit magnitude through the nonlinearity


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x divided by eps + its RMS over ``dim`` (default: all but the first); the norm in float32 (float64
    for float64 input: the formula checks). eps is added after scaling the L2 norm to an RMS, as EDM2 does
    (it shifts D by ~5e-4 otherwise)."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, f=(1, 1), mode: str = "keep") -> torch.Tensor:
    """2x down (box filter = average pool) or up (nearest neighbour), depthwise, by the filter ``f``."""
    if mode == "keep":
        return x
    if mode not in ("down", "up") or len(f) % 2:
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up' with an even filter, not {mode!r} {list(f)}")
    f = torch.as_tensor(f, dtype=torch.float32, device=x.device)  # on the input's device: a GPU run needs it there
    f = (f.ger(f) / f.sum().square()).to(x.dtype)[None, None]
    pad = (f.shape[-1] - 1) // 2
    channels = x.shape[1]
    if mode == "down":
        return F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=pad)
    return F.conv_transpose2d(x, (f * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=pad)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / MP_SILU_GAIN


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1-t)·a + t·b, rescaled so that two unit-variance inputs give a unit-variance output."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate along ``dim``, weighting a by (1-t) and b by t per channel, magnitude-preserving."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """√2·cos(2π(f·c + φ)) features of a scalar; f and φ are random at construction, so they are
    persistent buffers that must come from the checkpoint."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Convolution (kernel [k, k]) or fully connected layer (kernel []) whose weight is used normalised
    per output row, times gain/√fan_in. In training, with ``force_wn``, the stored weight is itself
    rewritten normalised first (EDM2's forced weight normalisation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.force_wn = True
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        # float32 at least (float16 checkpoints); aliases a float32 weight: the rewrite below is what w then holds
        w = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if self.training and self.force_wn:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


@contextlib.contextmanager
def forced_weight_norm(net: nn.Module, enabled: bool):
    """Turn forced weight normalisation of every MPConv in ``net`` on or off for a block (a no-op for
    networks without MPConvs)."""
    convs = [m for m in net.modules() if isinstance(m, MPConv)]
    before = [m.force_wn for m in convs]
    for m in convs:
        m.force_wn = enabled
    try:
        yield
    finally:
        for m, flag in zip(convs, before, strict=True):
            m.force_wn = flag


class Block(nn.Module):
    """Residual block of the encoder (``enc``: skip projection and pixel norm before the branch) or the
    decoder (``dec``: projection after), with optional cosine self-attention."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor="enc", resample_mode="keep",
                 resample_filter: Filter = (1, 1), attention=False,
                 channels_per_head: Annotated[int, Bound(ge=1, le=4096)] = 64, dropout=0.0,
                 res_balance: Balance = 0.3, attn_balance: Balance = 0.3,
                 clip_act: Annotated[float | None, Bound(ge=1e-3, le=1e6)] = 256):
        super().__init__()
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_filter, self.resample_mode = resample_filter, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch, modulated per channel by the embedding (c = 1 + gain·linear(emb)).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention with q, k, v normalised per head ("cosine attention"); qkv interleaved per channel.
        if self.num_heads:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """EDM2's U-Net. Blocks are named by resolution (``64x64_block0``); every encoder output is a skip
    that a decoder block concatenates (magnitude-preserving) with its input."""

    def __init__(self, img_resolution, img_channels, label_dim, model_channels: Width = 192,
                 channel_mult: Multipliers = (1, 2, 3, 4), channel_mult_noise: Multiplier | None = None,
                 channel_mult_emb: Multiplier | None = None, num_blocks: Blocks = 3,
                 attn_resolutions: Resolutions = (16, 8), label_balance: Balance = 0.5, concat_balance: Balance = 0.5,
                 dropout: Probability = 0.0, dropout_res: Annotated[int | None, Bound(ge=1, le=1024)] = None,
                 **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        def block(res, cin, cout, **kwargs):  # ECT: dropout only at resolutions <= dropout_res
            p = dropout if dropout_res is None or res <= dropout_res else 0.0
            return Block(cin, cout, cemb, dropout=p, **block_kwargs, **kwargs)

        # Embedding: noise level (Fourier features) and, class-conditional, the one-hot label.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        # Encoder: the image plus a constant-ones channel; a down block opens every level but the first.
        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = block(res, cout, cout, flavor="enc", resample_mode="down")
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = block(res, cin, cout, flavor="enc",
                                                            attention=res in attn_resolutions)

        # Decoder: two blocks at the lowest resolution, then an up block per level; each block takes a skip.
        self.dec = nn.ModuleDict()
        skips = [b.out_channels for b in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = block(res, cout, cout, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(res, cout, cout, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(res, cout, cout, flavor="dec", resample_mode="up")
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = block(res, cin, cout, flavor="dec",
                                                            attention=res in attn_resolutions)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, blk in self.enc.items():
            x = blk(x) if "conv" in name else blk(x, emb)
            skips.append(x)
        for name, blk in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = blk(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class EDM2Precond(nn.Module):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, ln(σ)/4, labels) around the U-Net held as ``unet``, with EDM2's
    scalings in train and eval mode. ``logvar_channels > 0`` adds EDM2's log-variance head (its
    uncertainty-weighted pretraining loss); ECT's student has none."""

    def __init__(self, img_resolution: Resolution = 64, img_channels: ImageChannels = 3, label_dim: LabelDim = 0,
                 use_fp16: bool = False, sigma_data: SigmaData = 0.5,
                 logvar_channels: Annotated[int, Bound(ge=0, le=1024)] = 128, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data, self.logvar_channels = use_fp16, sigma_data, logvar_channels
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        if logvar_channels:
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim:  # no labels: EDM2's single all-zero label row, broadcast over the batch
            class_labels = (torch.zeros([1, self.label_dim], device=x.device) if class_labels is None
                            else class_labels.to(torch.float32).reshape(-1, self.label_dim))
        else:
            class_labels = None
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4
        f = self.unet((c_in * x).to(dtype), c_noise, class_labels)
        d = c_skip * x + c_out * f.to(torch.float32)
        if not return_logvar:
            return d
        if not self.logvar_channels:
            raise ValueError("this network has no log-variance head (logvar_channels: 0)")
        return d, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
