"""ect <step>: one command per pipeline step, each with explicit inputs, outputs and config.

Exit status: 0 when the step's outputs were written completely; 2 for bad input (one line on
stderr, nothing written); 75 when a trainer was stopped by a signal after saving its state (rerun
to resume); 1 when training diverged.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ect.errors import BadInput, printable

EPILOG = "Run 'ect <step> --help' for the options of one step."


# ---------------------------------------------------------------------------------------------
# Argument types and groups shared by several steps.

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text[:40]!r}") from None
    if not 0 < value < 1e9:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text[:40]}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def config_arg(p, required=True) -> None:
    p.add_argument("--config", nargs="+", required=required, metavar="YAML",
                   help="preset, then overlays, merged in order and validated (e.g. config/config.yaml)")


def threads_arg(p) -> None:
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default: torch's choice)")


def device_args(p) -> None:
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    threads_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def feature_args(p, scoring=True) -> None:
    """The feature networks; for scoring steps also the reference statistics and the JSON result."""
    p.add_argument("--feature-net", required=True,
                   help="TorchScript feature network (.pt); checked against its pinned sha256 when there is one")
    p.add_argument("--dinov2", help="DINOv2 ViT weights (.pth) to score FD_DINOv2 as well (config: fid.dinov2)")
    if scoring:
        p.add_argument("--ref", required=True, help="reference statistics from 'ect fid-stats'")
        p.add_argument("--out", required=True, help="result .json")


def train_args(p, with_teacher: bool) -> None:
    config_arg(p)
    if with_teacher:
        p.add_argument("--model", help="a scaling study's run (scaling.models: a size, <size>-seed<k>, "
                                        "<size>-batch<b>): its size's overrides, its seed, batch and length apply")
    else:
        p.add_argument("--size", help="a scaling study's model size: its scaling.sizes overrides apply to the arch")
    p.add_argument("--data", required=True, help="dataset .npz written by 'ect' (uint8 images + labels)")
    if with_teacher:
        p.add_argument("--teacher", required=True, help="initial checkpoint (teacher.pt from convert-edm or pretrain)")
        p.add_argument("--snapshots", help="directory that receives the EMA snapshots at the end")
        p.add_argument("--emas", help="directory that receives every EMA at the end (the classic one and each "
                                      "power-function one), for scoring them all")
    p.add_argument("--state-dir", required=True,
                   help="resumable state (weights, EMA, optimiser, step, RNG); rerunning the command resumes from it; "
                        "one trainer at a time (it holds a lock on the directory)")
    p.add_argument("--out", required=True, help="final EMA weights, our checkpoint format")
    p.add_argument("--train-log", dest="log", help="copy of the per-tick JSON-lines log, written at the end")
    threads_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def setup_device(args):
    """The device of a sampling or scoring step, with the reference's numerics: TF32 off (locuslab/ect turns
    it off for sampling and FID; cuDNN would otherwise use it for convolutions)."""
    import torch

    set_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise BadInput(f"--device {args.device!r}: {exc}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise BadInput(f"--device {args.device}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    if device.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {args.device}: 'auto', 'cpu' or 'cuda[:N]'")
    return device


def say(message: str) -> None:
    """One line to stderr, control characters escaped (a message may name a file or echo a server)."""
    print(printable(message), file=sys.stderr)


class ControlEscaping:
    """A text stream that escapes terminal control characters (escape sequences, bells) in everything written to
    it, keeping newlines, carriage returns (progress bars) and tabs: whatever a library prints, a file name or a
    server's words cannot drive the terminal."""

    KEEP = "\n\r\t"

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write("".join(c if c in self.KEEP or c.isprintable() else repr(c)[1:-1] for c in text))

    def __getattr__(self, name):
        return getattr(self._stream, name)


# ---------------------------------------------------------------------------------------------
# The steps: each parses its arguments, calls one library function and prints what it wrote.

def run_convert_edm(args) -> int:
    from ect.edm import convert_edm_pickle

    convert_edm_pickle(args.src, args.dst, sha256=args.sha256, log=say)
    return 0


def run_prepare_data(args) -> int:
    from ect.data import prepare_dataset, save_dataset

    images, labels = prepare_dataset(args.source, args.resolution, args.archive, args.expect_count,
                                     progress=not args.no_progress)
    digest = save_dataset(args.out, images, labels)
    say(f"wrote {len(images)} images {images.shape[1:]} to {args.out} (content sha256 {digest})")
    return 0


