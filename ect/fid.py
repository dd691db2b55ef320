"""FID: features from a TorchScript feature network on local disk, reference statistics, Fréchet distance.

The feature network is a file (Inception's ``inception-2015-12-05.pt`` for the paper presets, the
toy preset's digits classifier otherwise) verified by sha256 before it is loaded; nothing is
downloaded here. Images are resized as clean-fid's ``clean`` mode does (PIL bicubic on float
pixels) to the network's input size. Statistics follow clean-fid: mean and unbiased covariance
in float64. The Fréchet distance is computed here from symmetric eigendecompositions, because
clean-fid's uses ``scipy.linalg.sqrtm(disp=...)``, which SciPy 1.18 removes.
"""
from __future__ import annotations

import io
import json
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ect.fileio import is_number, is_numbers, open_npz, read_json, sha256_file, write_bytes_atomic
from ect.layout import snapshot_name
from ect.metrics import FD_DINOV2, METRICS, FIDError
from ect.metrics.features import compute_features, extractors, feature_moments
from ect.metrics.frechet import (
    MAX_FEATURE_DIM,
    MAX_STATS_BYTES,
    fid_of_sets,
    frechet_distance,
    load_stats,
    moments_to_statistics,
    save_stats,
)
from ect.safepickle import NUMPY_ARRAY_GLOBALS, Format, arrays, load, read_file_limited

# ---------------------------------------------------------------------------------------------
# The pipeline's scoring steps: reference statistics, FID of a sample file, FID of every snapshot.

