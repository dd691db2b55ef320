"""FD_DINOv2's feature network: DINOv2's Vision Transformer, loaded from the official weights file.

EDM2 (NVlabs/edm2, ``calculate_metrics.py``, ``DINOv2Detector``) scores images with the class token
of ``dinov2_vitl14`` after the final LayerNorm. This module is our own ``torch.nn`` ViT whose
parameter names are the official state-dict keys, so ``dinov2_vitl14_pretrain.pth`` (and the
ViT-S/14 and ViT-B/14 files) load by name. Every size is read from the file's tensor shapes and
checked before anything is built. Only the plain-MLP models without register tokens are
supported: ViT-g/14 (SwiGLU) and the ``*_reg`` models are refused with a clear message.

What is matched to facebookresearch/dinov2 (main branch, ``dinov2/models/vision_transformer.py``
and ``dinov2/layers``), the settings of the hub's ``dinov2_vit*14`` (``hub/backbones.py``):

* LayerNorm eps 1e-6; exact (erf) GELU; attention softmax(q kᵀ / √64) v with heads of 64;
  LayerScale on both residual branches; patch tokens in row-major order after the class token.
* Position embeddings: the pretraining grid (37×37 at 518 px) is resized bicubically, without
  antialiasing, in float32, with ``scale_factor = (rows + 0.1) / M`` rather than an output size.
  The 0.1 is the hub models' ``interpolate_offset``; torch then samples at ``(i + 0.5) / s - 0.5``
  with that ``s``, so the result differs from a plain resize to ``rows``. The grid is used as is
  when it already matches.

Preprocessing follows EDM2's default ``resize_mode='torch'``: uint8 pixels as float32 in
[0, 255], bicubic antialiased resize to 224×224 (no clamping), ``/ 255``, ImageNet mean and std.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ect.errors import BadInput
from ect.weights import bytes_beyond_held, layout_mismatch, nonfinite_weight

HEAD_DIM = 64  # every DINOv2 ViT (S, B, L, g) uses 64-wide heads; the file does not store the head count
LAYER_NORM_EPS = 1e-6
POS_INTERPOLATE_OFFSET = 0.1  # the hub's non-register models (interpolate_offset=0.1, antialias off)
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Far above ViT-g/14 (1536 wide, 40 deep, 37×37 grid), far below what would exhaust memory.
MAX_EMBED_DIM = 4096
MAX_DEPTH = 64
MAX_GRID = 128
MAX_PATCH = 64
MAX_MLP_RATIO = 8

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


class DINOv2Error(BadInput):
    pass


@dataclass(frozen=True)
class DINOv2Shape:
    """A DINOv2 ViT's sizes, as read from its weights."""

    embed_dim: int
    patch_size: int
    depth: int
    mlp_hidden: int
    pos_grid: int  # side of the square position-embedding grid (pretraining image size / patch size)

    @property
    def num_heads(self) -> int:
        return self.embed_dim // HEAD_DIM


# ---------------------------------------------------------------------------------------------
# The network. Attribute names are the official state-dict keys.

class _PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, rows·cols, D), row-major