def run_fetch(args) -> int:
    from ect.download import fetch
    from ect.fileio import write_json_atomic

    def write_provenance(result: dict) -> None:  # before the record is updated: a failure here changes nothing
        if args.provenance:
            write_json_atomic(args.provenance, {"url": args.url, **result})

    result = fetch(args.url, args.out, md5=args.md5, sha256=args.sha256, record=args.record, size=args.size,
                   timeout=args.timeout, retries=args.retries, deadline_s=args.deadline, progress=not args.no_progress,
                   allow_unverified=args.unverified, max_bytes=args.max_bytes, before_recording=write_provenance)
    say(f"wrote {args.out} ({result['size']} bytes, sha256 {result['sha256']}, md5 {result['md5']}; "
        f"{result['verified']})")
    if result["verified"] == "unverified" or (result["verified"] == "pinned" and not args.sha256):
        say(f"note: no sha256 was given to verify {args.url}; this file's is {result['sha256']}: pin it in the config")
    return 0


def settings_of(args, step: str):
    """The settings a step may read (ect/spec.py: STEP_READS), from its --config files (and --size or --model)."""
    from ect.spec import load_spec, step_settings

    spec = load_spec(*args.config)
    wildcards = {"size": getattr(args, "size", None), "model": getattr(args, "model", None)}
    if wildcards["model"] is not None:
        models = spec.scaling.models if spec.scaling else {}
        if wildcards["model"] not in models:
            raise BadInput(f"--model {wildcards['model']!r} is not a run of the config's scaling study "
                           f"({', '.join(models) or 'no scaling section'})")
        wildcards["size"] = models[wildcards["model"]].size
    return step_settings(spec, step, wildcards)


def run_train(args) -> int:
    from ect.spec import training_options
    from ect.train import run_cli

    cfg = training_options(settings_of(args, args.command), args.command, size=getattr(args, "size", None),
                           model=getattr(args, "model", None))
    set_threads(args.threads)
    return run_cli(cfg, data_path=args.data, state_dir=args.state_dir, out_path=args.out,
                   init_path=getattr(args, "teacher", None), snapshot_dir=getattr(args, "snapshots", None),
                   emas_dir=getattr(args, "emas", None), log_path=args.log, progress=not args.no_progress)


def sample_flag_defaults() -> dict:
    """What `ect sample` draws without a config: the spec's sampling defaults, seeds 0-63, one step."""
    from ect.sample import LABEL_SAMPLING
    from ect.spec import Sample, field_default

    return {"seeds": "0-63", "sampler": "consistency", "steps": 1, "t_mid": list(field_default(Sample, "t_mid")),
            "heun_steps": field_default(Sample, "heun_steps"), "batch": field_default(Sample, "batch"),
            "class_labels": LABEL_SAMPLING[0]}


def sample_settings(args) -> dict:
    """The sampler settings: from the config's 'sample' section for a named set, else from the flags."""
    from ect.layout import SAMPLE_SETS
    from ect.sample import set_settings
    from ect.typed import ConfigError

    defaults = sample_flag_defaults()
    given = [k for k in defaults if getattr(args, k) is not None]
    if not args.config:
        return {k: v if getattr(args, k) is None else getattr(args, k) for k, v in defaults.items()}
    if not args.set:
        raise ConfigError("--config needs --set (one of " + ", ".join(SAMPLE_SETS) + ")")
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} cannot be combined with --config: the config sets it")
    return set_settings(settings_of(args, "sample"), args.set)


def run_sample(args) -> int:
    from ect.sample import sample_to_files

    settings = sample_settings(args)
    meta = sample_to_files(args.checkpoint, args.out, settings, grid=args.grid, set_name=args.set, dataset=args.dataset,
                           device=setup_device(args), progress=not args.no_progress)
    say(f"wrote samples of seeds {settings['seeds']} ({meta['nfe']} NFE) to {args.out}")
    return 0


def run_merge_samples(args) -> int:
    from ect.sample import merge_samples, save_samples

    images, seeds, meta, labels = merge_samples(args.inputs)
    save_samples(args.out, images, seeds, meta, labels)
    say(f"wrote {len(images)} samples to {args.out}")
    return 0


def run_feature_net(args) -> int:
    from ect.data import load_dataset
    from ect.metrics.digits import train_feature_net

    net = settings_of(args, "feature_net").fid.feature_net
    images, labels = load_dataset(args.data)
    set_threads(args.threads)
    meta = train_feature_net(images, labels, args.out, seed=net.seed, epochs=net.epochs)
    say(f"wrote {args.out}: held-out accuracy {meta['holdout_accuracy']:.4f}")
    return 0


def run_fid_stats(args) -> int:
    from ect.fid import reference_statistics

    meta = reference_statistics(args.data, args.feature_net, args.kind, args.sha256, args.modes, args.batch,
                                setup_device(args), args.out, progress=not args.no_progress, shard=args.shard,
                                dinov2=args.dinov2, dinov2_sha256=args.dinov2_sha256)
    what = f"shard {args.shard[0]} of {args.shard[1]} of" if args.shard else "reference statistics of"
    say(f"wrote {what} {meta['images']} images ({', '.join(meta['modes'])}) to {args.out}")
    return 0


