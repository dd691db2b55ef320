"""What only a GPU can show for the CIFAR-10 preset: ECT step throughput (fp32 vs bf16 autocast),
peak memory, and the cost of a 50k-sample FID through the Inception path.

    python benchmarks/gpu_check.py [--iters 200] [--batch 128] [--fid-samples 10000] [--out benchmarks/RESULTS.md]
    python benchmarks/gpu_check.py --smoke      # seconds, on CPU: checks that the script runs

1. The full CIFAR-10 DDPM++ network (55.7M parameters, random init: only speed is measured) runs
   ``--iters`` ECT iterations (target pass + forward/backward + RAdam + EMA) at batch ``--batch``,
   first in fp32 (the paper's setting), then under bf16 autocast, in this one process.
2. The same network samples ``--fid-samples`` images in 1 step and they are scored with clean-fid's
   ``legacy_tensorflow`` path. With ``--inception PATH`` the real ``inception-2015-12-05.pt`` is used;
   otherwise torchvision's Inception-v3 architecture (random weights, the same computation) stands
   in, wrapped with the TorchScript file's interface, so the timing is representative.
Results (device name, img/s, peak memory, projected 50k FID time) are appended to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ect.loss import ect_loss
from ect.metrics.features import FeatureExtractor, compute_features
from ect.networks import build_network, count_parameters
from ect.sample import generate
from ect.spec import ECTLoss
from ect.train import ema_update

CIFAR10 = dict(kind="ect", img_resolution=32, img_channels=3, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
               attn_resolutions=[16], dropout=0.2)
SMOKE = {**CIFAR10, "model_channels": 16, "channel_mult": [1, 1], "num_blocks": 1}  # --smoke: same code, tiny net


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_throughput(arch, batch, iters, device, bf16: bool) -> dict:
    torch.manual_seed(0)
    net = build_network(arch).train().to(device)
    ema = build_network(arch).eval().requires_grad_(False).to(device)
    opt = torch.optim.RAdam(net.parameters(), lr=1e-4)
    cfg = ECTLoss()
    res = arch["img_resolution"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup = min(10, max(iters // 10, 1))
    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        y = torch.rand(batch, 3, res, res, device=device) * 2 - 1
        tn, eps = torch.randn(batch, 1, 1, 1, device=device), torch.randn_like(y)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = ect_loss(net, net, y, tn, eps, stage=3, cfg=cfg)
        loss.float().mean().backward()
        opt.step()
        ema_update(ema, net, 0.9999)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"precision": "bf16 autocast" if bf16 else "fp32", "iters": iters, "batch": batch,
            "img_per_s": round(iters * batch / seconds, 1), "s_per_iter": round(seconds / iters, 4),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "projected_200k_iters_h": round(200_000 * seconds / iters / 3600, 1)}


def stand_in_inception(path: Path) -> Path:
    """torchvision's Inception-v3 (random weights) as TorchScript with the interface of clean-fid's file."""
    import torchvision

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            m = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
            m.fc = torch.nn.Identity()
            self.net = m.eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    class InceptionLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # traced: scripting torchvision's Inception returns its training-time output tuple
            self.layers = torch.jit.trace(Layers(), torch.zeros(1, 3, 299, 299))

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return self.layers((x - 128) / 128)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(InceptionLike().eval()), str(path))
    return path


def fid_path_throughput(arch, samples, batch, device, inception: Path) -> dict:
    torch.manual_seed(0)
    net = build_network(arch).eval().to(device)
    _sync(device)
    start = time.perf_counter()
    images = generate(net, list(range(samples)), steps=1, batch=batch, device=device, progress=False)
    _sync(device)
    t_sample = time.perf_counter() - start
    extractor = FeatureExtractor(inception, "inception", "legacy_tensorflow", device=device)
    start = time.perf_counter()
    feats = compute_features(images, extractor, batch)
    _sync(device)
    t_feat = time.perf_counter() - start
    assert feats.shape == (samples, 2048) and np.isfinite(feats).all()
    per_image = (t_sample + t_feat) / samples
    return {"samples": samples, "sample_img_per_s": round(samples / t_sample, 1),
            "inception_img_per_s": round(samples / t_feat, 1),
            "projected_50k_fid_min": round(50_000 * per_image / 60, 1),
            "projected_3x50k_fid_min": round(3 * 50_000 * per_image / 60, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--fid-samples", type=int, default=10_000)
    p.add_argument("--fid-batch", type=int, default=500)
    p.add_argument("--inception", type=Path, help="the real inception-2015-12-05.pt (else a stand-in is built)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    p.add_argument("--smoke", action="store_true",
                   help="a tiny network and sizes on any device, to check the script itself (nothing is written)")
    a = p.parse_args()
    if a.smoke:
        a.iters, a.batch, a.fid_samples, a.fid_batch = 2, 4, 16, 8
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    arch = SMOKE if a.smoke else CIFAR10
    rows = {"device": name, "torch": torch.__version__, "params": count_parameters(build_network(arch)),
            "train": [train_throughput(arch, a.batch, a.iters, device, bf16) for bf16 in (False, True)]}
    inception = a.inception or stand_in_inception(Path("benchmarks/out/inception-stand-in/inception-2015-12-05.pt"))
    rows["fid"] = {**fid_path_throughput(arch, a.fid_samples, a.fid_batch, device, inception),
                   "inception": "real file" if a.inception else "stand-in (torchvision Inception-v3 architecture)"}
    print(json.dumps(rows, indent=1))
    if not a.smoke:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = [f"\n## {name}, {stamp} (torch {torch.__version__})\n",
                 "| precision | batch | iters | img/s | s/iter | peak GiB | projected 200k iters (h) |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['precision']} | {r['batch']} | {r['iters']} | {r['img_per_s']} | {r['s_per_iter']} | "
                  f"{r['peak_mem_gib']} | {r['projected_200k_iters_h']} |" for r in rows["train"]]
        f = rows["fid"]
        lines.append(f"\nFID path ({f['inception']}): {f['samples']} samples, sampling {f['sample_img_per_s']} img/s, "
                     f"Inception {f['inception_img_per_s']} img/s; projected 50k-sample FID {f['projected_50k_fid_min']} "
                     f"min, 3 x 50k {f['projected_3x50k_fid_min']} min.\n")
        with open(a.out, "a") as fh:
            fh.write("\n".join(lines))


if __name__ == "__main__":
    main()
