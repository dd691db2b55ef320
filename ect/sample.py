"""Samplers: few-step consistency sampling (ECT) and EDM's deterministic Heun sampler (teacher).

Each image's randomness comes from its own generator seeded by its index ("seed"), so any subset
of seeds is reproducible on its own, and sampling can be split across jobs and merged.
Arithmetic in float64 as the reference does (``shared/reference/ect-method.md`` §1d).
"""
from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ect.fileio import write_bytes_atomic

T_MAX = 80.0


def parse_seeds(spec: str) -> list[int]:
    """'0-9999' or '0-99,200,300-309' -> sorted unique list of seeds."""
    seeds: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            lo_i = int(lo)
            hi_i = int(hi) if hi else lo_i
            if hi_i < lo_i or lo_i < 0:
                raise ValueError
            seeds.update(range(lo_i, hi_i + 1))
    except ValueError:
        raise ValueError(f"bad seed list {spec!r}: use e.g. '0-9999' or '0-99,200-299'") from None
    return sorted(seeds)


class SeededNoise:
    """Per-sample Gaussian streams: draw k returns, for every seed, the next N(0, I) tensor."""

    def __init__(self, seeds, shape, device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = shape, device

    def next(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, dtype=torch.float64) for g in self.gens]).to(self.device)


def _denoise(net, x, sigma) -> torch.Tensor:
    return net(x, torch.full([x.shape[0]], float(sigma), device=x.device)).to(torch.float64)


@torch.no_grad()
def consistency_sampler(net, noise: SeededNoise, t_mids=(0.821,), steps: int = 1) -> torch.Tensor:
    """1 step: x = D(80·z, 80). n steps: then x = D(x + t·ε, t) for t in t_mids[:n−1]; noise std exactly t."""
    if steps < 1 or steps - 1 > len(t_mids):
        raise ValueError(f"{steps} steps need {steps - 1} intermediate times, got {list(t_mids)}")
    x = _denoise(net, noise.next() * T_MAX, T_MAX)
    for t in t_mids[: steps - 1]:
        x = _denoise(net, x + t * noise.next(), t)
    return x


def heun_sigmas(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> torch.Tensor:
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sampler(net, noise: SeededNoise, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler (no churn): 2·num_steps − 1 network evaluations."""
    t = heun_sigmas(num_steps, sigma_min, sigma_max, rho)
    x = noise.next() * t[0]
    for i in range(num_steps):
        d = (x - _denoise(net, x, t[i])) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if i < num_steps - 1:
            d_next = (x_next - _denoise(net, x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (d + d_next) / 2
        x = x_next
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC: clamp(x·127.5 + 128, 0, 255) truncated, as the reference."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate(net, seeds, sampler: str = "consistency", steps: int = 1, t_mids=(0.821,), heun_steps: int = 18,
             batch: int = 256, device="cpu", progress: bool = True) -> np.ndarray:
    if getattr(net, "label_dim", 0):
        raise ValueError("class-conditional sampling is not implemented yet (label_dim > 0)")
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    out = []
    for lo in tqdm(range(0, len(seeds), batch), desc=f"sample {sampler}", unit="batch", disable=not progress):
        noise = SeededNoise(seeds[lo: lo + batch], shape, device)
        if sampler == "consistency":
            x = consistency_sampler(net, noise, t_mids, steps)
        elif sampler == "heun":
            x = heun_sampler(net, noise, heun_steps)
        else:
            raise ValueError(f"sampler must be 'consistency' or 'heun', not {sampler!r}")
        out.append(to_uint8(x))
    return np.concatenate(out) if out else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)


# The sample sets the pipeline draws: name -> (which checkpoint, sampler, consistency steps).
SAMPLE_SETS = {
    "teacher-1step": ("teacher", "consistency", 1),  # the teacher used as a 1-step model: what ECT improves on
    "teacher-heun": ("teacher", "heun", 0),  # the teacher's own sampler: the diffusion baseline
    "ect-1step": ("tuned", "consistency", 1),
    "ect-2step": ("tuned", "consistency", 2),
}


def nfe(sampler: str, steps: int, heun_steps: int = 18) -> int:
    return steps if sampler == "consistency" else 2 * heun_steps - 1


def save_samples(path, images: np.ndarray, seeds, meta: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, images=images, seeds=np.asarray(seeds, dtype=np.int64), meta=np.array(json.dumps(meta, sort_keys=True)))
    write_bytes_atomic(path, buf.getvalue())


def load_samples(path) -> tuple[np.ndarray, np.ndarray, dict]:
    with np.load(path, allow_pickle=False) as f:
        return f["images"], f["seeds"], json.loads(str(f["meta"]))


def merge_samples(paths) -> tuple[np.ndarray, np.ndarray, dict]:
    """Concatenate sample files from split jobs, ordered by seed; seeds must not overlap."""
    parts = [load_samples(p) for p in paths]
    if not parts:
        raise ValueError("nothing to merge")
    metas = {json.dumps(m, sort_keys=True) for _, _, m in parts}
    if len(metas) > 1:
        raise ValueError("sample files come from different models or samplers; refusing to merge")
    images = np.concatenate([p[0] for p in parts])
    seeds = np.concatenate([p[1] for p in parts])
    if len(np.unique(seeds)) != len(seeds):
        raise ValueError("sample files overlap: some seeds appear twice")
    order = np.argsort(seeds, kind="stable")
    return images[order], seeds[order], parts[0][2]


def save_grid(path, images: np.ndarray, columns: int = 8, min_size: int = 64) -> None:
    """The first rows·columns images as one PNG grid; images under ``min_size`` pixels are enlarged
    by pixel replication (16×16 digits would be unreadable otherwise)."""
    n = min(len(images), columns * columns)
    if n == 0:
        raise ValueError("no images for a grid")
    cols = min(columns, n)
    rows = -(-n // cols)
    h, w, c = images.shape[1:]
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
    scale = max(1, -(-min_size // h))
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
