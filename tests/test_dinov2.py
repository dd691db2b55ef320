"""FD_DINOv2's feature network (ect.metrics.dinov2) against an independent float64 numpy ViT, and its loader's refusals.

The tiny ViT here has the official key layout (embed 128 = 2 heads of 64, depth 2, patch 14, MLP width
256, a 4x4 position grid so that a 224 px input interpolates it to 16x16). The image resize is torch's
in both computations (it is the operation EDM2 uses); everything after it is redone in numpy float64,
including DINOv2's position-embedding interpolation (bicubic, scale factor (n + 0.1) / M).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import erf

from ect.metrics.dinov2 import DINOv2Error, expected_shapes, extract_features, interpolate_pos_embed, load_dinov2
from tests.helpers import DINOV2_PATCH as PATCH
from tests.helpers import tiny_dinov2_state

WIDTH, DEPTH, HIDDEN, GRID = 128, 2, 256, 4
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
TOLERANCE = 1e-5  # float32 torch vs float64 numpy; measured differences are below 1e-6


def save(tmp_path, state, name="dinov2_tiny.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


# ---------------------------------------------------------------------------------------------
# The numpy float64 reference.

def cubic_weights(t: float) -> np.ndarray:
    """Keys' cubic convolution (a = -0.75, torch's bicubic) for the taps at -1, 0, 1, 2 around the sample."""
    a = -0.75

    def kernel(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.array([kernel(1 + t), kernel(t), kernel(1 - t), kernel(2 - t)])


def bicubic_matrix(out_size: int, in_size: int, scale_factor: float) -> np.ndarray:
    """(out, in) matrix of torch's bicubic upsampling along one axis with an explicit scale factor
    (align_corners=False: source = (i + 0.5) / scale_factor - 0.5, taps clamped to the border)."""
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        source = (i + 0.5) / scale_factor - 0.5
        base = int(np.floor(source))
        for tap, weight in zip(range(base - 1, base + 3), cubic_weights(source - base), strict=True):
            matrix[i, min(max(tap, 0), in_size - 1)] += weight
    return matrix


def np_pos_embed(pos_embed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    grid = int(round(np.sqrt(pos_embed.shape[0] - 1)))
    if (rows, cols) == (grid, grid):
        return pos_embed
    patch_grid = pos_embed[1:].reshape(grid, grid, -1)
    along_rows = bicubic_matrix(rows, grid, (rows + 0.1) / grid)
    along_cols = bicubic_matrix(cols, grid, (cols + 0.1) / grid)
    resized = np.einsum("ri,ijd,cj->rcd", along_rows, patch_grid, along_cols).reshape(rows * cols, -1)
    return np.concatenate([pos_embed[:1], resized])


def np_layer_norm(x, weight, bias):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6) * weight + bias


def np_block(tokens, w, prefix):
    batch, count, width = tokens.shape
    heads = width // 64
    qkv = np_layer_norm(tokens, w[prefix + "norm1.weight"], w[prefix + "norm1.bias"]) @ w[prefix + "attn.qkv.weight"].T
    q, k, v = (qkv + w[prefix + "attn.qkv.bias"]).reshape(batch, count, 3, heads, 64).transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) / 8.0
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    mixed = (attn / attn.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(batch, count, width)
    tokens = tokens + w[prefix + "ls1.gamma"] * (mixed @ w[prefix + "attn.proj.weight"].T + w[prefix + "attn.proj.bias"])
    hidden = np_layer_norm(tokens, w[prefix + "norm2.weight"], w[prefix + "norm2.bias"]) @ w[prefix + "mlp.fc1.weight"].T
    hidden = hidden + w[prefix + "mlp.fc1.bias"]
    hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
    return tokens + w[prefix + "ls2.gamma"] * (hidden @ w[prefix + "mlp.fc2.weight"].T + w[prefix + "mlp.fc2.bias"])


def np_features(state, pixels: np.ndarray) -> np.ndarray:
    """float64 [0, 255] pixels (N, 3, H, W), already resized -> normed class tokens (N, D)."""
    w = {key: value.double().numpy() for key, value in state.items()}
    x = (pixels / 255 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)
    batch, _, height, width = x.shape
    rows, cols = height // PATCH, width // PATCH
    patches = x.reshape(batch, 3, rows, PATCH, cols, PATCH).transpose(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
    tokens = patches @ w["patch_embed.proj.weight"].reshape(len(w["cls_token"][0, 0]), -1).T + w["patch_embed.proj.bias"]
    tokens = np.concatenate([np.broadcast_to(w["cls_token"], (batch, 1, tokens.shape[-1])), tokens], axis=1)
    tokens = tokens + np_pos_embed(w["pos_embed"][0], rows, cols)
    for i in range(len({key.split(".")[1] for key in w if key.startswith("blocks.")})):
        tokens = np_block(tokens, w, f"blocks.{i}.")
    return np_layer_norm(tokens[:, 0], w["norm.weight"], w["norm.bias"])


def torch_resize(images: np.ndarray) -> np.ndarray:
    """The one step both sides share: EDM2's torch resize of uint8 NHWC to float32 NCHW 224x224."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float()
    return F.interpolate(pixels, size=(224, 224), mode="bicubic", antialias=True).double().numpy()


