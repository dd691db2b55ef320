"""What training costs: FLOPs of an iteration, the device it ran on, and that device's peak throughput.

FLOPs are counted with torch's FLOP counter on the meta device (shapes only, nothing computed), once
per configuration: one ECT iteration is the student's forward and backward plus the target's forward
(pretraining: forward and backward). The counter counts matrix products and convolutions, as FLOP
budgets in papers do; elementwise work is left out.

Peak throughputs are NVIDIA's datasheet numbers for dense tensor work, per GPU and precision; a device
not in the table gets no utilisation (null, with the reason) rather than a guess.
"""
from __future__ import annotations

import platform

import torch

# TFLOP/s per GPU, dense (no sparsity), from the vendor's datasheets: fp32 is plain FP32 (TF32 off, the
# reference's default), tf32 and bf16 use the tensor cores.
PEAK_TFLOPS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},  # before "H100": names are matched in order
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # SXM
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0},
    "V100": {"fp32": 15.7, "tf32": None, "bf16": None},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2},
    "RTX 3090": {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0},
}


def iteration_flops(arch: dict, objective: str, micro_batch: int, batch: int, shape: tuple) -> int:
    """FLOPs of one iteration at the global ``batch`` (counted at ``micro_batch`` and scaled)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ect.networks import build_network

    with torch.device("meta"):
        net = build_network(arch).train()
        x, sigma = torch.zeros(micro_batch, *shape), torch.ones(micro_batch)
        labels = torch.zeros(micro_batch, arch["label_dim"]) if arch.get("label_dim") else None
    with FlopCounterMode(display=False) as counter:
        net(x, sigma, class_labels=labels).sum().backward()  # the student
        if objective == "ect":
            with torch.no_grad():
                net(x, sigma, class_labels=labels)  # the target
    return counter.get_total_flops() * (batch // micro_batch)


def forward_flops(arch: dict, batch: int, shape: tuple) -> int:
    """FLOPs of one forward pass (for checks and sampling costs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ect.networks import build_network

    with torch.device("meta"):
        net = build_network(arch).eval()
        x, sigma = torch.zeros(batch, *shape), torch.ones(batch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, sigma)
    return counter.get_total_flops()


def device_info(device: torch.device, count: int) -> dict:
    """The training device, as the report names it."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {"name": name, "count": count, "type": device.type}


def precision_of(bf16: bool, tf32: bool) -> str:
    return "bf16" if bf16 else "tf32" if tf32 else "fp32"


def peak_tflops(device: dict, precision: str) -> tuple[float | None, str | None]:
    """(peak TFLOP/s of all the devices together, None) or (None, why there is none)."""
    if device["type"] != "cuda":
        return None, f"no peak throughput is known for {device['name']}"
    for model, peaks in PEAK_TFLOPS.items():
        if model in device["name"]:
            peak = peaks.get(precision)
            if peak is None:
                return None, f"{model} has no {precision} tensor cores"
            return peak * device["count"], None
    return None, f"{device['name']} is not in the table of known GPUs (ect/cost.py)"
