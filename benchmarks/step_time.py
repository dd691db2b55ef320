"""Time of one ECT training iteration: ours beside locuslab/ect's, in one process, as a ratio.

    python benchmarks/step_time.py [--reference DIR] [--batch-toy 32] [--batch-cifar 8] [--steps 5] [--device cpu]

For the toy preset's network (config/config.yaml) and the CIFAR-10 DDPM++ network (55.7M parameters),
at the given batch: our iteration (`ect.train.TrainStep`: the batch drawn from the dataset, the
student's forward and backward, the target's forward, RAdam, the EMA) and, with `--reference` pointing
at a checkout of locuslab/ect (never committed here), the reference's (`training.loss.ECMLoss` on the
same network with the same weights, then its loop's gradient clean-up, RAdam and EMA). They run in
alternating blocks (a warm-up step, then `--steps` timed steps; `--rounds` rounds), so both see the same
machine; step-by-step alternation measured an interference between the two (each slows the other's
next step unevenly), which blocks avoid. The median of each is reported with img/s, achieved TFLOP/s
(FLOPs counted by `ect.cost`) and the utilisation of the device's peak (none for a CPU), and, as the
method's noise floor, the same measurement of ours against a second copy of ours. Without
`--reference` the reference column is skipped, with a message.

On a CPU the reference's shared-dropout trick (save and restore the CUDA generator) uses the CPU
generator instead, as ours does; nothing else of it is changed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from ect.cost import device_info, iteration_flops, peak_tflops
from ect.networks import build_network, count_parameters
from ect.spec import Tune
from ect.train import Dist, TrainStep

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = dict(kind="ect", img_resolution=32, img_channels=3, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
               attn_resolutions=[16], dropout=0.2)
STAGE = 3  # every sample has r > 0 from stage 2 on: each iteration runs the target pass


def toy_arch() -> dict:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    return {"kind": "ect", "img_resolution": cfg["dataset"]["resolution"], "img_channels": 1,
            **cfg["pretrain"]["arch"], **cfg["tune"]["arch"]}


def ours(arch: dict, batch: int, device: torch.device):
    """Our iteration, as the trainer runs it; returns a function doing one."""
    torch.manual_seed(0)
    net = build_network(arch).train().to(device)
    ema = build_network(arch).eval().requires_grad_(False).to(device)
    cfg = Tune.from_dict({"kimg": 1, "batch": batch, "loss": {"double": 1}})  # iteration i is stage i
    images = torch.randint(0, 256, (4 * batch, arch["img_channels"], arch["img_resolution"], arch["img_resolution"]),
                           dtype=torch.uint8)
    optimizer = torch.optim.RAdam(net.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    step = TrainStep(cfg, Dist(device=device), net, net, ema, [], optimizer, images, None, batch, batch,
                     torch.contiguous_format, torch.autocast(device.type, enabled=False))
    return net, lambda: step(STAGE)


def reference(arch: dict, batch: int, device: torch.device, checkout: Path, weights: dict):
    """locuslab/ect's iteration (its loss and loop) on the same network and weights."""
    sys.path.insert(0, str(checkout))  # the reference's packages: training, torch_utils, dnnlib
    from training.loss import ECMLoss  # noqa: E402 (a checkout given at run time)
    from training.networks import ECMPrecond  # noqa: E402

    if device.type != "cuda":  # its shared dropout masks rewind the CUDA generator; on a CPU, the CPU's
        torch.cuda.get_rng_state, torch.cuda.set_rng_state = torch.get_rng_state, torch.set_rng_state
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()
              if k not in ("kind", "img_resolution", "img_channels", "sigma_min", "sigma_data", "label_dim")}
    def network():
        built = ECMPrecond(img_resolution=arch["img_resolution"], img_channels=arch["img_channels"], label_dim=0,
                           model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                           decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], **kwargs)
        built.load_state_dict(weights)
        return built

    net = network().train().requires_grad_(True).to(device)
    ema = network().eval().requires_grad_(False).to(device)
    loss_fn = ECMLoss()
    loss_fn.update_schedule(STAGE)
    optimizer = torch.optim.RAdam(net.parameters(), lr=1e-4)
    images = torch.rand(batch, arch["img_channels"], arch["img_resolution"], arch["img_resolution"]) * 2 - 1

    def step():
        # the reference loop's iteration: loss, backward, nan_to_num of the gradients, step, EMA
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net=net, images=images.to(device))
        loss.sum().mul(1 / batch).backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.copy_(p_net.detach().lerp(p_ema, 0.9999))
    return step


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(name: str, arch: dict, batch: int, steps: int, rounds: int, device: torch.device,
            checkout: Path | None) -> dict:
    net, our_step = ours(arch, batch, device)
    steps_of = {"ours": our_step, "ours_again": ours(arch, batch, device)[1]}
    if checkout is not None:
        steps_of["reference"] = reference(arch, batch, device, checkout, net.state_dict())
    times = {k: [] for k in steps_of}
    for _ in range(rounds):
        for key, step in steps_of.items():
            timed(step, device)  # warm-up: the first step after the other implementation's is not counted
            times[key] += [timed(step, device) for _ in range(steps)]
    flops = iteration_flops(arch, "ect", batch, batch, (arch["img_channels"], arch["img_resolution"],
                                                         arch["img_resolution"]))
    device_row = device_info(device, 1)
    peak, no_peak = peak_tflops(device_row, "fp32")
    row = {"network": name, "params": count_parameters(net), "batch": batch, "flops_per_iteration": flops,
           "device": device_row["name"], "cpus": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version()}
    for key, values in times.items():
        seconds = statistics.median(values)
        tflops = flops / seconds / 1e12
        row[key] = {"step_s": round(seconds, 4), "img_per_s": round(batch / seconds, 2), "tflops": round(tflops, 4),
                    "utilization": round(tflops / peak, 4) if peak else None}
    row["noise_floor"] = round(row["ours"]["step_s"] / row["ours_again"]["step_s"], 3)  # ours against ours
    if "reference" in row:
        row["ours_over_reference_step_time"] = round(row["ours"]["step_s"] / row["reference"]["step_s"], 3)
    if no_peak:
        row["utilization_note"] = no_peak
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, help="a checkout of locuslab/ect (main branch), never committed here")
    p.add_argument("--batch-toy", type=int, default=32)  # the toy preset's batch
    p.add_argument("--batch-cifar", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per block")
    p.add_argument("--rounds", type=int, default=3, help="rounds of blocks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=["toy", "cifar10"], help="one network only")
    a = p.parse_args()
    if a.reference is None:
        print("no --reference checkout of locuslab/ect given: its column is skipped", file=sys.stderr)
    elif not (a.reference / "training" / "loss.py").exists():
        sys.exit(f"error: {a.reference} is not a checkout of locuslab/ect (no training/loss.py)")
    device = torch.device(a.device)
    for name, arch, batch in (("toy", toy_arch(), a.batch_toy), ("cifar10", CIFAR10, a.batch_cifar)):
        if a.only in (None, name):
            print(json.dumps(measure(name, arch, batch, a.steps, a.rounds, device, a.reference)), flush=True)


if __name__ == "__main__":
    main()
