"""EDM's DDPM++ U-Net (SongUNet) and the two preconditionings ECT uses.

Parameter and buffer names follow EDM exactly (``model.enc.16x16_block0.qkv.weight`` ...), so the
``ema`` state dict of an official EDM pickle loads by name. The forward pass reproduces EDM's
arithmetic (docs/method.md, "The network" and "Preconditioning"); the code is our own.
"""
from __future__ import annotations

import inspect
import math
import typing
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ect.errors import BadInput
from ect.typed import Bound, ConfigError, convert

SQRT_HALF = math.sqrt(0.5)

# The options of a network: the constructor parameters annotated with a type and a Bound, EDM's and
# EDM2's alike (``arch_options``). Bounds sit well above every EDM/ECT network (CIFAR-10: 128 channels,
# ImageNet: 192-384) and keep a hostile file from asking for terabytes before its weights are compared.
Resolution = Annotated[int, Bound(ge=4, le=1024)]
ImageChannels = Annotated[int, Bound(ge=1, le=4)]
LabelDim = Annotated[int, Bound(ge=0, le=100_000)]
SigmaData = Annotated[float, Bound(ge=1e-6, le=1e3)]
Width = Annotated[int, Bound(ge=1, le=1024)]
Multipliers = Annotated[tuple[int, ...], Bound(min_items=1, max_items=8, items=Bound(ge=1, le=16))]
Multiplier = Annotated[int, Bound(ge=1, le=16)]
Blocks = Annotated[int, Bound(ge=1, le=16)]
Resolutions = Annotated[tuple[int, ...], Bound(max_items=16, items=Bound(ge=1, le=1024))]
Probability = Annotated[float, Bound(ge=0, le=1)]
Filter = Annotated[tuple[float, ...], Bound(min_items=1, max_items=8, items=Bound(ge=-1e3, le=1e3))]


def _init_weight(shape: list[int], fan_in: int, fan_out: int, mode: str) -> torch.Tensor:
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(_init_weight([out_features, in_features], in_features, out_features, init_mode) * init_weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        return x.add_(self.bias.to(x.dtype)) if self.bias is not None else x  # in place: x is fresh


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down-sampling by a fixed FIR filter applied first.

    ``kernel=0`` gives a pure resampler (no weight). The filter is a persistent buffer
    ``resample_filter`` only when resampling, as in EDM.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), init_mode="kaiming_normal", init_weight=1.0):
        super().__init__()
        assert not (up and down)
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = (nn.Parameter(_init_weight([out_channels, in_channels, kernel, kernel], fan_in, fan_out, init_mode) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if (up or down) else None)

    def forward(self, x):
        f = self.resample_filter
        if f is not None:
            f = f.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=pad)
            else:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=pad)
        if self.weight is not None:
            w = self.weight.to(x.dtype)
            x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        if self.bias is not None:  # in place: x is the convolution's fresh output, which its backward never reads
            x = x.add_(self.bias.to(x.dtype).reshape(1, -1, 1, 1))
        return x


class GroupNorm(nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoids of the noise level; no weights."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(nn.Module):
    """DDPM++ residual block (EDM's UNetBlock with adaptive_scale=False), optional self-attention."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 dropout=0.0, resample_filter=(1, 1), init=None, init_zero=None, init_attn=None):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout = in_channels, out_channels, dropout
        self.num_heads = 1 if attention else 0
        self.norm0 = GroupNorm(in_channels, eps=1e-6)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels, **init)
        self.norm1 = GroupNorm(out_channels, eps=1e-6)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, kernel=1, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=1e-6)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        # In-place adds on fresh convolution outputs (no backward reads them): fewer allocations, same numbers.
        x = F.silu(self.norm1(x.add_(self.affine(emb).to(x.dtype)[:, :, None, None])))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig) * SQRT_HALF
        if self.num_heads:
            n, c, h, w = x.shape
            # q, k, v interleaved per channel (output channel 3c+j), as EDM lays out the qkv conv.
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, h * w).unbind(2)
            weights = torch.einsum("ncq,nck->nqk", q.float(), (k / math.sqrt(c)).float()).softmax(dim=2)
            a = torch.einsum("nqk,nck->ncq", weights.to(v.dtype), v)
            x = self.proj(a.reshape(n, c, h, w)).add_(x) * SQRT_HALF
        return x


class SongUNet(nn.Module):
    """EDM's DDPM++ U-Net with the standard encoder/decoder and positional noise embedding."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0,
                 augment_dim: Annotated[int, Bound(ge=0, le=64)] = 0, model_channels: Width = 128,
                 channel_mult: Multipliers = (1, 2, 2, 2), channel_mult_emb: Multiplier = 4, num_blocks: Blocks = 4,
                 attn_resolutions: Resolutions = (16,), dropout: Probability = 0.10, label_dropout: Probability = 0.0,
                 channel_mult_noise: Multiplier = 1, resample_filter: Filter = (1, 1)):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        out = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(F.silu(out))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