def shard_range(count: int, shard: tuple[int, int]) -> range:
    """The images of shard i of n: a contiguous slice, the n slices covering all ``count`` exactly once."""
    i, n = shard
    if not 0 <= i < n:
        raise FIDError(f"shard {i} of {n} does not exist (shards are numbered 0..{n - 1})")
    return range(count * i // n, count * (i + 1) // n)


def reference_statistics(data_path, feature_net, kind: str, sha256: str | None, modes, batch: int, device,
                         out, progress: bool = False, shard: tuple[int, int] | None = None, dinov2=None,
                         dinov2_sha256: str | None = None) -> dict:
    """Mean and covariance of the dataset's features in each mode (and in DINOv2's, given its weights),
    written to ``out``; returns its meta. With ``shard`` (i, n): only the moments of the i-th of n slices,
    for `ect fid-stats-merge`."""
    from ect.data import load_dataset, load_dataset_digest

    images, _ = load_dataset(data_path)
    part = shard_range(len(images), shard or (0, 1))
    ex = extractors(kind, sha256, modes, feature_net, device, dinov2, dinov2_sha256)
    moments = {mode: feature_moments(images[part.start:part.stop], e, batch, progress) for mode, e in ex.items()}
    dims = {mode: int(m[1].shape[0]) for mode, m in moments.items()}
    meta = {"source": str(data_path), "images": len(images), "dataset_sha256": load_dataset_digest(data_path),
            "feature_net_sha256": next(iter(ex.values())).sha256, "resolution": int(images.shape[1]),
            "feature_dim": next(iter(dims.values())), "feature_dims": dims,
            **({"dinov2_sha256": ex[FD_DINOV2].sha256} if FD_DINOV2 in ex else {})}
    if shard:
        save_moments(out, moments, {**meta, "shard": list(shard)})
    else:
        save_stats(out, {mode: moments_to_statistics(*m) for mode, m in moments.items()}, meta)
    return {**meta, "modes": list(moments)}


def save_moments(path, moments: dict, meta: dict) -> None:
    arrays = {f"{k}_{mode}": np.asarray(v) for mode, m in moments.items() for k, v in zip(("n", "sum", "outer"), m,
                                                                                           strict=True)}
    buf = io.BytesIO()
    np.savez(buf, **arrays, meta=np.array(json.dumps({**meta, "modes": list(moments)}, sort_keys=True)))
    write_bytes_atomic(path, buf.getvalue())


MAX_SHARDS = 1024  # as the config's fid.reference_shards


def _read_shard(path) -> tuple[dict, dict]:
    """A shard's meta and moments, every field checked (a shard file is as untrusted as any input)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            shard, modes = meta.get("shard"), meta.get("modes")
            if not (isinstance(shard, list) and len(shard) == 2 and all(type(v) is int for v in shard)
                    and 0 <= shard[0] < shard[1] <= MAX_SHARDS):
                raise ValueError(f"meta 'shard' must be [i, n] with 0 <= i < n <= {MAX_SHARDS}")
            if not (isinstance(modes, list) and modes and len(set(modes)) == len(modes)
                    and all(m in METRICS for m in modes)):
                raise ValueError("meta 'modes' must be a list of distinct FID modes")
            if type(meta.get("images")) is not int:
                raise ValueError("meta 'images' must be an integer")
            moments = {}
            for m in modes:
                n, total, outer = f[f"n_{m}"], f[f"sum_{m}"], f[f"outer_{m}"]
                if n.shape != () or not np.issubdtype(n.dtype, np.integer) or int(n) < 0:
                    raise ValueError(f"n_{m} must be a count")
                dim = total.shape[0] if total.ndim == 1 and 0 < total.shape[0] <= MAX_FEATURE_DIM else -1
                if total.shape != (dim,) or outer.shape != (dim, dim) or total.dtype != np.float64 \
                        or outer.dtype != np.float64 or not (np.isfinite(total).all() and np.isfinite(outer).all()):
                    raise ValueError(f"sum_{m} and outer_{m} must be finite float64 of shapes ({dim},), ({dim}, {dim})")
                moments[m] = (int(n), total, outer)
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise FIDError(f"cannot read reference shard {path}: {(str(exc).splitlines() or [''])[0][:200]}") from exc
    return meta, moments


def merge_reference_shards(paths, out) -> dict:
    """Add up the moments of shards 0..n-1 of one dataset and feature network (each exactly once, read one
    at a time) and write the reference statistics; returns their meta."""
    if not paths:
        raise FIDError("no shards to merge")
    keys = ("dataset_sha256", "feature_net_sha256", "dinov2_sha256", "modes", "images", "resolution")
    first, sums, found = None, {}, []
    for path in paths:
        meta, moments = _read_shard(path)
        if first is None:
            first = meta
            if len(paths) != meta["shard"][1]:
                raise FIDError(f"{len(paths)} files for {meta['shard'][1]} shards: every shard 0..{meta['shard'][1] - 1} "
                               "must be given exactly once")
        elif any(meta.get(k) != first.get(k) for k in keys) or meta["shard"][1] != first["shard"][1]:
            raise FIDError(f"{path} is not a shard of the same dataset, feature network and modes as {paths[0]}")
        found.append(meta["shard"][0])
        for mode, (n, total, outer) in moments.items():
            acc = sums.get(mode)
            sums[mode] = (n, total, outer) if acc is None else (acc[0] + n, acc[1] + total, acc[2] + outer)
    n = first["shard"][1]
    if sorted(found) != list(range(n)):
        raise FIDError(f"shards {sorted(found)} of {n}: every shard 0..{n - 1} must be given exactly once")
    stats = {}
    for mode, (count, total, outer) in sums.items():
        if count != first["images"]:
            raise FIDError(f"the shards hold {count} images, the dataset {first['images']}")
        stats[mode] = moments_to_statistics(count, total, outer)
    meta = {k: v for k, v in first.items() if k not in ("shard", "modes")}
    save_stats(out, stats, {**meta, "shards": n})
    return {**meta, "modes": list(stats), "shards": n}


REFERENCE_MATCH = 0.01  # a Frechet distance between two computations of one dataset's statistics that passes


PUBLISHED_METRICS = {"legacy_tensorflow": "fid", "clean": "fid", "fd_dinov2": "fd_dinov2"}  # our name -> EDM2's
EDM2_REFERENCE = Format("EDM2's published statistics", NUMPY_ARRAY_GLOBALS)


def parse_edm2_reference(path) -> dict:
    """In the parsing child (ect/untrusted.py): EDM2's dataset-refs pickle, {metric: {mu, sigma}} of numpy arrays,
    read by the strict reader with numpy's array reconstruction as its only globals."""
    stats = arrays(load(read_file_limited(path, 1 << 30), EDM2_REFERENCE))
    if type(stats) is not dict or not stats:
        raise FIDError(f"{path} is not EDM2's statistics (a dict of metrics)")
    out = {}
    for metric, entry in stats.items():
        if type(metric) is not str or type(entry) is not dict or not all(isinstance(entry.get(k), np.ndarray)
                                                                         for k in ("mu", "sigma")):
            raise FIDError(f"{path}: metric {str(metric)[:40]!r} is not a dict of mu and sigma arrays")
        out[metric] = {k: torch.from_numpy(np.array(entry[k], dtype=np.float64)) for k in ("mu", "sigma")}
    return out


def read_published_stats(path, mode: str = "legacy_tensorflow") -> tuple[np.ndarray, np.ndarray]:
    """Reference statistics a paper's authors published for ``mode``'s feature network: EDM's .npz (mu, sigma) or
    EDM2's .pkl (a pickle: parsed by the strict reader in a limited child), checked (finite float arrays of
    matching shapes, a square covariance)."""
    from ect.untrusted import parse

    path = Path(path)
    if path.suffix == ".pkl":
        metric = PUBLISHED_METRICS[mode]
        stats = parse("edm2-reference", path)
        if metric not in stats:
            raise FIDError(f"published reference statistics {path} have no {metric!r} statistics")
        mu, sigma = stats[metric]["mu"].numpy(), stats[metric]["sigma"].numpy()
    elif path.suffix == ".npz":
        with open_npz(path, "published reference statistics", FIDError, MAX_STATS_BYTES) as f:
            mu, sigma = f["mu"], f["sigma"]
    else:
        raise FIDError(f"published reference statistics {path}: EDM's .npz or EDM2's .pkl, not {path.suffix!r}")
    if not (mu.ndim == 1 and sigma.shape == (len(mu), len(mu)) and 0 < len(mu) <= MAX_FEATURE_DIM
            and np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)
            and np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"published reference statistics {path}: mu and sigma must be finite floats of shapes (D,) "
                       f"and (D, D), not {mu.shape} and {sigma.shape}")
    return mu.astype(np.float64), sigma.astype(np.float64)