class _Attention(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.num_heads = embed_dim // HEAD_DIM
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, width = tokens.shape
        # qkv's output is [q | k | v], each split into heads of HEAD_DIM consecutive channels
        q, k, v = self.qkv(tokens).reshape(batch, count, 3, self.num_heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v)  # default scale 1/√HEAD_DIM, as DINOv2
        return self.proj(mixed.transpose(1, 2).reshape(batch, count, width))


class _LayerScale(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.act = nn.GELU()  # exact erf form, DINOv2's default act_layer
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.attn = _Attention(embed_dim)
        self.ls1 = _LayerScale(embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.mlp = _Mlp(embed_dim, hidden)
        self.ls2 = _LayerScale(embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.ls1(self.attn(self.norm1(tokens)))
        return tokens + self.ls2(self.mlp(self.norm2(tokens)))


def interpolate_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(1, 1 + M², D) position embeddings -> (1, 1 + rows·cols, D), as DINOv2's ``interpolate_pos_encoding``."""
    grid = math.isqrt(pos_embed.shape[1] - 1)
    if (rows, cols) == (grid, grid):
        return pos_embed
    width = pos_embed.shape[-1]
    patch_grid = pos_embed[:, 1:].float().reshape(1, grid, grid, width).permute(0, 3, 1, 2)
    # A scale factor, not a size: torch maps output pixels back with this exact factor, so the
    # offset shifts the samples; matching DINOv2's numbers needs the same call.
    scale = ((rows + POS_INTERPOLATE_OFFSET) / grid, (cols + POS_INTERPOLATE_OFFSET) / grid)
    resized = F.interpolate(patch_grid, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(resized.shape[-2:]) != (rows, cols):
        raise DINOv2Error(f"position grid {grid}x{grid} resized to {tuple(resized.shape[-2:])}, not {(rows, cols)}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, rows * cols, width)
    return torch.cat([pos_embed[:, :1].float(), resized], dim=1).to(pos_embed.dtype)


class DINOv2ViT(nn.Module):
    """DINOv2's ``DinoVisionTransformer`` (no registers, MLP FFN): normalised images -> normed class token."""

    def __init__(self, shape: DINOv2Shape):
        super().__init__()
        self.shape = shape
        width = shape.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + shape.pos_grid**2, width))
        self.mask_token = nn.Parameter(torch.zeros(1, width))  # training-time masking; unused here, but in the file
        self.patch_embed = _PatchEmbed(width, shape.patch_size)
        self.blocks = nn.ModuleList(_Block(width, shape.mlp_hidden) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        patch = self.shape.patch_size
        if height % patch or width % patch:
            raise DINOv2Error(f"image size {height}x{width} is not a multiple of the patch size {patch}")
        tokens = self.patch_embed(images)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        tokens = tokens + interpolate_pos_embed(self.pos_embed, height // patch, width // patch).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])  # LayerNorm is per token: norming the class token alone is the same


# ---------------------------------------------------------------------------------------------
# Loading: the file's structure is checked on shapes alone, before any module exists.

def expected_shapes(shape: DINOv2Shape) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the official ViT with ``shape``, and its tensor shape."""
    width, hidden = shape.embed_dim, shape.mlp_hidden
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + shape.pos_grid**2, width), "mask_token": (1, width),
              "patch_embed.proj.weight": (width, 3, shape.patch_size, shape.patch_size),
              "patch_embed.proj.bias": (width,), "norm.weight": (width,), "norm.bias": (width,)}
    per_block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
                 "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
                 "ls1.gamma": (width,), "norm2.weight": (width,), "norm2.bias": (width,),
                 "mlp.fc1.weight": (hidden, width), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (width, hidden),
                 "mlp.fc2.bias": (width,), "ls2.gamma": (width,)}
    for i in range(shape.depth):
        shapes.update({f"blocks.{i}.{name}": size for name, size in per_block.items()})
    return shapes


def _unsupported_variant(state: dict) -> str | None:
    if "register_tokens" in state:
        return "a DINOv2 model with register tokens (dinov2_*_reg), which FD_DINOv2 does not use"
    if any(".mlp.w12." in key for key in state):
        return "a SwiGLU-FFN model (ViT-g/14), which is not supported: use dinov2_vitl14 (or vits14/vitb14)"
    if any(re.match(r"blocks\.\d+\.\d+\.", key) for key in state):
        return "a block-chunked (FSDP) state dict; the released weights are not chunked"
    return None


def _names(keys: list[str]) -> str:
    return ", ".join(repr(key[:80]) for key in keys[:3])  # repr: a hostile key cannot break the one-line message


def _dim(state: dict, key: str, axis: int) -> int:
    tensor = state[key]
    return int(tensor.shape[axis]) if -tensor.dim() <= axis < tensor.dim() else -1


def read_shape(state: dict, where: str) -> DINOv2Shape:
    """The ViT's sizes from its tensors, within sane bounds; the full layout is checked afterwards."""
    anchors = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [key for key in anchors if key not in state]
    if missing:
        raise DINOv2Error(f"{where} is not a DINOv2 ViT state dict (no {', '.join(missing)})")
    width, patch = _dim(state, "cls_token", -1), _dim(state, "patch_embed.proj.weight", -1)
    tokens, hidden = _dim(state, "pos_embed", 1), _dim(state, "blocks.0.mlp.fc1.weight", 0)
    grid = math.isqrt(max(tokens - 1, 0))
    depth = len({int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key))})
    if not 0 < width <= MAX_EMBED_DIM:
        raise DINOv2Error(f"{where}: embed dim {width} (from cls_token) is outside 1..{MAX_EMBED_DIM}")
    if width % HEAD_DIM:
        raise DINOv2Error(f"{where}: embed dim {width} does not split into DINOv2's heads of {HEAD_DIM} channels")
    if not 0 < patch <= MAX_PATCH:
        raise DINOv2Error(f"{where}: patch size {patch} (from patch_embed.proj.weight) is outside 1..{MAX_PATCH}")
    if not (0 < grid <= MAX_GRID and tokens == 1 + grid * grid):
        raise DINOv2Error(f"{where}: pos_embed holds {tokens} tokens, not 1 + a square grid of side 1..{MAX_GRID}")
    if not 0 < depth <= MAX_DEPTH:
        raise DINOv2Error(f"{where}: {depth} blocks, outside 1..{MAX_DEPTH}")
    if not 0 < hidden <= MAX_MLP_RATIO * width:
        raise DINOv2Error(f"{where}: MLP width {hidden} is outside 1..{MAX_MLP_RATIO}x the embed dim {width}")
    return DINOv2Shape(embed_dim=width, patch_size=patch, depth=depth, mlp_hidden=hidden, pos_grid=grid)


def check_state_dict(state, where: str) -> DINOv2Shape:
    """Refuse (``DINOv2Error``) anything but finite floating-point tensors in the official ViT layout."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise DINOv2Error(f"{where} is not a DINOv2 state dict (expected a mapping of names to tensors)")
    variant = _unsupported_variant(state)
    if variant:
        raise DINOv2Error(f"{where} is {variant}")
    shape = read_shape(state, where)
    shapes = expected_shapes(shape)
    mismatch = layout_mismatch(state, shapes)
    if mismatch and mismatch[0] == "keys":
        _, missing, extra = mismatch
        raise DINOv2Error(f"{where} is not in the DINOv2 ViT layout ({len(missing)} missing keys, e.g. "
                          f"{_names(missing)}; {len(extra)} unexpected, e.g. {_names(extra)})")
    if mismatch:
        _, key, got, size = mismatch
        raise DINOv2Error(f"{where}: {key} has shape {got}, the layout needs {size}")
    not_float = next((key for key in shapes if not state[key].is_floating_point()), None)
    if not_float:
        raise DINOv2Error(f"{where}: {not_float} holds {state[not_float].dtype}, not floating-point weights")
    beyond = bytes_beyond_held(state)
    if beyond:
        raise DINOv2Error(f"{where}: its tensors claim {beyond[0]} bytes but the file holds {beyond[1]}")
    bad = nonfinite_weight(state)
    if bad is not None:
        raise DINOv2Error(f"{where}: weight {bad} holds NaN or infinite values")
    return shape


def load_dinov2(path) -> DINOv2ViT:
    """The DINOv2 ViT in the weights file at ``path`` (e.g. ``dinov2_vitl14_pretrain.pth``), float32, eval mode."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for missing, truncated or hostile files
        raise DINOv2Error(f"cannot read DINOv2 weights {path}: {' '.join(str(exc).split())[:300]}") from exc
    shape = check_state_dict(state, str(path))
    weights = {key: state[key].to(torch.float32).contiguous() for key in expected_shapes(shape)}
    with torch.device("meta"):  # no throw-away random init: the file's tensors become the parameters
        net = DINOv2ViT(shape)
    net.load_state_dict(weights, strict=True, assign=True)
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Features, as EDM2's DINOv2Detector computes them.

def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 1 or 3) -> float32 (N, 3, 224, 224), EDM2's ``resize_mode='torch'`` path."""
    pixels = images.permute(0, 3, 1, 2)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)  # grayscale as three equal channels
    pixels = pixels.contiguous().to(torch.float32)  # NCHW float32 in [0, 255], as EDM2 feeds interpolate
    resized = F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=resized.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=resized.device).reshape(1, 3, 1, 1)
    return (resized / 255 - mean) / std  # no clamp: EDM2 keeps bicubic's overshoot


def _check_images(images) -> None:
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        raise DINOv2Error(f"DINOv2 features need uint8 images as a numpy array or torch tensor, not {type(images)}")
    is_uint8 = images.dtype == (np.uint8 if isinstance(images, np.ndarray) else torch.uint8)
    if not is_uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or min(images.shape[1:3]) < 1:
        raise DINOv2Error(f"DINOv2 features need uint8 images (N, H, W, 1 or 3), got {images.dtype} "
                          f"{tuple(images.shape)}")


def extract_features(net: DINOv2ViT, images, device="cpu", batch_size: int = 64) -> np.ndarray:
    """uint8 images (N, H, W, 1 or 3), numpy or torch -> (N, D) float64 class-token features."""
    _check_images(images)
    if batch_size < 1:
        raise DINOv2Error(f"batch_size must be at least 1, not {batch_size}")
    device = torch.device(device)
    net = net.to(device)
    features = [np.zeros((0, net.shape.embed_dim))]
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            # a copy per batch: the whole set may be a read-only memmap that torch would not wrap quietly
            batch = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.array(batch))
            features.append(net(preprocess(batch.to(device))).double().cpu().numpy())
    return np.concatenate(features)