class Precond(nn.Module):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, ln(σ)/4) around a SongUNet held as ``model``.

    ``kind="edm"``: EDM's EDMPrecond scalings, always.
    ``kind="ect"``: ECT's ECMPrecond: EDM scalings in train mode; in eval mode the boundary form
    c_skip = σ_d²/((σ−σ_min)²+σ_d²), c_out = (σ−σ_min)·σ_d/sqrt(σ²+σ_d²), so D(x, σ_min) = x.
    """

    def __init__(self, kind: Literal["edm", "ect"] = "edm", img_resolution: Resolution = 32,
                 img_channels: ImageChannels = 3, label_dim: LabelDim = 0, sigma_data: SigmaData = 0.5,
                 sigma_min: Annotated[float | None, Bound(ge=0, le=1e3)] = None, **unet_kwargs):
        super().__init__()
        if kind not in ("edm", "ect"):
            raise ValueError(f"precond kind must be 'edm' or 'ect', not {kind!r}")
        self.kind, self.img_resolution, self.img_channels, self.label_dim = kind, img_resolution, img_channels, label_dim
        self.sigma_data = sigma_data
        self.sigma_min = (0.003 if kind == "ect" else 0.0) if sigma_min is None else sigma_min
        self.model = SongUNet(img_resolution, img_channels, img_channels, label_dim=label_dim, **unet_kwargs)

    def scalings(self, sigma: torch.Tensor):
        sd = self.sigma_data
        shift = self.sigma_min if (self.kind == "ect" and not self.training) else 0.0
        c_skip = sd**2 / ((sigma - shift) ** 2 + sd**2)
        c_out = (sigma - shift) * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        if self.label_dim:
            class_labels = (torch.zeros([x.shape[0], self.label_dim], device=x.device) if class_labels is None
                            else class_labels.to(torch.float32).reshape(-1, self.label_dim))
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        f = self.model(c_in * x, c_noise.flatten(), class_labels=class_labels, augment_labels=augment_labels)
        return c_skip * x + c_out * f.to(torch.float32)


class ArchError(BadInput):
    """Network kwargs (from a checkpoint or a config) that no EDM network has."""


NETWORK_KINDS = ("edm", "ect", "edm2")  # EDM's SongUNet behind EDM's or ECT's preconditioning; EDM2's U-Net


def _constructors(kind: str) -> list:
    """The constructors a network's kwargs reach: the preconditioning, the U-Net, (EDM2) its blocks."""
    if kind == "edm2":
        from ect.networks_edm2 import Block, EDM2Precond, UNet

        return [EDM2Precond, UNet, Block]
    return [Precond, SongUNet]


def constructor_options(cls) -> dict[str, tuple]:
    """name -> (type, default) of one constructor's options: its annotated parameters."""
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    return {name: (hints[name], param.default) for name, param in inspect.signature(cls.__init__).parameters.items()
            if name in hints and name != "return"}


def arch_options(kind: str) -> dict[str, tuple]:
    """name -> (type, default) of every option of a network kind: the annotated parameters of its
    constructors (their Bound is part of the type). Written once, in the constructors' signatures."""
    options = {"kind": (Literal["edm2"], "edm2")} if kind == "edm2" else {}
    for cls in _constructors(kind):
        for name, option in constructor_options(cls).items():
            options.setdefault(name, option)
    return options