def compare_reference(ours_path, theirs_path, mode: str) -> dict:
    """The Frechet distance between our reference statistics (in ``mode``) and the published ones: near 0 when
    our data and preprocessing match the authors'. When both hold FD_DINOv2 statistics (EDM2's img64.pkl
    does), those are compared too, and both must match."""
    ours, meta = load_stats(ours_path)
    if mode not in ours:
        raise FIDError(f"reference statistics {ours_path} have no {mode!r} statistics")
    distances = {mode: _published_distance(ours, ours_path, theirs_path, mode)}
    if FD_DINOV2 in ours and Path(theirs_path).suffix == ".pkl":
        try:
            distances[FD_DINOV2] = _published_distance(ours, ours_path, theirs_path, FD_DINOV2)
        except FIDError as exc:
            if "have no" not in str(exc):
                raise
    return {"ours": str(ours_path), "theirs": str(theirs_path), "mode": mode, "frechet_distance": distances[mode],
            "threshold": REFERENCE_MATCH, "pass": all(d < REFERENCE_MATCH for d in distances.values()),
            "images": meta.get("images"), "distances": distances}


def _published_distance(ours: dict, ours_path, theirs_path, mode: str) -> float:
    mu, sigma = read_published_stats(theirs_path, mode)
    if ours[mode][0].shape != mu.shape:
        raise FIDError(f"{theirs_path} has {mu.shape[0]}-d {mode} features, {ours_path} {ours[mode][0].shape[0]}-d: "
                       "not the same feature network")
    return frechet_distance(*ours[mode], mu, sigma)


@dataclass(frozen=True)
class FeatureFiles:
    """The feature networks a scoring step was given: the FID network's file, and DINOv2's weights when the run
    scores FD_DINOv2 (fid.dinov2)."""

    feature_net: str
    dinov2: str | None = None

    def check(self, settings) -> None:
        if (self.dinov2 is None) != (settings.fid.dinov2 is None):
            raise FIDError("fid.dinov2 is set: give the weights with --dinov2" if self.dinov2 is None else
                           "--dinov2 is given but the config scores no FD_DINOv2 (fid.dinov2 is not set)")