# ---------------------------------------------------------------------------------------------
# Numbers.

def test_features_match_a_float64_numpy_vit(tmp_path):
    state = tiny_dinov2_state()
    net = load_dinov2(save(tmp_path, state))
    assert (net.shape.embed_dim, net.shape.depth, net.shape.mlp_hidden, net.shape.pos_grid) == (128, 2, 256, 4)
    images = np.random.default_rng(1).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    features = extract_features(net, images, batch_size=2)
    assert features.dtype == np.float64 and features.shape == (3, WIDTH)
    expected = np_features(state, torch_resize(images))
    np.testing.assert_allclose(features, expected, rtol=0, atol=TOLERANCE)
    assert np.abs(expected).max() > 0.5 and np.abs(expected[0] - expected[1]).max() > 0.1  # not a degenerate output


def test_the_native_grid_uses_the_position_embeddings_as_they_are(tmp_path):
    state = tiny_dinov2_state(seed=2)
    net = load_dinov2(save(tmp_path, state))
    pixels = np.random.default_rng(3).uniform(0, 255, (2, 3, GRID * PATCH, GRID * PATCH))
    normalised = (pixels / 255 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)
    with torch.no_grad():
        features = net(torch.tensor(normalised, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(features, np_features(state, pixels), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("rows, cols", [(16, 16), (16, 9), (3, 7)])
def test_position_embeddings_interpolate_with_dinov2s_scale_factor(rows, cols):
    pos_embed = torch.randn(1, 1 + 5 * 5, 64, generator=torch.Generator().manual_seed(4))
    ours = interpolate_pos_embed(pos_embed, rows, cols)[0].double().numpy()
    expected = np_pos_embed(pos_embed[0].double().numpy(), rows, cols)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    # the 0.1 offset is not cosmetic: a plain resize to (rows, cols) gives other numbers
    plain = F.interpolate(pos_embed[:, 1:].reshape(1, 5, 5, 64).permute(0, 3, 1, 2), size=(rows, cols), mode="bicubic")
    assert np.abs(plain.permute(0, 2, 3, 1).reshape(-1, 64).numpy() - expected[1:]).max() > 1e-3


def test_half_precision_weights_load_as_float32(tmp_path):
    state = {key: value.half() for key, value in tiny_dinov2_state(seed=7).items()}
    net = load_dinov2(save(tmp_path, state))
    assert all(p.dtype == torch.float32 for p in net.parameters())
    images = np.random.default_rng(8).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    expected = np_features({key: value.float() for key, value in state.items()}, torch_resize(images))
    np.testing.assert_allclose(extract_features(net, images), expected, rtol=0, atol=TOLERANCE)


def test_grayscale_is_rgb_with_equal_channels_and_batches_agree(tmp_path):
    net = load_dinov2(save(tmp_path, tiny_dinov2_state(seed=5)))
    gray = np.random.default_rng(6).integers(0, 256, (5, 30, 30, 1), dtype=np.uint8)
    gray.flags.writeable = False  # as a memmapped dataset is: read quietly, a batch at a time
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_gray = extract_features(net, gray, batch_size=2)
    np.testing.assert_array_equal(from_gray, extract_features(net, np.repeat(gray, 3, axis=-1), batch_size=2))
    np.testing.assert_allclose(from_gray, extract_features(net, torch.tensor(gray), batch_size=5), atol=1e-5)
    assert extract_features(net, gray[:0]).shape == (0, WIDTH)


@pytest.mark.parametrize("images", [np.zeros((2, 30, 30, 3), np.float32), np.zeros((2, 30, 30, 4), np.uint8),
                                    np.zeros((30, 30, 3), np.uint8), np.zeros((2, 0, 30, 3), np.uint8), [[0]]])
def test_bad_images_are_refused_in_one_line(tmp_path, images):
    net = load_dinov2(save(tmp_path, tiny_dinov2_state()))
    with pytest.raises(DINOv2Error, match="uint8 images") as info:
        extract_features(net, images)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Refusals: each a one-line DINOv2Error naming the file.

class _NotATensor:
    pass


def _with(**changes):
    def mutate(state):
        state.update(changes)
        return state
    return mutate


def _without(key):
    def mutate(state):
        del state[key]
        return state
    return mutate


def _renamed(old, new):
    def mutate(state):
        state[new] = state.pop(old)
        return state
    return mutate


def _nan_in(key):
    def mutate(state):
        state[key][3] = float("nan")
        return state
    return mutate


def _stride_zero(shape):
    """Tensors in the layout of ``shape`` but each a zero-stride view of one float: a tiny file whose
    shapes claim a huge network."""
    return lambda state: {key: torch.zeros(1).expand(size) for key, size in expected_shapes(shape).items()}


def _shape(**sizes):
    from ect.metrics.dinov2 import DINOv2Shape
    return DINOv2Shape(**{**dict(embed_dim=64, patch_size=14, depth=1, mlp_hidden=64, pos_grid=2), **sizes})


INCEPTION_LIKE = {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "fc.weight": torch.zeros(1008, 2048)}
REFUSALS = {
    "inception-like": (lambda state: INCEPTION_LIKE, "not a DINOv2 ViT state dict"),
    "random dict": (lambda state: {"a": 1, "b": "x"}, "mapping of names to tensors"),
    "a list": (lambda state: [torch.zeros(3)], "mapping of names to tensors"),
    "a wrapped state dict": (lambda state: {"model": state}, "mapping of names to tensors"),
    "a pickled object": (lambda state: {"cls_token": _NotATensor()}, "cannot read DINOv2 weights"),
    "wrong shape": (_with(**{"blocks.1.attn.proj.weight": torch.zeros(WIDTH, 64)}), "blocks.1.attn.proj.weight"),
    "inconsistent MLP": (_with(**{"blocks.1.mlp.fc2.weight": torch.zeros(WIDTH, 2 * HIDDEN)}), "mlp.fc2.weight"),
    "NaN weight": (_nan_in("blocks.0.mlp.fc2.bias"), "NaN or infinite"),
    "missing key": (_without("blocks.1.ls2.gamma"), "1 missing keys"),
    "unexpected key": (_with(**{"head.weight": torch.zeros(10, WIDTH)}), "1 unexpected"),
    "integer weights": (_with(**{"norm.bias": torch.zeros(WIDTH, dtype=torch.int64)}), "not floating-point"),
    "registers": (_with(register_tokens=torch.zeros(1, 4, WIDTH)), "register tokens"),
    "SwiGLU": (_renamed("blocks.0.mlp.fc1.weight", "blocks.0.mlp.w12.weight"), "SwiGLU"),
    "head size 48": (lambda state: tiny_dinov2_state(width=96), "heads of 64"),
    "too deep": (_stride_zero(_shape(depth=65)), "65 blocks"),
    "too large a grid": (_stride_zero(_shape(pos_grid=200)), "square grid"),
    "zero-stride views": (_stride_zero(_shape(embed_dim=1024, mlp_hidden=4096)), "the file holds"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_the_loader_refuses_what_is_not_a_dinov2_vit(tmp_path, case):
    mutate, message = REFUSALS[case]
    path = save(tmp_path, mutate(tiny_dinov2_state()))
    with pytest.raises(DINOv2Error, match=message) as info:
        load_dinov2(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", ["truncated", "garbage", "missing"])
def test_unreadable_files_are_refused(tmp_path, content):
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    if content != "missing":
        buffer = io.BytesIO()
        torch.save(tiny_dinov2_state(), buffer)
        data = buffer.getvalue()
        path.write_bytes(data[: len(data) // 2] if content == "truncated" else b"\x00garbage" * 64)
    with pytest.raises(DINOv2Error, match="cannot read DINOv2 weights") as info:
        load_dinov2(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_fd_dinov2_of_the_small_vit_equals_an_independent_float64_computation(tmp_path):
    """The pipeline's FD_DINOv2 (its extractor, statistics and Fréchet distance) against numpy features, numpy
    statistics and scipy's matrix square root, all in float64."""
    from scipy.linalg import sqrtm

    from ect.metrics.features import FeatureExtractor, compute_features
    from ect.metrics.frechet import fid_of_sets, statistics

    state = tiny_dinov2_state()
    path = save(tmp_path, state)
    rng = np.random.default_rng(7)
    reference_images = rng.integers(0, 256, (60, 24, 24, 3), dtype=np.uint8)
    samples = np.clip(reference_images[:40].astype(int) + rng.integers(-40, 40, (40, 24, 24, 3)), 0, 255).astype(np.uint8)

    extractor = FeatureExtractor(path, "dinov2", "fd_dinov2")
    ours = fid_of_sets(compute_features(samples, extractor, batch=16), *statistics(
        compute_features(reference_images, extractor, batch=16)), sets=2)

    def np_frechet(a, b):
        mu_a, mu_b = a.mean(0), b.mean(0)
        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * sqrtm(cov_a @ cov_b).real))

    reference = np_features(state, torch_resize(reference_images))
    theirs = [np_frechet(np_features(state, torch_resize(samples[i * 20:(i + 1) * 20])), reference) for i in range(2)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert min(theirs) > 0.05  # a distance that measures something (random weights: small features)
