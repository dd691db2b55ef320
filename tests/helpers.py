"""Small datasets, teachers and configs for trainer and sampler tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from ect.checkpoint import save_checkpoint
from ect.data import save_dataset
from ect.networks import build_network
from edm_format import randomized

TINY_ARCH = dict(kind="edm", img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4], dropout=0.0)


def make_dataset(path, n=64, res=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, res, res, 3), dtype=np.uint8)
    return save_dataset(path, images, rng.integers(0, 10, size=n))


def make_teacher(path, seed=0, **arch):
    torch.manual_seed(seed)
    net = randomized(build_network({**TINY_ARCH, **arch}), seed=seed, scale=0.05)
    save_checkpoint(path, {**TINY_ARCH, **arch}, net.state_dict(), {"producer": "test"})
    return path


ROOT = Path(__file__).resolve().parents[1]


def toy_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def write_config(path, tune=None, pretrain=None):
    """The toy preset with small 'tune' and 'pretrain' sections (replaced whole, not merged)."""
    base = dict(kimg=0.32, batch=8, lr=1e-3, tick_kimg=0.04, state_kimg=0.04, ema_beta=0.9, arch={"dropout": 0.0},
                loss={"double": 10})
    cfg = {**toy_config(),
           "tune": {**base, **(tune or {})},
           "pretrain": {**base, "arch": {k: v for k, v in TINY_ARCH.items() if k not in ("kind", "img_resolution", "img_channels")},
                        "loss": {}, **(pretrain or {})}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def ect_command(*args):
    return [sys.executable, "-m", "ect.cli", *map(str, args)]


def run_ect(*args, check=True, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(ect_command(*args), capture_output=True, text=True, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"ect {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def state_dicts_equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