def open_reference(settings, ref_path, nets: FeatureFiles, device, modes=None):
    """The reference statistics and the matching extractors (``modes``, all of fid.modes by default, and
    FD_DINOv2 when the run scores it); refuse a pair that does not belong together."""
    nets.check(settings)
    ref, ref_meta = load_stats(ref_path)
    net = settings.fid.feature_net
    ex = extractors(net.kind, net.sha256, modes or settings.fid.modes, nets.feature_net, device, nets.dinov2,
                    settings.fid.dinov2.sha256 if settings.fid.dinov2 else None)
    digest = next(iter(ex.values())).sha256
    for key, extractor in (("feature_net_sha256", next(iter(ex.values()))), ("dinov2_sha256", ex.get(FD_DINOV2))):
        if extractor is not None and ref_meta.get(key) != extractor.sha256:
            raise FIDError(f"reference statistics {ref_path} were computed with another feature network "
                           f"({ref_meta.get(key)}) than the {extractor.kind} file given ({extractor.sha256})")
    missing = [m for m in ex if m not in ref]
    if missing:
        raise FIDError(f"reference statistics {ref_path} have no {missing} statistics; rerun fid-stats")
    return ref, ref_meta, ex, digest


def score_samples(settings, samples_path, ref_path, nets: FeatureFiles, device, progress: bool = False) -> dict:
    """FID of each seed-ordered set of a samples file in every mode (min, mean, each): the result JSON."""
    from ect.sample import load_samples

    started = time.perf_counter()
    sets, batch = settings.sample.sets, settings.sample.batch
    images, seeds, sample_meta = load_samples(samples_path)
    ref, ref_meta, ex, digest = open_reference(settings, ref_path, nets, device)
    if ref_meta.get("resolution") not in (None, images.shape[1]):
        raise FIDError(f"{samples_path} holds {images.shape[1]}x{images.shape[2]} images, but the reference "
                       f"statistics {ref_path} are of {ref_meta['resolution']}x{ref_meta['resolution']} images")
    if len(images) % sets:
        raise FIDError(f"{len(images)} samples do not split into sample.sets = {sets} equal sets")
    modes = {}
    for mode, e in ex.items():
        fids = fid_of_sets(compute_features(images, e, batch, progress), *ref[mode], sets)
        modes[mode] = {"fid_min": min(fids), "fid_mean": sum(fids) / len(fids), "fid_sets": fids}
    headline = settings.fid.modes[0]
    return {**modes[headline], "mode": headline, "modes": modes, "sets": sets,
            "samples_per_set": len(images) // sets, "seeds": [int(seeds[0]), int(seeds[-1])],
            "samples_sha256": sha256_file(samples_path), "feature_net_sha256": digest, "reference": ref_meta,
            **{k: sample_meta[k] for k in ("set", "sampler", "steps", "nfe", "t_mid", "checkpoint_sha256")
               if k in sample_meta},
            "runs": {"sample": sample_meta.get("run"), "fid": {"elapsed_s": time.perf_counter() - started,
                                                                "device": str(device)}}}


COST_KEYS = ("kimg", "elapsed_s", "device_hours", "flops")  # of a snapshot, from its meta (ect/train.py)
METRIC_KEYS = ("fid_", f"{FD_DINOV2}_")  # a snapshot's metrics: fid_<n>step (the headline mode), fd_dinov2_<n>step
CURVE_COLUMNS = ("snapshot", *COST_KEYS)


def score_snapshot(path, settings, scorers: dict, sets: int, samples: int, device, dataset=None) -> dict:
    """A snapshot's cost (from its meta) and its sets of each metric at each of fid.curve_steps consistency
    steps, drawing seeds 0 .. sets * samples - 1 (``scorers``: the key of each metric in the point, ``fid`` or
    ``fd_dinov2``, -> its reference mean and covariance and its extractor; ``dataset``: where a
    class-conditional model's labels come from)."""
    from ect.checkpoint import load_network, read_checkpoint
    from ect.sample import LABEL_SAMPLING, generate, labels_for

    net = load_network(path, device=device)
    meta = read_checkpoint(path)["meta"]
    trained_on = meta.get("device") if isinstance(meta.get("device"), dict) else {}
    point = {"snapshot": Path(path).name, **{k: meta.get(k) for k in COST_KEYS}, "device": trained_on.get("name"),
             "params": sum(p.numel() for p in net.parameters()),
             "flops_per_iteration": meta.get("flops_per_iteration")}
    seeds, batch = list(range(sets * samples)), settings.sample.batch
    labels = labels_for(net, seeds, settings.sample.class_labels or LABEL_SAMPLING[0], dataset)
    for steps in settings.fid.curve_steps:
        images = generate(net, seeds, steps=steps, t_mids=settings.sample.t_mid, batch=batch, device=device,
                          progress=False, labels=labels)
        for key, (reference, extractor) in scorers.items():
            point[f"{key}_{steps}step"] = fid_of_sets(compute_features(images, extractor, batch), *reference, sets)
    return point


