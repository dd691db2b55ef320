"""CPU/GPU time of one ECT training step (target pass + forward/backward + optimiser + EMA).

    python benchmarks/step_time.py [--batch-toy 32] [--batch-cifar 16] [--steps 3] [--device cpu]

Measures the toy preset's network (from config/config.yaml) and the full CIFAR-10 DDPM++ network
(55.7M parameters) in one process, so their numbers are comparable. Prints one JSON line each.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from ect.loss import ECTLossConfig, ect_loss
from ect.networks import build_network, count_parameters
from ect.train import ema_update

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = dict(kind="ect", img_resolution=32, img_channels=3, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
               attn_resolutions=[16], dropout=0.2)


def toy_arch() -> dict:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    return {"kind": "ect", "img_resolution": 16, "img_channels": 3, **cfg["pretrain"]["arch"], **cfg["tune"]["arch"]}


def step_times(arch: dict, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    net = build_network(arch).train().to(device)
    ema = build_network(arch).eval().requires_grad_(False).to(device)
    opt = torch.optim.RAdam(net.parameters(), lr=1e-4)
    res = arch["img_resolution"]
    cfg = ECTLossConfig()
    times = []
    for i in range(steps + 1):  # the first step warms up and is not counted
        y = torch.rand(batch, 3, res, res, device=device) * 2 - 1
        tn, eps = torch.randn(batch, 1, 1, 1, device=device), torch.randn_like(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = ect_loss(net, net, y, tn, eps, stage=3, cfg=cfg)  # stage 3: every sample runs the target pass
        loss.mean().backward()
        opt.step()
        ema_update(ema, net, 0.9999)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"params": count_parameters(net), "batch": batch, "step_s": round(step, 4), "img_per_s": round(batch / step, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-toy", type=int, default=32)  # the toy preset's batch
    p.add_argument("--batch-cifar", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__}
    for name, arch, batch in (("toy", toy_arch(), a.batch_toy), ("cifar10", CIFAR10, a.batch_cifar)):
        print(json.dumps({"network": name, **step_times(arch, batch, a.steps, device), **machine}), flush=True)


if __name__ == "__main__":
    main()