def run_fid_stats_merge(args) -> int:
    from ect.fid import merge_reference_shards

    meta = merge_reference_shards(args.shards, args.out)
    say(f"merged {meta['shards']} shards: reference statistics of {meta['images']} images to {args.out}")
    return 0


def shard_spec(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N): shard I (from 0) of N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shard is I/N (e.g. 0/8), not {text[:40]!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {i}/{n}: need 0 <= I < N")
    return i, n


def run_fid(args) -> int:
    from ect.fid import score_samples
    from ect.fileio import write_json_atomic

    result = score_samples(settings_of(args, "fid"), args.samples, args.ref, feature_files(args), setup_device(args),
                           progress=not args.no_progress)
    write_json_atomic(args.out, result)
    say(f"FID ({result['mode']}) {result['fid_min']:.3f} (min of {result['sets']}), {result['fid_mean']:.3f} "
        f"(mean) -> {args.out}")
    return 0


def run_fid_curve(args) -> int:
    from ect.fid import curve_table, fid_curve
    from ect.fileio import write_json_atomic, write_text_atomic

    curve = fid_curve(settings_of(args, "fid_curve"), args.snapshots, args.ref, feature_files(args), setup_device(args),
                      progress=not args.no_progress, dataset=args.dataset)
    write_json_atomic(args.out, curve)
    if args.table:
        write_text_atomic(args.table, curve_table(curve))
    say(f"wrote the FID of {len(curve['points'])} snapshots to {args.out}")
    return 0


def run_reference_check(args) -> int:
    from ect.fid import compare_reference
    from ect.fileio import write_json_atomic

    result = compare_reference(args.ours, args.theirs, args.mode)
    write_json_atomic(args.out, result)
    verdict = "they match" if result["pass"] else f"WARNING: above {result['threshold']}, check the data and protocol"
    say(f"Frechet distance between {args.ours} and {args.theirs}: " + ", ".join(
        f"{metric} {d:.6f}" for metric, d in result["distances"].items()) + f" ({verdict})")
    return 0


def run_fid_snapshot(args) -> int:
    from ect.fid import fid_snapshot
    from ect.fileio import write_json_atomic

    result = fid_snapshot(settings_of(args, "fid_snapshot"), args.snapshots, args.kimg, args.ref, feature_files(args),
                          setup_device(args), dataset=args.dataset)
    write_json_atomic(args.out, result)
    say(f"scored the snapshot at {args.kimg:g} kimg ({result['sets']} sets of {result['samples']}) -> {args.out}")
    return 0


def run_fid_emas(args) -> int:
    from ect.fid import fid_emas
    from ect.fileio import write_json_atomic

    result = fid_emas(settings_of(args, "fid_emas"), args.emas, args.ref, feature_files(args), setup_device(args),
                      dataset=args.dataset)
    write_json_atomic(args.out, result)
    say(f"scored {len(result['points'])} EMAs ({result['sets']} sets of {result['samples']}); lowest: " + ", ".join(
        f"{k} {v['mean']:.3f} (sigma_rel {v['ema_std']:g})" for k, v in result["min"].items()) + f" -> {args.out}")
    return 0


def run_fid_budget(args) -> int:
    from ect.fid import fid_budget
    from ect.fileio import write_json_atomic

    result = fid_budget(settings_of(args, "fid_budget"), args.curve, args.snapshots, args.ref, feature_files(args),
                        setup_device(args), dataset=args.dataset)
    write_json_atomic(args.out, result)
    say(f"budget claim: {result['verdict']} ({result['text']}) -> {args.out}")
    return 0


def run_report(args) -> int:
    from ect.report import build_report

    say(f"wrote {build_report(settings_of(args, 'report'), list(args.config), args.out, args.claims)}")
    return 0


def run_scaling_point(args) -> int:
    from ect.fid import scaling_point
    from ect.fileio import write_json_atomic

    point = scaling_point(settings_of(args, "scaling_point"), args.snapshots, args.kimg, args.model, args.ref, feature_files(args),
                          setup_device(args), dataset=args.dataset)
    write_json_atomic(args.out, point)
    say(f"run {args.model} at {args.kimg:g} kimg: " + ", ".join(
        f"{k[4:]} FID {sum(v) / len(v):.3f}" for k, v in point.items() if k.startswith("fid_")) + f" -> {args.out}")
    return 0


def run_scaling_points(args) -> int:
    from ect.fid import read_scaling_point, scaling_table
    from ect.fileio import write_text_atomic

    points = [read_scaling_point(path) for path in args.points]
    write_text_atomic(args.out, scaling_table(points))
    say(f"wrote {len(points)} points to {args.out}")
    return 0


def run_scaling_fit(args) -> int:
    from ect.fileio import write_json_atomic
    from ect.scaling import fit_file

    result = fit_file(args.points, steps=args.steps, size=args.size, use_frontier=args.frontier, axis=args.axis,
                      design=args.design, budget_kimg=args.budget_kimg)
    write_json_atomic(args.out, result)
    if result.get("fitted") is False:
        say(f"no law: {result['reason']} (recorded in {args.out}; the report says so)")
        return 0
    x = "params" if args.axis == "size" else "compute"
    interval = "{:.4f}..{:.4f}".format(*result["exponent_ci95"]) if result["exponent_ci95"] else "none"
    say(f"fid = {result['coefficient']:.4g} * {x}^-{result['exponent']:.4f} (95% interval {interval}, "
        f"r2 {result['r2']:.3f}, {result['n_points']} points; held-out error {result['holdout']['rel_error']:+.1%}); "
        f"preferred: {result['preferred']}; the data support {result['supports']} -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# The command table.

@dataclass(frozen=True)
class Step:
    name: str
    summary: str  # one line, in `ect --help`
    description: str  # `ect <step> --help`
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    inputs: tuple = ()  # the arguments that name files it reads
    outputs: tuple = ()  # the arguments that name files it writes: all or none of them, never over an input
    updates: tuple = ()  # files it reads and rewrites in place, last and atomically: never an input or output


def _convert_edm_args(p):
    p.add_argument("src", help="EDM .pkl file")
    p.add_argument("dst", help="output checkpoint (.pt)")
    p.add_argument("--sha256", help="expected sha256 of SRC; a mismatch is an error and nothing is written")


def _prepare_data_args(p):
    from ect.data import SOURCES

    p.add_argument("--source", required=True, choices=SOURCES, help="which dataset (config: dataset.source)")
    p.add_argument("--resolution", required=True, type=positive_int,
                   help="image size in pixels (config: dataset.resolution)")
    p.add_argument("--archive", help="the source: cifar10, cifar-10-python.tar.gz from 'ect fetch'; imagenet, the "
                                     "ILSVRC2012 training folder (or its tar) or EDM2's prepared dataset zip")
    p.add_argument("--expect-count", type=positive_int,
                   help="imagenet: refuse a source with any other number of images (config: dataset.expected_count)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fetch_args(p):
    from ect.download import DEADLINE_S, MAX_BYTES, RECORD_FILE

    p.add_argument("url", help="http(s) URL (the preset's dataset.url, teacher.url or fid.feature_net.url)")
    p.add_argument("--out", required=True)
    p.add_argument("--md5", help="expected md5 (32 hex digits)")
    p.add_argument("--sha256", help="expected sha256 (64 hex digits)")
    p.add_argument("--record", metavar="FILE",
                   help=f"with no --md5/--sha256: trust on first use. Verify against the URL's entry in FILE (the "
                        f"pipeline's is {RECORD_FILE}), or, the first time, record the file's sha256 there to commit")
    p.add_argument("--size", type=non_negative_int, help="expected size in bytes (config: size)")
    p.add_argument("--provenance", metavar="JSON",
                   help="also write how the file was fetched and verified (url, size, digests, how) to this file")
    p.add_argument("--max-bytes", type=positive_int, default=MAX_BYTES,
                   help=f"refuse a file larger than this (default {MAX_BYTES})")
    p.add_argument("--unverified", action="store_true",
                   help="download without any checksum (by hand; prints the sha256 to pin; the pipeline never passes it)")
    p.add_argument("--timeout", type=positive_seconds, default=60.0, help="seconds a read may stall before a retry (default 60)")
    p.add_argument("--retries", type=non_negative_int, default=3)
    p.add_argument("--deadline", type=positive_seconds, default=DEADLINE_S,
                   help=f"seconds the whole fetch may take, resumes included (default {DEADLINE_S:g}); a fetch past it "
                        "stops and keeps its partial file for the next call")
    p.add_argument("--no-progress", action="store_true")


def _sample_args(p):
    from ect.layout import SAMPLE_SETS
    from ect.sample import LABEL_SAMPLING

    default = sample_flag_defaults()
    p.add_argument("--checkpoint", required=True, help="our checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output .npz (images uint8 NHWC, seeds, meta)")
    p.add_argument("--grid", help="also write a PNG grid of the first 64 images")
    config_arg(p, required=False)
    p.add_argument("--set", choices=list(SAMPLE_SETS), help="which of the pipeline's sample sets (with --config)")
    p.add_argument("--seeds", help=f"seed list, e.g. '0-49999' or '0-99,200-299' (default {default['seeds']})")
    p.add_argument("--sampler", choices=["consistency", "heun"], help=f"default {default['sampler']}")
    p.add_argument("--steps", type=positive_int, help=f"consistency steps (default {default['steps']})")
    p.add_argument("--t-mid", type=float, nargs="+", help="intermediate times in (0, 80) for multi-step sampling "
                                                          f"(default {' '.join(map(str, default['t_mid']))})")
    p.add_argument("--heun-steps", type=positive_int, help=f"Heun steps, at least 2 (default {default['heun_steps']} "
                                                           f"-> {2 * default['heun_steps'] - 1} evaluations)")
    p.add_argument("--batch", type=positive_int, help=f"default {default['batch']}")
    p.add_argument("--class-labels", choices=list(LABEL_SAMPLING),
                   help="class-conditional models: each seed's class drawn with the training set's class "
                        f"frequencies ({LABEL_SAMPLING[0]}, the default; needs --dataset) or uniformly")
    dataset_arg(p)
    device_args(p)


def dataset_arg(p):
    p.add_argument("--dataset", help="the training dataset (.npz): class-conditional models draw their labels "
                                     "from its class frequencies; ignored for unconditional ones")


def _merge_samples_args(p):
    p.add_argument("out")
    p.add_argument("inputs", nargs="+")


def _feature_net_args(p):
    config_arg(p)
    p.add_argument("--data", required=True, help="dataset .npz")
    p.add_argument("--out", required=True, help="TorchScript file to write")
    threads_arg(p)


def feature_files(args):
    """The feature networks a scoring step was given."""
    from ect.fid import FeatureFiles

    return FeatureFiles(args.feature_net, args.dinov2)


def _fid_stats_args(p):
    from ect.metrics import FID_MODES as MODES

    p.add_argument("--data", required=True, help="dataset .npz")
    p.add_argument("--out", required=True, help="statistics .npz (mu_<mode>, sigma_<mode>, meta)")
    feature_args(p, scoring=False)
    p.add_argument("--kind", required=True, choices=["digits-classifier", "inception"],
                   help="the feature network (config: fid.feature_net.kind)")
    p.add_argument("--sha256", help="expected sha256 of --feature-net (config: fid.feature_net.sha256)")
    p.add_argument("--dinov2-sha256", help="expected sha256 of --dinov2 (config: fid.dinov2.sha256)")
    p.add_argument("--modes", required=True, nargs="+", choices=list(MODES), metavar="MODE",
                   help=f"clean-fid modes, {' or '.join(MODES)} (config: fid.modes)")
    p.add_argument("--batch", type=positive_int, default=250, help="images per forward pass (default 250)")
    p.add_argument("--shard", type=shard_spec, metavar="I/N",
                   help="only the I-th of N slices of the dataset (from 0): writes feature moments for "
                        "'ect fid-stats-merge' instead of statistics")
    device_args(p)


def _fid_stats_merge_args(p):
    p.add_argument("shards", nargs="+", help="the moments of shards 0..N-1 from 'ect fid-stats --shard'")
    p.add_argument("--out", required=True, help="statistics .npz, as 'ect fid-stats' writes it")


def _fid_args(p):
    config_arg(p)
    p.add_argument("--samples", required=True, help="samples .npz from 'ect sample'")
    feature_args(p)
    device_args(p)


def _fid_curve_args(p):
    config_arg(p)
    p.add_argument("--snapshots", required=True, help="directory of snapshot checkpoints (*.pt)")
    feature_args(p)
    p.add_argument("--table", help="also the curve as CSV (a row per snapshot: kimg, elapsed_s, device_hours, "
                                   "flops, FIDs), for DVC plots")
    dataset_arg(p)
    device_args(p)


def _reference_check_args(p):
    from ect.metrics import FID_MODES as MODES

    p.add_argument("--ours", required=True, help="our reference statistics (from 'ect fid-stats')")
    p.add_argument("--theirs", required=True, help="the published statistics (EDM's .npz with mu and sigma)")
    p.add_argument("--mode", required=True, choices=list(MODES), help="which of ours to compare (config: fid.modes[0])")
    p.add_argument("--out", required=True, help="the comparison, as JSON")


def _fid_snapshot_args(p):
    config_arg(p)
    p.add_argument("--snapshots", required=True, help="the tuning run's snapshots (a directory of *.pt)")
    p.add_argument("--kimg", required=True, type=float, help="the budget: the snapshot after this many kimg")
    feature_args(p)
    dataset_arg(p)
    device_args(p)


def _fid_emas_args(p):
    config_arg(p)
    p.add_argument("--emas", required=True, help="the tuning run's EMAs at its end (a directory of *.pt, tune --emas)")
    feature_args(p)
    dataset_arg(p)
    device_args(p)


def _fid_budget_args(p):
    config_arg(p)
    p.add_argument("--curve", required=True, help="the FID curve (.json) from 'ect fid-curve'")
    p.add_argument("--snapshots", required=True, help="the tuning run's snapshots (a directory of *.pt)")
    feature_args(p)
    dataset_arg(p)
    device_args(p)


def _report_args(p):
    config_arg(p)
    p.add_argument("--out", required=True,
                   help="the report's directory, e.g. reports/<run> (its page is index.html); replaced as a whole, "
                        "and only if it is a report directory")
    p.add_argument("--claims", help="also every verdict against the paper as JSON (results/<run>/claims.json)")


def _scaling_point_args(p):
    config_arg(p)
    p.add_argument("--snapshots", required=True, help="the size's tuning snapshots (a directory of *.pt)")
    p.add_argument("--model", required=True, help="the run's name (scaling.models: a size, <size>-seed<k>, "
                                                   "<size>-batch<b>)")
    p.add_argument("--kimg", required=True, type=float, help="the budget point: the snapshot at this many kimg")
    feature_args(p)
    dataset_arg(p)
    device_args(p)


def _scaling_points_args(p):
    p.add_argument("out", help="the points as CSV (compute, fid, size, steps, set, kimg)")
    p.add_argument("points", nargs="+", help="point JSONs from 'ect scaling-point'")


def _scaling_fit_args(p):
    p.add_argument("points", help="CSV with columns compute, fid (optional: size, steps, set, kimg, run, design, "
                                  "params, flops_per_iteration, metric; a row per FID set)")
    p.add_argument("--out", required=True, help="the fit, as JSON")
    p.add_argument("--steps", help="only the rows of this step count")
    p.add_argument("--size", help="only the rows of this model size")
    p.add_argument("--design", choices=("prefix", "batch"), help="only the points of this design")
    p.add_argument("--frontier", action="store_true",
                   help="fit the compute frontier: the points no cheaper point (of any size) beats")
    p.add_argument("--axis", choices=("compute", "size"), default="compute",
                   help="compute: the metric against tuning FLOPs; size: against parameters (and FLOPs per "
                        "iteration) at one budget")
    p.add_argument("--budget-kimg", type=float,
                   help="the size axis's budget (default: the largest every size reaches)")


RESUME_HELP = (" Resumable: rerun the same command to continue. Exit 75 when stopped by SIGTERM/SIGUSR1 after "
               "saving state, 1 when the loss diverges (the last good state is kept).")

STEPS = [
    Step("convert-edm", "EDM/ECT .pkl snapshot -> our checkpoint, executing nothing from it",
         "Read an EDM (or ECT) training snapshot with a restricted unpickler (an allow-list of globals; the embedded "
         "source is never executed, tensors are rebuilt from checked sizes and bytes only), verify its sha256 first "
         "when given, check the architecture and every weight's shape, and write the 'ema' network as our checkpoint "
         "(torch.load weights_only).", _convert_edm_args, run_convert_edm,
         inputs=('src',), outputs=('dst',)),
    Step("prepare-data", "write a dataset in our format (uint8 NHWC .npz + content hash)",
         "Write a dataset in our on-disk format. 'digits': scikit-learn's bundled 8x8 handwritten digits (real images, "
         "no download) upsampled by pixel replication to --resolution. 'cifar10': the 50,000 training images of the "
         "official python tarball (--archive), in EDM's order, at 32x32. 'imagenet': a local ILSVRC2012 training set "
         "(--archive: the folder of synset folders, its tar, or EDM2's prepared zip), brought to --resolution with "
         "EDM2's center-crop-dhariwal transform, labelled by sorted synset. The content hash covers the pixels and "
         "labels only, not the archive's timestamps.", _prepare_data_args, run_prepare_data,
         inputs=('archive',), outputs=('out',)),
    Step("fetch", "download a file, checksum-verified and resumable",
         "Download an http(s) URL to --out and verify it before renaming it into place: against --md5/--sha256, or "
         "trust on first use with --record (the first fetch records the sha256, every later one is verified "
         "against it). Resumes (HTTP Range) after a dropped or stalled connection; a full disk, a mismatch or a "
         "file over its size limit leaves no output. Run on a machine with internet (a login node); 'snakemake "
         "prefetch' runs every download of a preset.", _fetch_args, run_fetch,
         inputs=(), outputs=('out', 'provenance'), updates=('record',)),
    Step("pretrain", "train a small EDM teacher with EDM's loss (toy presets)",
         "Train an EDM-preconditioned network from scratch with EDM's denoising loss. Options come from the config's "
         "'pretrain' section." + RESUME_HELP, lambda p: train_args(p, with_teacher=False), run_train,
         inputs=('config', 'data'), outputs=('out', 'log')),
    Step("tune", "ECT: tune a teacher into a consistency model",
         "Easy Consistency Tuning from a teacher checkpoint. Options come from the config's 'tune' section. Runs under "
         "torchrun for DDP (global batch fixed)." + RESUME_HELP, lambda p: train_args(p, with_teacher=True),
         run_train,
         inputs=('config', 'data', 'teacher'), outputs=('out', 'snapshots', 'emas', 'log')),
    Step("sample", "generate images (consistency 1/2-step, or the teacher's Heun sampler)",
         "Generate images; image i uses a generator seeded with i, so any seed subset is reproducible and jobs can be "
         "split and merged. Writes uint8 NHWC .npz (+ PNG grid). With --config and --set, the sampler settings come "
         "from the config's 'sample' section (the pipeline's way); otherwise from the flags. Non-finite network "
         "outputs are an error, not black images.", _sample_args, run_sample,
         inputs=('config', 'checkpoint', 'dataset'), outputs=('out', 'grid')),
    Step("merge-samples", "merge sample files from split jobs (ordered by seed)",
         "Concatenate .npz sample files of the same model and sampler; seeds must not overlap.",
         _merge_samples_args, run_merge_samples,
         inputs=('inputs',), outputs=('out',)),
    Step("feature-net", "train the toy FID feature network (a digits classifier, fixed seed)",
         "Train a small CNN classifier on the dataset (80%% train, 20%% held out; seed and epochs from the config's "
         "fid.feature_net) and save its 64-d penultimate features as TorchScript with the Inception interface: float "
         "images (N, 3, H, W) in [0, 255] -> (N, 64).", _feature_net_args, run_feature_net,
         inputs=('config', 'data'), outputs=('out',)),
    Step("fid-stats", "reference FID statistics (mean, covariance) of a dataset",
         "Features of every image of the dataset in each --modes, then their mean and covariance (float64), in one "
         ".npz. Takes the feature network's settings rather than a config, so that presets sharing a dataset share "
         "its statistics. Features are accumulated as float64 moments a batch at a time; --shard computes one slice's "
         "moments so that a large dataset splits across jobs.", _fid_stats_args, run_fid_stats,
         inputs=('data', 'feature_net', 'dinov2'), outputs=('out',)),
    Step("fid-stats-merge", "merge the shards of 'fid-stats --shard' into reference statistics",
         "Add up the feature moments of shards 0..N-1 of one dataset and feature network (each exactly once; "
         "anything else is refused) and write the mean and unbiased covariance.", _fid_stats_merge_args,
         run_fid_stats_merge,
         inputs=('shards',), outputs=('out',)),
    Step("fid", "FID of a sample file against reference statistics (min and mean over sets)",
         "Split the samples (ordered by seed) into the config's sample.sets equal sets, compute the FID of each "
         "against the reference in every fid.modes, and write min, mean and every value as JSON (the first mode is "
         "the headline). The samples must match the reference's resolution.", _fid_args, run_fid,
         inputs=('config', 'samples', 'ref', 'feature_net', 'dinov2'), outputs=('out',)),
    Step("fid-curve", "FID of every training snapshot (FID against training budget)",
         "Sample every snapshot in a directory with the consistency sampler (fid.curve_steps steps, seeds "
         "0..fid.curve_samples-1) and score it against the reference; one JSON with a point per snapshot.",
         _fid_curve_args, run_fid_curve,
         inputs=('config', 'snapshots', 'ref', 'feature_net', 'dinov2', 'dataset'), outputs=('out', 'table')),
    Step("reference-check", "compare our reference statistics with the published ones (Frechet distance)",
         "The Frechet distance between our reference statistics of the dataset and those its authors published "
         "(EDM's fid-refs): below 0.01 our data and preprocessing match theirs; above, the report shows a warning. "
         "Runs before any sample is drawn.", _reference_check_args, run_reference_check,
         inputs=('ours', 'theirs'), outputs=('out',)),
    Step("fid-snapshot", "FID of a tuning snapshot with the full protocol (a budget the paper publishes a number at)",
         "Score the snapshot at --kimg as the final model is scored: sample.sets sets of sample.samples_per_set at "
         "each of fid.curve_steps consistency steps, against the reference; with its cost from its meta.",
         _fid_snapshot_args, run_fid_snapshot,
         inputs=('config', 'snapshots', 'ref', 'feature_net', 'dinov2', 'dataset'), outputs=('out',)),
    Step("fid-emas", "FID of every EMA a run saved at its end (classic and power-function), full protocol",
         "Score each EMA of --emas as the final model is scored (sample.sets sets of sample.samples_per_set at each "
         "of fid.curve_steps steps, FD_DINOv2 too when the run scores it), as EDM2 scores each EMA length; the "
         "minimum of each metric and which EMA is the run's output (tune.output_ema_std).",
         _fid_emas_args, run_fid_emas,
         inputs=('config', 'emas', 'ref', 'feature_net', 'dinov2', 'dataset'), outputs=('out',)),
    Step("fid-budget", "judge a compute-budget claim (FID F within H GPU-hours) from the tuning snapshots",
         "Read the FID curve, score the snapshots near the crossing of report.paper.budget.fid and the best within "
         "its GPU-hours with the full protocol, and write time-to-FID, the best FID within the budget and the verdict "
         "(reproduced, short, or unjudged on another device than the one the claim names).", _fid_budget_args,
         run_fid_budget,
         inputs=('config', 'curve', 'snapshots', 'ref', 'feature_net', 'dinov2', 'dataset'), outputs=('out',)),
    Step("scaling-point", "one point of a scaling study: FID sets of a size's snapshot at a budget",
         "Score the snapshot of a size's tuning run at --kimg: scaling.sets sets of scaling.samples samples at each "
         "of fid.curve_steps consistency steps, against the reference; with the snapshot's cost (tuning FLOPs, "
         "device-hours) from its meta.", _scaling_point_args, run_scaling_point,
         inputs=('config', 'snapshots', 'ref', 'feature_net', 'dinov2', 'dataset'), outputs=('out',)),
    Step("scaling-points", "gather scaling points into the CSV that scaling-fit reads",
         "One row per FID set: compute (the snapshot's tuning FLOPs, the teacher's pretraining not counted), fid, "
         "size, steps, set, kimg.", _scaling_points_args, run_scaling_points,
         inputs=('points',), outputs=('out',)),
    Step("scaling-fit", "fit power laws (pure and with a floor) of FID and FD_DINOv2 to scaling points",
         "Fit fid = coefficient * x^-exponent (least squares in log-log space) and fid = coefficient * x^-exponent + "
         "floor ('saturating'), x being tuning FLOPs (--axis compute) or parameters and FLOPs per iteration at one "
         "budget (--axis size). Each form gets a 95%% bootstrap interval of its exponent (redrawing the runs and FID "
         "sets of every point, the frontier reselected each time) and a held-out check (fit without the largest-x "
         "point, predict it); 'preferred' is the form with the smaller held-out error, 'supports' says what the "
         "data support. FD_DINOv2 rows are fitted alike under the key fd_dinov2. Non-positive or non-finite "
         "values, fewer than 3 points or a missing column are errors.", _scaling_fit_args, run_scaling_fit,
         inputs=('points',), outputs=('out',)),
    Step("report", "the run's HTML report (FID table, grids, curves, protocol, provenance)",
         "Render the report of one run with Jinja2 from the run's files (their paths come from the config's run "
         "layout). The page and its images go to --out, a directory that is replaced as a whole, and only if it is "
         "missing, empty or an earlier report; everything is local, so it reads offline.", _report_args, run_report,
         inputs=('config',), outputs=('out', 'claims')),
]


class Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported in one line (exit 2) like every other error."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ect", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<step>", parser_class=Parser)
    for step in STEPS:
        p = sub.add_parser(step.name, help=step.summary, description=step.description)
        step.arguments(p)
        p.set_defaults(func=step.run, step=step)
    return parser


def help_markdown() -> str:
    """docs/cli.md: `ect --help` and every step's `--help` (`make docs` writes it; a test keeps it true)."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "102"  # argparse wraps to the terminal: fix the width for a stable page
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = ["# `ect` command reference\n\nGenerated from `ect --help` by `make docs`; do not edit.\n",
                 f"```\n{parser.format_help()}```\n"]
        parts += [f"## `ect {step.name}`\n\n```\n{sub.choices[step.name].format_help()}```\n" for step in STEPS]
        return "\n".join(parts)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


# ---------------------------------------------------------------------------------------------

def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent process dies (say, a snakemake killed with SIGKILL), so that no
    step outlives it; a trainer then saves its state and exits. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv=None) -> int:
    """Run a step. Bad input (a BadInput, or an OSError naming its file): one line, exit 2. CUDA out of memory:
    one line naming batch_gpu, exit 1. Anything else is a bug: its traceback, exit 1."""
    from ect.fileio import StepOutputs

    if argv is None:  # the `ect` program itself, not a call from Python
        sys.stdout, sys.stderr = ControlEscaping(sys.stdout), ControlEscaping(sys.stderr)
    args = build_parser().parse_args(argv)
    if argv is None:
        die_with_parent()
    outputs = None
    try:
        outputs = StepOutputs(_paths(args, args.step.inputs), _paths(args, args.step.outputs),
                              _paths(args, args.step.updates))
        code = args.func(args)
    except (BadInput, OSError) as exc:
        say(f"error: {describe(exc)}")
        code = 2
    except MemoryError as exc:
        say(f"error: out of memory{': ' + describe(exc) if str(exc) else ''}")
        code = 1
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    except Exception as exc:
        if outputs is not None:
            outputs.remove_started()
        if type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch"):
            say("error: CUDA out of memory: lower the per-GPU micro-batch (tune.batch_gpu, or sample.batch for "
                "sampling and scoring); gradients accumulate, so the results do not change")
            return 1
        raise
    if code != 0 and outputs is not None:
        outputs.remove_started()
    return code


def _paths(args, names) -> list:
    """The paths a step's arguments name (a list argument gives several)."""
    out = []
    for name in names:
        value = getattr(args, name, None)
        out += [str(v) for v in value] if isinstance(value, list) else [] if value is None else [str(value)]
    return out


def describe(exc: BaseException) -> str:
    """One line, with no terminal control characters: the message of an expected error (an OSError names its
    file)."""

    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return printable(f"{exc.filename}: {exc.strerror}")
    if isinstance(exc, OSError) and exc.strerror:
        return printable(exc.strerror)
    return printable(str(exc).strip() or type(exc).__name__)


if __name__ == "__main__":
    sys.exit(main())