def snapshot_scorers(settings, ref_path, nets: FeatureFiles, device) -> tuple[dict, str]:
    """What a snapshot is scored with: FID in the headline mode, FD_DINOv2 when the run scores it; and the
    feature network's sha256."""
    mode = settings.fid.modes[0]
    ref, _, ex, digest = open_reference(settings, ref_path, nets, device, modes=[mode])
    return {key: (ref[m], ex[m]) for key, m in (("fid", mode), (FD_DINOV2, FD_DINOV2)) if m in ex}, digest


def fid_curve(settings, snapshot_dir, ref_path, nets: FeatureFiles, device, progress: bool = False,
              dataset=None) -> dict:
    """FID (headline mode, fid.curve_steps steps, seeds 0..fid.curve_samples-1), and FD_DINOv2 when the run
    scores it, of every snapshot in a directory: the metrics against training budget."""

    started = time.perf_counter()
    mode, samples = settings.fid.modes[0], settings.fid.curve_samples
    scorers, digest = snapshot_scorers(settings, ref_path, nets, device)
    snapshots = sorted(Path(snapshot_dir).glob("*.pt"))
    if not snapshots:
        raise FIDError(f"no snapshots (*.pt) in {snapshot_dir}")
    points = []
    for path in tqdm(snapshots, desc="snapshots", disable=not progress):
        point = score_snapshot(path, settings, scorers, 1, samples, device, dataset)
        points.append({k: v[0] if k.startswith(METRIC_KEYS) else v for k, v in point.items()})
        if progress:
            print(json.dumps(points[-1]), flush=True)
    return {"samples": samples, "mode": mode, "feature_net_sha256": digest, "points": points,
            "run": {"elapsed_s": time.perf_counter() - started, "device": str(device)}}


def snapshot_at(snapshot_dir, kimg: float) -> Path:
    """The snapshot of a tuning run after ``kimg`` thousand images."""
    path = Path(snapshot_dir) / snapshot_name(round(kimg * 1000))
    if not path.is_file():
        raise FIDError(f"no snapshot at {kimg:g} kimg in {snapshot_dir} ({path.name}): a budget must be a multiple "
                       "of tune.snapshot_kimg")
    return path


def score_snapshots(settings, paths, sets: int, samples: int, ref_path, nets: FeatureFiles, device,
                    dataset=None) -> dict:
    """Snapshots scored with ``sets`` sets of ``samples`` at each of fid.curve_steps steps (the headline mode,
    and FD_DINOv2 when the run scores it)."""
    scorers, digest = snapshot_scorers(settings, ref_path, nets, device)
    points = [score_snapshot(path, settings, scorers, sets, samples, device, dataset) for path in paths]
    return {"points": points, "mode": settings.fid.modes[0], "sets": sets, "samples": samples,
            "feature_net_sha256": digest}


def scaling_point(settings, snapshot_dir, kimg: float, model: str, ref_path, nets: FeatureFiles, device,
                  dataset=None) -> dict:
    """One point of a scaling study: the snapshot of a model's tuning run at ``kimg``, scored with
    scaling.sets sets of scaling.samples at each of fid.curve_steps steps."""
    scored = score_snapshots(settings, [snapshot_at(snapshot_dir, kimg)], settings.scaling.sets,
                             settings.scaling.samples, ref_path, nets, device, dataset)
    point, run = scored.pop("points")[0], settings.scaling.models[model]
    return {"model": model, "size": run.size, "design": run.design, **point, **scored}


def fid_snapshot(settings, snapshot_dir, kimg: float, ref_path, nets: FeatureFiles, device, dataset=None) -> dict:
    """A snapshot at a budget the paper publishes a number at, scored with the full protocol (sample.sets sets of
    sample.samples_per_set, as the final model is)."""
    scored = score_snapshots(settings, [snapshot_at(snapshot_dir, kimg)], settings.sample.sets,
                             settings.sample.samples_per_set, ref_path, nets, device, dataset)
    return {**scored.pop("points")[0], **scored}


