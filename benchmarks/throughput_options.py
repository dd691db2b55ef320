"""The throughput options of tune (bf16, channels_last, compile) against the default, on the toy network: the
step time of each as a ratio to the default's, in one process, and the loss over the first iterations
against the default (float32, eager).

    python benchmarks/throughput_options.py [--iterations 200] [--steps 5] [--rounds 3] [--device cpu]

Every option runs the trainer's own step (`ect.train.TrainStep.of`, as `ect tune` builds it) from the same
initial weights on the same digits with the same noise, at the toy preset's batch (32) and curriculum
(config/config.yaml). Step time: alternating blocks per option (a warm-up step, then ``--steps`` timed
steps; ``--rounds`` rounds); the first call (for `compile`, its compilation) is timed separately.

Losses: ``--iterations`` iterations of each option. Training is chaotic: a change in the order of float
operations grows over the iterations until the trajectories are as far apart as two seeds'. So an option
is held to a tolerance (TOLERANCE) over the first EARLY iterations, before that growth; over all the
iterations its mean loss is reported beside the default's and beside the default's with another seed
(``seed_spread``: how far the mean moves by chance alone).
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
# The largest relative difference of the loss from the default's over the first EARLY iterations: bfloat16 rounds
# activations to 8 bits of mantissa; the others change only the order of float32 operations.
EARLY = 10
TOLERANCE = {"bf16": 0.05, "channels_last": 1e-3, "compile": 1e-3}


def toy_setup():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    arch = {"kind": "ect", "img_resolution": cfg["dataset"]["resolution"], "img_channels": 1,
            **cfg["pretrain"]["arch"], **cfg["tune"]["arch"]}
    tune = {k: v for k, v in cfg["tune"].items() if k != "arch"}
    images, _ = digits_images(cfg["dataset"]["resolution"])
    return arch, tune, torch.from_numpy(images).permute(0, 3, 1, 2)


def build_step(option: str, arch: dict, tune: dict, images, device, seed: int = 0) -> TrainStep:
    """The trainer's step with one option on, from weights seeded alike for every option."""
    cfg = Tune.from_dict({**tune, **OPTIONS[option], "seed": seed})
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
        start = time.perf_counter()
        losses[option] = [step(0)]
        first_call[option] = time.perf_counter() - start
        losses[option] += [step(i) for i in range(1, a.iterations)]
    other_seed = build_step("default", arch, tune, images, device, seed=1)
    mean_of = {option: statistics.mean(values) for option, values in losses.items()}
    seed_spread = abs(statistics.mean(other_seed(i) for i in range(a.iterations)) / mean_of["default"] - 1)
    rows = {}
    for option in OPTIONS:
        early = [abs(x - y) / abs(y) for x, y in zip(losses[option][:EARLY], losses["default"][:EARLY], strict=True)]
        rows[option] = {"first_call_s": round(first_call[option], 3), "early_loss_rel_diff_max": float(f"{max(early):.3g}"),
                        "tolerance": TOLERANCE.get(option), "mean_loss": round(mean_of[option], 4),
                        "mean_loss_rel_diff": round(mean_of[option] / mean_of["default"] - 1, 4)}

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
        ok = option == "default" or rows[option]["early_loss_rel_diff_max"] <= TOLERANCE[option]
        rows[option]["within_tolerance"] = ok
    print(json.dumps({"device": str(device), "torch": torch.__version__, "batch": tune["batch"],
                      "iterations": a.iterations, "early_iterations": EARLY, "seed_spread": round(seed_spread, 4),
                      "options": rows}, indent=1))


if __name__ == "__main__":
    main()