def check_arch(arch: dict) -> dict:
    """Raise :class:`ArchError` naming the first key whose value no EDM/EDM2 network has; return ``arch``."""
    if not isinstance(arch, dict):
        raise ArchError(f"network kwargs must be a mapping, not a {type(arch).__name__}")
    kind = arch.get("kind", "edm")
    if kind not in NETWORK_KINDS:
        raise ArchError(f"network option kind must be one of {list(NETWORK_KINDS)}, not {str(kind)[:40]!r}")
    options = arch_options(kind)
    for key, value in arch.items():
        if key not in options:
            raise ArchError(f"unknown network option {str(key)[:80]!r}; known: {', '.join(options)}")
        if key != "kind":
            try:
                convert(options[key][0], value, key)
            except ConfigError as exc:
                raise ArchError(f"network option {exc}") from None
    full = {name: default for name, (_, default) in options.items()} | arch
    levels = len(full["channel_mult"])
    if full["img_resolution"] % (2 ** (levels - 1)):
        raise ArchError(f"img_resolution {full['img_resolution']} cannot be halved {levels - 1} times")
    if kind == "edm2":  # attention splits a level's channels into heads of channels_per_head
        per_head, res = full["channels_per_head"], full["img_resolution"]
        for level, m in enumerate(full["channel_mult"]):
            channels = full["model_channels"] * m
            attention = level == levels - 1 or (res >> level) in full["attn_resolutions"]
            if attention and (channels < per_head or channels % per_head):
                raise ArchError(f"channels_per_head {per_head} must divide the {channels} channels of the "
                                f"{res >> level}x{res >> level} attention blocks")
    return arch


def check_arch_options(overrides: dict) -> dict:
    """Network kwargs whose network is not known yet (overrides of a downloaded teacher's): each key must be
    an option of some network kind, with a value that kind accepts. Return ``overrides``."""
    kinds = {kind: arch_options(kind) for kind in ("edm", "edm2")}
    for key, value in overrides.items():
        types = [options[key][0] for options in kinds.values() if key in options]
        if not types:
            known = sorted(set().union(*kinds.values()))
            raise ArchError(f"unknown network option {str(key)[:80]!r}; known: {', '.join(known)}")
        problems = []
        for tp in types:
            try:
                convert(Literal[NETWORK_KINDS] if key == "kind" else tp, value, key)
                break
            except ConfigError as exc:
                problems.append(str(exc))
        else:
            raise ArchError(f"network option {problems[0]}")
    return overrides


def arch_option_schema(defs: dict) -> dict:
    """The JSON schema of network kwargs: every option of EDM's and EDM2's networks."""
    from ect.typed import type_schema

    properties = {"kind": {"enum": list(NETWORK_KINDS)}}
    for kind in ("edm", "edm2"):
        for name, (tp, _) in arch_options(kind).items():
            properties.setdefault(name, type_schema(tp, defs))
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "description": "network kwargs: options of EDM's SongUNet (kind edm/ect) or EDM2's U-Net (kind edm2)"}


def build_network(arch: dict) -> nn.Module:
    """Build a preconditioned network from the plain ``arch`` kwargs stored in our checkpoints: EDM's
    SongUNet (kind 'edm' or 'ect') or EDM2's U-Net (kind 'edm2')."""
    arch = dict(check_arch(arch))
    for key in ("channel_mult", "attn_resolutions", "resample_filter"):
        if key in arch:
            arch[key] = tuple(arch[key])
    if arch.get("kind") == "edm2":
        from ect.networks_edm2 import EDM2Precond

        del arch["kind"]
        return EDM2Precond(**arch)
    return Precond(**arch)


def student_arch(teacher_arch: dict, overrides: dict) -> dict:
    """The ECT student's kwargs: the teacher's with ECT's preconditioning, then the config's overrides.
    EDM teachers: ECT's boundary-condition preconditioning, no augmentation input. EDM2 teachers: the same
    network without the log-variance head (ECT's ImageNet student has none); its scalings stay EDM2's."""
    if teacher_arch.get("kind") == "edm2":
        return {**teacher_arch, "logvar_channels": 0, "use_fp16": False, **overrides}  # ECT trains in float32
    return {**teacher_arch, "kind": "ect", "sigma_min": None, "augment_dim": 0, **overrides}


def parameter_shapes(arch: dict) -> dict[str, tuple[int, ...]]:
    """The shape of every state-dict entry of the network ``arch`` describes, without allocating it."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in build_network(arch).state_dict().items()}


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