def fid_emas(settings, emas_dir, ref_path, nets: FeatureFiles, device, dataset=None) -> dict:
    """Every EMA a run saved at its end (the classic one and each power-function one), scored as the final model
    is (sample.sets sets of sample.samples_per_set at each of fid.curve_steps steps), as EDM2 scores each EMA
    length; the minimum of each metric, and which EMA the run's output (and its verdicts) is."""
    from ect.checkpoint import read_checkpoint

    paths = sorted(Path(emas_dir).glob("*.pt"))
    if not paths:
        raise FIDError(f"no EMAs (*.pt) in {emas_dir}: the run tracks no power-function EMAs (tune.pf_ema_stds)")
    scored = score_snapshots(settings, paths, settings.sample.sets, settings.sample.samples_per_set, ref_path, nets,
                             device, dataset)
    for point, path in zip(scored["points"], paths, strict=True):
        std = read_checkpoint(path)["meta"].get("ema_std")
        point["ema_std"] = float(std) if is_number(std) else 0.0  # 0: the classic EMA
    keys = sorted({k for p in scored["points"] for k in p if k.startswith(METRIC_KEYS)})
    best = {k: min(scored["points"], key=lambda p: sum(p[k]) / len(p[k])) for k in keys}
    return {**scored, "output_ema_std": settings.tune.output_ema_std,
            "min": {k: {"ema_std": p["ema_std"], "mean": sum(p[k]) / len(p[k])} for k, p in best.items()}}


def fid_budget(settings, curve_path, snapshot_dir, ref_path, nets: FeatureFiles, device, dataset=None) -> dict:
    """A compute-budget claim (report.paper.budget) judged from the FID curve: the snapshots near the crossing
    and the best within the budget are scored with the full protocol, then ect.claims judges it."""
    from ect.claims import budget_candidates, judge_budget
    from ect.layout import SAMPLE_SETS

    budget = settings.report.paper.budget
    key = f"fid_{SAMPLE_SETS[budget.set].steps}step"
    points = read_curve(curve_path, key)["points"]
    names = budget_candidates(points, key, budget.fid, budget.gpu_hours)
    scored = score_snapshots(settings, [Path(snapshot_dir) / n for n in names], settings.sample.sets,
                             settings.sample.samples_per_set, ref_path, nets, device, dataset)
    full = {p["snapshot"]: p[key] for p in scored["points"]}
    measured = next((p["device"] for p in points if isinstance(p.get("device"), str)), None)  # where it trained
    judged = judge_budget(points, full, key, plain_budget(budget), measured)
    return {**judged, "set": budget.set, "source": budget.source, "mode": scored["mode"], "sets": scored["sets"],
            "samples": scored["samples"], "curve_samples": settings.fid.curve_samples}


def plain_budget(budget) -> dict:
    return {k: getattr(budget, k) for k in ("gpu_hours", "device", "fid", "statistic")}


SCALING_COLUMNS = ("compute", "fid", "size", "steps", "set", "kimg", "run", "design", "params", "flops_per_iteration",
                   "metric")  # what `ect scaling-fit` reads (ect/scaling.py)


def scaling_table(points: list[dict]) -> str:
    """Scaling points as the CSV `ect scaling-fit` reads: a row per set of each metric at each step count."""
    rows = [",".join(SCALING_COLUMNS)]
    for point in points:
        for key, values in point.items():
            metric = next((m.rstrip("_") for m in METRIC_KEYS if key.startswith(m)), None)
            if metric is None:
                continue
            steps = key.removeprefix(f"{metric}_").removesuffix("step")
            for i, value in enumerate(values):
                row = {"compute": point["flops"], "fid": value, "size": point["size"], "steps": steps, "set": i,
                       "kimg": point["kimg"], "run": point["model"], "design": point["design"],
                       "params": point.get("params"), "flops_per_iteration": point.get("flops_per_iteration"),
                       "metric": metric}
                rows.append(",".join("" if row[c] is None else str(row[c]) for c in SCALING_COLUMNS))
    return "\n".join(rows) + "\n"


def curve_table(curve: dict) -> str:
    """The FID curve as CSV, one row per snapshot (DVC plots read it): cost columns, then each metric at each
    step count."""
    fids = sorted({k for p in curve["points"] for k in p if k.startswith(METRIC_KEYS)})
    rows = [",".join((*CURVE_COLUMNS, *fids))]
    rows += [",".join("" if p.get(k) is None else str(p[k]) for k in (*CURVE_COLUMNS, *fids)) for p in curve["points"]]
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------
# Reading back what the scoring steps wrote: every field a reader uses is checked (ect.fileio.read_json).

