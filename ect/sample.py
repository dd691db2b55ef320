"""Samplers: few-step consistency sampling (ECT) and EDM's deterministic Heun sampler (teacher).

Each image's randomness comes from its own generator seeded by its index ("seed"), so any subset
of seeds is reproducible on its own, and sampling can be split across jobs and merged. A
class-conditional model's label for a seed is drawn from that seed's own generator too.
Arithmetic in float64 as the reference does (docs/method.md, "Sampling").
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ect.errors import BadInput
from ect.fileio import open_npz, write_bytes_atomic
from ect.layout import SAMPLE_SETS
from ect.spec import MAX_SEEDS

T_MAX = 80.0


def parse_seeds(spec: str, limit: int = MAX_SEEDS) -> list[int]:
    """'0-9999' or '0-99,200,300-309' -> sorted unique list of seeds (at most ``limit``)."""
    ranges = []
    try:
        for part in str(spec).split(","):
            lo, _, hi = part.strip().partition("-")
            lo_i = int(lo)
            hi_i = int(hi) if hi else lo_i
            if hi_i < lo_i or lo_i < 0 or hi_i >= 2**63:  # seeds are stored as int64
                raise ValueError
            ranges.append((lo_i, hi_i))
    except ValueError:
        raise SamplingError(f"bad seed list {str(spec)[:80]!r}: use e.g. '0-9999' or '0-99,200-299' (seeds in "
                         "[0, 2^63))") from None
    if sum(hi - lo + 1 for lo, hi in ranges) > limit:  # counted before anything is allocated
        raise SamplingError(f"seed list {str(spec)[:80]!r} has more than {limit:,} seeds: split it into several jobs "
                         "and join their files with 'ect merge-samples'")
    return sorted(set().union(*(range(lo, hi + 1) for lo, hi in ranges)))


class SeededNoise:
    """Per-sample Gaussian streams: draw k returns, for every seed, the next N(0, I) tensor."""

    def __init__(self, seeds, shape, device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = shape, device

    def next(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, dtype=torch.float64) for g in self.gens]).to(self.device)


LABEL_SAMPLING = ("dataset", "uniform")  # sample.class_labels; the first is the default (ECT's protocol)
LABEL_STREAM = 0x1ABE1  # keeps a seed's label draw apart from its noise stream


def class_labels(seeds, label_dim: int, how: str = LABEL_SAMPLING[0], dataset_labels: np.ndarray | None = None) -> np.ndarray:
    """One class per seed, from the seed's own generator: the label of a uniformly drawn training image
    ('dataset': the training set's class frequencies, ECT's protocol) or a uniform class ('uniform', EDM2's)."""
    if how not in LABEL_SAMPLING:
        raise SamplingError(f"class labels are drawn by 'dataset' or 'uniform', not {how!r}")
    if how == "dataset":
        if dataset_labels is None or len(dataset_labels) == 0:
            raise SamplingError("drawing class labels from the training set's frequencies needs the dataset "
                                "(--dataset)")
        if int(dataset_labels.max()) >= label_dim:
            raise SamplingError(f"the dataset has label {int(dataset_labels.max())}, the network only {label_dim} "
                                "classes")
    gens = (np.random.default_rng([int(s), LABEL_STREAM]) for s in seeds)
    if how == "uniform":
        return np.fromiter((g.integers(label_dim) for g in gens), np.int64, len(seeds))
    return np.fromiter((dataset_labels[g.integers(len(dataset_labels))] for g in gens), np.int64, len(seeds))


def _denoise(net, x, sigma, labels=None) -> torch.Tensor:
    sigma = torch.full([x.shape[0]], float(sigma), device=x.device)
    return (net(x, sigma) if labels is None else net(x, sigma, class_labels=labels)).to(torch.float64)


@torch.no_grad()
def consistency_sampler(net, noise: SeededNoise, t_mids=(0.821,), steps: int = 1, labels=None) -> torch.Tensor:
    """1 step: x = D(80·z, 80). n steps: then x = D(x + t·ε, t) for t in t_mids[:n−1]; noise std exactly t.
    ``labels``: one-hot class labels of a conditional model."""
    if steps < 1 or steps - 1 > len(t_mids):
        raise SamplingError(f"{steps} steps need {steps - 1} intermediate times, got {list(t_mids)}")
    x = _denoise(net, noise.next() * T_MAX, T_MAX, labels)
    for t in t_mids[: steps - 1]:
        x = _denoise(net, x + t * noise.next(), t, labels)
    return x


def heun_sigmas(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> torch.Tensor:
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sampler(net, noise: SeededNoise, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 labels=None) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler (no churn): 2·num_steps − 1 network evaluations."""
    t = heun_sigmas(num_steps, sigma_min, sigma_max, rho)
    x = noise.next() * t[0]
    for i in range(num_steps):
        d = (x - _denoise(net, x, t[i], labels)) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if i < num_steps - 1:
            d_next = (x_next - _denoise(net, x_next, t[i + 1], labels)) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (d + d_next) / 2
        x = x_next
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC: clamp(x·127.5 + 128, 0, 255) truncated, as the reference."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class SamplingError(BadInput):
    pass


def check_sampler_settings(sampler: str, steps: int, t_mids, heun_steps: int, batch: int) -> None:
    """Refuse settings that would produce garbage (black images, NaN) rather than an error."""
    if sampler not in ("consistency", "heun"):
        raise SamplingError(f"sampler must be 'consistency' or 'heun', not {sampler!r}")
    if batch < 1:
        raise SamplingError(f"batch must be at least 1, not {batch}")
    if sampler == "heun" and heun_steps < 2:
        raise SamplingError(f"heun_steps must be at least 2 (EDM's schedule needs two noise levels), not {heun_steps}")
    if sampler == "consistency":
        if steps < 1 or steps - 1 > len(t_mids):
            raise SamplingError(f"{steps} consistency steps need {max(steps - 1, 0)} intermediate times (t_mid), "
                                f"got {list(t_mids)}")
        for t in t_mids[: steps - 1]:
            if not 0 < t < T_MAX:  # also false for NaN
                raise SamplingError(f"t_mid must lie in (0, {T_MAX:g}), not {t}")


def generate(net, seeds, sampler: str = "consistency", steps: int = 1, t_mids=(0.821,), heun_steps: int = 18,
             batch: int = 256, device="cpu", progress: bool = True, labels: np.ndarray | None = None) -> np.ndarray:
    """Images (uint8 NHWC) for ``seeds``; a class-conditional network needs ``labels`` (one class per seed)."""
    label_dim = getattr(net, "label_dim", 0)
    if label_dim and (labels is None or len(labels) != len(seeds)):
        raise SamplingError(f"the network is class-conditional ({label_dim} classes): it needs one label per seed")
    check_sampler_settings(sampler, steps, t_mids, heun_steps, batch)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    out = []
    for lo in tqdm(range(0, len(seeds), batch), desc=f"sample {sampler}", unit="batch", disable=not progress):
        noise = SeededNoise(seeds[lo: lo + batch], shape, device)
        onehot = (torch.nn.functional.one_hot(torch.as_tensor(labels[lo: lo + batch]), label_dim).to(device)
                  if label_dim else None)
        if sampler == "consistency":
            x = consistency_sampler(net, noise, t_mids, steps, onehot)
        elif sampler == "heun":
            x = heun_sampler(net, noise, heun_steps, labels=onehot)
        else:
            raise ValueError(f"sampler must be 'consistency' or 'heun', not {sampler!r}")
        if not torch.isfinite(x).all():
            raise SamplingError(f"the network produced non-finite values (NaN or inf) for seeds {seeds[lo]}.."
                                f"{seeds[min(lo + batch, len(seeds)) - 1]}: are its weights finite? Nothing was written")
        out.append(to_uint8(x))
    return np.concatenate(out) if out else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)


def set_settings(settings, name: str) -> dict:
    """The sampler settings of one of the pipeline's sample sets (ect/layout.py), from the spec's sample
    section: every set draws seeds 0 .. sets * samples_per_set - 1."""
    if name not in SAMPLE_SETS:
        raise SamplingError(f"unknown sample set {name!r}; the pipeline's sets are {', '.join(SAMPLE_SETS)}")
    sample, sample_set = settings.sample, SAMPLE_SETS[name]
    return {"seeds": f"0-{sample.sets * sample.samples_per_set - 1}", "sampler": sample_set.sampler,
            "steps": max(sample_set.steps, 1), "t_mid": list(sample.t_mid), "heun_steps": sample.heun_steps,
            "batch": sample.batch, "class_labels": sample.class_labels or LABEL_SAMPLING[0]}


def nfe(sampler: str, steps: int, heun_steps: int = 18) -> int:
    return steps if sampler == "consistency" else 2 * heun_steps - 1


def save_samples(path, images: np.ndarray, seeds, meta: dict, labels: np.ndarray | None = None) -> None:
    """The samples file: images, their seeds, the meta (JSON) and, class-conditional, each image's class."""
    buf = io.BytesIO()
    extra = {} if labels is None else {"labels": np.asarray(labels, dtype=np.int64)}
    np.savez(buf, images=images, seeds=np.asarray(seeds, dtype=np.int64), meta=np.array(json.dumps(meta, sort_keys=True)),
             **extra)
    write_bytes_atomic(path, buf.getvalue())


def load_sample_labels(path, count: int) -> np.ndarray | None:
    """The class of each of a samples file's ``count`` images, or None for an unconditional model."""
    with open_npz(path, "samples", SamplingError) as f:
        labels = f["labels"] if "labels" in f.files else None
    if labels is not None and (labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer)
                               or (count and labels.min() < 0)):
        raise SamplingError(f"{path}: labels must be {count} non-negative integers, not {labels.dtype} {labels.shape}")
    return labels


def load_samples(path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8 NHWC, seeds, meta) of a samples file, checked: one image per seed, no seed twice."""
    with open_npz(path, "samples", SamplingError) as f:
        missing = [k for k in ("images", "seeds", "meta") if k not in f.files]
        if missing:
            raise SamplingError(f"{path} is not a samples file written by 'ect sample': it has no {missing}")
        images, seeds, meta = f["images"], f["seeds"], json.loads(str(f["meta"]))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise SamplingError(f"{path}: images must be uint8 (N, H, W, 1 or 3), not {images.dtype} {images.shape}")
    if seeds.ndim != 1 or len(seeds) != len(images) or not np.issubdtype(seeds.dtype, np.integer):
        raise SamplingError(f"{path}: {len(images)} images but seeds of shape {seeds.shape} ({seeds.dtype})")
    if len(np.unique(seeds)) != len(seeds):
        raise SamplingError(f"{path}: some seeds appear twice")
    if not isinstance(meta, dict):
        raise SamplingError(f"{path}: meta is not a JSON object")
    return images, seeds, meta


def merge_samples(paths) -> tuple[np.ndarray, np.ndarray, dict]:
    """Concatenate sample files from split jobs, ordered by seed; seeds must not overlap."""
    parts = [load_samples(p) for p in paths]
    if not parts:
        raise SamplingError("nothing to merge")
    metas = {json.dumps({k: v for k, v in m.items() if k != "run"}, sort_keys=True) for _, _, m in parts}
    if len(metas) > 1:
        raise SamplingError("sample files come from different models or samplers; refusing to merge")
    labels = [load_sample_labels(p, len(part[0])) for p, part in zip(paths, parts, strict=True)]
    if len({lab is None for lab in labels}) > 1:
        raise SamplingError("some sample files have class labels and some do not; refusing to merge")
    images = np.concatenate([p[0] for p in parts])
    seeds = np.concatenate([p[1] for p in parts])
    if len(np.unique(seeds)) != len(seeds):
        raise SamplingError("sample files overlap: some seeds appear twice")
    order = np.argsort(seeds, kind="stable")
    merged_labels = None if labels[0] is None else np.concatenate(labels)[order]
    runs = [m.get("run") for _, _, m in parts if isinstance(m.get("run"), dict)]
    meta = {k: v for k, v in parts[0][2].items() if k != "run"}
    if runs:  # the split jobs' time together
        meta["run"] = {"elapsed_s": sum(float(r.get("elapsed_s", 0)) for r in runs), "jobs": len(parts),
                       "device": runs[0].get("device")}
    return images[order], seeds[order], meta, merged_labels


def save_grid(path, images: np.ndarray, columns: int = 8, min_size: int = 64, gap: int = 1) -> None:
    """The first rows·columns images as one PNG grid, ``gap`` gray pixels between them (dark-background
    digits would run into each other); images under ``min_size`` pixels are enlarged by pixel
    replication (16×16 digits would be unreadable otherwise)."""
    n = min(len(images), columns * columns)
    if n == 0:
        raise SamplingError("no images for a grid")
    cols = min(columns, n)
    rows = -(-n // cols)
    h, w, c = images.shape[1:]
    step_h, step_w = h + gap, w + gap
    grid = np.full((rows * step_h - gap, cols * step_w - gap, c), 96, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * step_h:r * step_h + h, q * step_w:q * step_w + w] = images[i]
    scale = max(1, -(-min_size // h))
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def labels_for(net, seeds, how: str = LABEL_SAMPLING[0], dataset=None) -> np.ndarray | None:
    """The class of each seed for a class-conditional network (None for an unconditional one); 'dataset'
    reads the training set's labels from ``dataset`` (our .npz)."""
    label_dim = getattr(net, "label_dim", 0)
    if not label_dim:
        return None
    dataset_labels = None
    if how == "dataset" and dataset is not None:
        from ect.data import load_labels

        dataset_labels = load_labels(dataset)
    return class_labels(seeds, label_dim, how, dataset_labels)


def sample_to_files(checkpoint, out, settings: dict, grid=None, set_name: str | None = None, device="cpu",
                    progress: bool = True, dataset=None) -> dict:
    """Draw ``settings["seeds"]`` from a checkpoint and write the samples file (and a PNG grid); returns
    the samples' meta. Settings: seeds, sampler, steps, t_mid, heun_steps, batch, class_labels (how a
    class-conditional model's labels are drawn; 'dataset' needs ``dataset``)."""
    from ect.checkpoint import load_network
    from ect.fileio import sha256_file

    started = time.perf_counter()
    seeds = parse_seeds(settings["seeds"])
    sampler, steps, heun_steps = settings["sampler"], settings["steps"], settings["heun_steps"]
    check_sampler_settings(sampler, steps, settings["t_mid"], heun_steps, settings["batch"])
    net = load_network(checkpoint, device=device)
    how = settings.get("class_labels", LABEL_SAMPLING[0])
    labels = labels_for(net, seeds, how, dataset)
    images = generate(net, seeds, sampler=sampler, steps=steps, t_mids=settings["t_mid"], heun_steps=heun_steps,
                      batch=settings["batch"], device=device, progress=progress, labels=labels)
    meta = {"checkpoint_sha256": sha256_file(checkpoint), "sampler": sampler,
            "steps": steps if sampler == "consistency" else heun_steps, "nfe": nfe(sampler, steps, heun_steps),
            "t_mid": list(settings["t_mid"][: steps - 1]) if sampler == "consistency" else []}
    if set_name:
        meta["set"] = set_name
    if labels is not None:
        meta["class_labels"] = how
    meta["run"] = {"elapsed_s": time.perf_counter() - started, "device": str(device)}  # this job's, not the set's
    save_samples(out, images, seeds, meta, labels)
    if grid:
        save_grid(grid, images if labels is None else class_grid_order(images, labels))
    return meta


def class_grid_order(images: np.ndarray, labels: np.ndarray, columns: int = 8) -> np.ndarray:
    """Images arranged for a grid with a row per class (the first ``columns`` classes present, up to
    ``columns`` images each; short rows padded with gray)."""
    rows = []
    for c in np.unique(labels)[:columns]:
        row = images[labels == c][:columns]
        pad = np.full((columns - len(row), *images.shape[1:]), 96, np.uint8)
        rows.append(np.concatenate([row, pad]))
    return np.concatenate(rows)
