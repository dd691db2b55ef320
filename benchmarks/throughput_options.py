"""The throughput options of tune (bf16, channels_last, compile) against the default, on the toy network: the
step time of each as a ratio to the default's, in one process, and the loss over the first iterations
against the default (float32, eager).

    python benchmarks/throughput_options.py [--iterations 200] [--steps 5] [--rounds 3] [--device cpu]

Every option runs the trainer's own step (`ect.train.TrainStep.of`, as `ect tune` builds it) from the same
initial weights on the same digits with the same noise, at the toy preset's batch (32) and curriculum
(config/config.yaml). Step time: alternating blocks per option (a warm-up step, then ``--steps`` timed
steps; ``--rounds`` rounds); the first call of `compile` (its compilation) is timed separately. Losses:
``--iterations`` iterations of each option; reported as the largest and the mean relative difference from
the default's loss at the same iteration, with the tolerance each is held to (TOLERANCE).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ect.data.digits import digits_images  # noqa: E402
from ect.networks import build_network  # noqa: E402
from ect.spec import Tune  # noqa: E402
from ect.train import Dist, TrainStep  # noqa: E402

OPTIONS = {"default": {}, "bf16": {"bf16": True}, "channels_last": {"channels_last": True},
           "compile": {"compile": True}}
# The mean relative difference of the loss from the default's over the iterations, as we hold each option to it:
# bfloat16 rounds activations to 8 bits of mantissa; the others change only the order of float32 operations.
TOLERANCE = {"bf16": 0.05, "channels_last": 0.01, "compile": 0.01}


def toy_setup():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    arch = {"kind": "ect", "img_resolution": cfg["dataset"]["resolution"], "img_channels": 1,
            **cfg["pretrain"]["arch"], **cfg["tune"]["arch"]}
    tune = {k: v for k, v in cfg["tune"].items() if k != "arch"}
    images, _ = digits_images(cfg["dataset"]["resolution"])
    return arch, tune, torch.from_numpy(images).permute(0, 3, 1, 2)


def build_step(option: str, arch: dict, tune: dict, images, device) -> TrainStep:
    """The trainer's step with one option on, from weights seeded alike for every option."""
    cfg = Tune.from_dict({**tune, **OPTIONS[option]})
    torch.manual_seed(0)
    net = build_network(arch)
    ema = build_network(arch).eval().requires_grad_(False).to(device)
    ema.load_state_dict(net.state_dict())
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net.train().requires_grad_(True).to(device, memory_format=memory_format)
    optimizer = torch.optim.RAdam(net.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return TrainStep.of(cfg, Dist(device=device), net, ema, [], optimizer, images, None, cfg.batch, cfg.batch)


def timed(step, iteration: int) -> float:
    start = time.perf_counter()
    step(iteration)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=200, help="iterations of the loss comparison")
    p.add_argument("--steps", type=int, default=5, help="timed steps per block")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    arch, tune, images = toy_setup()

    # Losses: the first iterations of each option from the same start (the compile's first call compiles).
    losses, first_call = {}, {}
    for option in OPTIONS:
        step = build_step(option, arch, tune, images, device)
        first_call[option] = timed(step, 0)
        losses[option] = [step(i) for i in range(1, a.iterations)]
    rows = {}
    for option in OPTIONS:
        rel = [abs(x - y) / abs(y) for x, y in zip(losses[option], losses["default"], strict=True)]
        rows[option] = {"first_call_s": round(first_call[option], 3), "loss_rel_diff_max": round(max(rel), 5),
                        "loss_rel_diff_mean": round(statistics.mean(rel), 5),
                        "tolerance_mean": TOLERANCE.get(option), "final_loss": round(losses[option][-1], 4)}

    # Step time: alternating blocks of each option, late in the curriculum (every sample runs the target pass).
    steps = {option: build_step(option, arch, tune, images, device) for option in OPTIONS}
    times = {option: [] for option in OPTIONS}
    late = a.iterations + 100
    for _ in range(a.rounds):
        for option, step in steps.items():
            timed(step, late)  # warm-up (and, once, the compilation)
            times[option] += [timed(step, late + k) for k in range(a.steps)]
    base = statistics.median(times["default"])
    for option in OPTIONS:
        median = statistics.median(times[option])
        rows[option].update(step_s=round(median, 4), step_time_over_default=round(median / base, 3))
        ok = option == "default" or rows[option]["loss_rel_diff_mean"] <= TOLERANCE[option]
        rows[option]["within_tolerance"] = ok
    print(json.dumps({"device": str(device), "torch": torch.__version__, "batch": tune["batch"],
                      "iterations": a.iterations, "options": rows}, indent=1))


if __name__ == "__main__":
    main()