def _count(value) -> bool:
    return type(value) is int and value >= 0


def _modes(value) -> bool:
    return type(value) is dict and all(k in METRICS and type(v) is dict and is_number(v.get("fid_min"))
                                       and is_numbers(v.get("fid_sets")) for k, v in value.items())


def _curve_points(value) -> bool:
    """A curve's points: a snapshot name each, finite FIDs, cost numbers or null."""
    return type(value) is list and 0 < len(value) <= 100_000 and all(
        type(p) is dict and type(p.get("snapshot")) is str and p["snapshot"].endswith(".pt") and "/" not in p["snapshot"]
        and all(is_number(v) for k, v in p.items() if k.startswith(METRIC_KEYS))
        and all(p.get(k) is None or is_number(p[k]) for k in COST_KEYS) for p in value)


FID_RESULT = {"fid_min": is_number, "fid_mean": is_number, "fid_sets": is_numbers, "nfe": _count,
              "mode": lambda v: v in METRICS, "modes": _modes, "sets": _count, "samples_per_set": _count,
              "feature_net_sha256": lambda v: type(v) is str, "reference": lambda v: type(v) is dict,
              "seeds": lambda v: type(v) is list and len(v) == 2 and all(_count(s) for s in v)}
CURVE = {"samples": _count, "mode": lambda v: v in METRICS, "points": _curve_points}
SNAPSHOT_FID = {"snapshot": lambda v: type(v) is str, "sets": _count, "samples": _count}
REFERENCE_CHECK = {"frechet_distance": is_number, "threshold": is_number, "pass": lambda v: type(v) is bool,
                   "ours": lambda v: type(v) is str, "theirs": lambda v: type(v) is str, "mode": lambda v: v in METRICS}


def read_fid_result(path) -> dict:
    return read_json(path, "FID result", FID_RESULT)


def read_curve(path, key: str | None = None) -> dict:
    """A FID curve (`ect fid-curve`), checked; with ``key``, every point must have that FID."""
    curve = read_json(path, "FID curve", CURVE)
    if key is not None and not all(key in p for p in curve["points"]):
        raise FIDError(f"FID curve {path} has points without {key}: rerun fid-curve")
    return curve


def read_snapshot_fid(path, key: str) -> dict:
    return read_json(path, "snapshot FID", {**SNAPSHOT_FID, key: is_numbers})


RUN_NAME = re.compile(r"[A-Za-z0-9]+(-seed\d+|-batch\d+)?")  # a scaling study's run (ect/spec.py: Scaling.models)
SCALING_POINT = {"model": lambda v: type(v) is str and RUN_NAME.fullmatch(v) is not None and len(v) <= 60,
                 "size": lambda v: type(v) is str and v.isalnum() and len(v) <= 40,
                 "design": lambda v: v in ("prefix", "batch"), "kimg": is_number, "flops": is_number,
                 "sets": _count, "samples": _count,
                 "params": lambda v: v is None or _count(v), "flops_per_iteration": lambda v: v is None or is_number(v)}


def read_scaling_point(path) -> dict:
    """A point `ect scaling-point` wrote, checked: its run, budget, compute and metric sets."""
    point = read_json(path, "scaling point", SCALING_POINT)
    metrics = [k for k in point if k.startswith(METRIC_KEYS)]
    if not any(k.startswith("fid_") for k in metrics) or not all(is_numbers(point[k]) for k in metrics):
        raise FIDError(f"scaling point {path} has no FID sets: rerun scaling-point")
    return point


EMAS = {"points": lambda v: type(v) is list and 0 < len(v) <= 64 and all(
    type(p) is dict and is_number(p.get("ema_std")) and all(is_numbers(x) for k, x in p.items()
                                                            if k.startswith(METRIC_KEYS)) for p in v),
    "output_ema_std": is_number, "min": lambda v: type(v) is dict}


def read_emas(path) -> dict:
    """Every EMA's scores (`ect fid-emas`), checked."""
    return read_json(path, "EMA scores", EMAS)


def read_reference_check(path) -> dict:
    return read_json(path, "reference check", REFERENCE_CHECK)
