"""``ect <step>``: one command per pipeline step, each with explicit inputs, outputs and config.

Exit status 0 only when the step's outputs were written completely.
"""
from __future__ import annotations

import argparse
import pickle
import sys

import torch

from ect.fid import MODES as FID_MODES
from ect.sample import SAMPLE_SETS as SAMPLE_SET_NAMES

EPILOG = "Run 'ect <step> --help' for the options of one step."


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_convert_edm(args) -> int:
    from ect.edm import convert_edm_pickle
    convert_edm_pickle(args.src, args.dst, sha256=args.sha256)
    return 0


def cmd_train(args) -> int:
    from ect.config import load_config, section
    from ect.train import TrainConfig, run_cli
    cfg = TrainConfig.from_dict({**section(load_config(*args.config), args.section or args.command),
                                 "objective": args.objective})
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_cli(cfg, data_path=args.data, state_dir=args.state_dir, out_path=args.out,
                   init_path=getattr(args, "teacher", None), snapshot_dir=getattr(args, "snapshots", None),
                   log_path=args.log, progress=not args.no_progress)


def cmd_sample(args) -> int:
    from ect.checkpoint import load_network
    from ect.fileio import sha256_file
    from ect.sample import generate, nfe, parse_seeds, save_grid, save_samples
    _sample_settings(args)
    seeds = parse_seeds(args.seeds)
    device = _setup(args)
    net = load_network(args.checkpoint, device=device)
    images = generate(net, seeds, sampler=args.sampler, steps=args.steps, t_mids=args.t_mid,
                      heun_steps=args.heun_steps, batch=args.batch, device=device, progress=not args.no_progress)
    meta = {"checkpoint_sha256": sha256_file(args.checkpoint), "sampler": args.sampler,
            "steps": args.steps if args.sampler == "consistency" else args.heun_steps,
            "nfe": nfe(args.sampler, args.steps, args.heun_steps),
            "t_mid": list(args.t_mid[: args.steps - 1]) if args.sampler == "consistency" else []}
    if args.set:
        meta["set"] = args.set
    save_samples(args.out, images, seeds, meta)
    if args.grid:
        save_grid(args.grid, images)
    print(f"wrote {len(images)} samples ({meta['nfe']} NFE) to {args.out}", file=sys.stderr)
    return 0


SAMPLE_FLAGS = {"seeds": "0-63", "sampler": "consistency", "steps": 1, "t_mid": [0.821], "heun_steps": 18, "batch": 256}


def _sample_settings(args) -> None:
    """Fill the sampler settings: from the config's 'sample' section for a named set, else from flags."""
    given = [k for k in SAMPLE_FLAGS if getattr(args, k) is not None]
    if args.config:
        from ect.config import ConfigError, load_config
        from ect.sample import SAMPLE_SETS
        if not args.set:
            raise ConfigError("--config needs --set (one of " + ", ".join(SAMPLE_SETS) + ")")
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} cannot be combined with --config: the config sets it")
        cfg = load_config(*args.config)["sample"]
        _, sampler, steps = SAMPLE_SETS[args.set]
        settings = {"seeds": f"0-{cfg['sets'] * cfg['samples_per_set'] - 1}", "sampler": sampler,
                    "steps": max(steps, 1), "t_mid": cfg["t_mid"], "heun_steps": cfg["heun_steps"], "batch": cfg["batch"]}
    else:
        settings = SAMPLE_FLAGS
    for key, value in settings.items():
        if getattr(args, key) is None or args.config:
            setattr(args, key, value)


def cmd_merge_samples(args) -> int:
    from ect.sample import merge_samples, save_samples
    images, seeds, meta = merge_samples(args.inputs)
    save_samples(args.out, images, seeds, meta)
    return 0


def cmd_prepare_data(args) -> int:
    from ect.data import DatasetError, save_dataset
    if args.source == "digits":
        from ect.data.digits import digits_images
        images, labels = digits_images(args.resolution)
    else:
        from ect.data.cifar10 import read_cifar10_train
        if args.resolution != 32:
            raise DatasetError(f"cifar10 is 32x32; --resolution {args.resolution} is not supported")
        if not args.archive:
            raise DatasetError("dataset source 'cifar10' needs --archive (the downloaded cifar-10-python.tar.gz)")
        images, labels = read_cifar10_train(args.archive)
    digest = save_dataset(args.out, images, labels)
    print(f"wrote {len(images)} images {images.shape[1:]} to {args.out} (content sha256 {digest})", file=sys.stderr)
    return 0


def cmd_fetch(args) -> int:
    from ect.download import download
    digests = download(args.url, args.out, md5=args.md5, sha256=args.sha256, timeout=args.timeout,
                       retries=args.retries, progress=not args.no_progress, allow_unverified=args.unverified)
    print(f"wrote {args.out} (sha256 {digests['sha256']}, md5 {digests['md5']})", file=sys.stderr)
    if not args.sha256:
        print(f"note: no sha256 was given to verify {args.url}; this file's is {digests['sha256']}: pin it in the "
              "config", file=sys.stderr)
    return 0


def cmd_feature_net(args) -> int:
    from ect.data import load_dataset
    from ect.feature_net import train_feature_net
    from ect.config import load_config
    cfg = load_config(*args.config)["fid"]["feature_net"]
    images, labels = load_dataset(args.data)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = train_feature_net(images, labels, args.out, seed=cfg.get("seed", 0), epochs=cfg.get("epochs", 15))
    print(f"wrote {args.out}: held-out accuracy {meta['holdout_accuracy']:.4f}", file=sys.stderr)
    return 0


def _extractors(kind: str, sha256, modes, path, device) -> dict:
    """One feature extractor per FID mode (the first mode is the headline number)."""
    from ect.fid import FeatureExtractor
    return {mode: FeatureExtractor(path, kind, mode, sha256, device) for mode in modes}


def cmd_fid_stats(args) -> int:
    from ect.data import load_dataset
    from ect.fid import compute_features, save_stats, statistics
    images, _ = load_dataset(args.data)
    device = _setup(args)
    extractors = _extractors(args.kind, args.sha256, args.modes, args.feature_net, device)
    stats = {mode: statistics(compute_features(images, ex, args.batch, progress=not args.no_progress))
             for mode, ex in extractors.items()}
    digest = next(iter(extractors.values())).sha256
    save_stats(args.out, stats, {"source": str(args.data), "images": len(images),
                                 "dataset_sha256": _dataset_digest(args.data), "feature_net_sha256": digest,
                                 "feature_dim": int(next(iter(stats.values()))[0].shape[0])})
    print(f"wrote reference statistics of {len(images)} images ({', '.join(stats)}) to {args.out}", file=sys.stderr)
    return 0


def _setup(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return _device(args.device)


def _dataset_digest(path) -> str:
    import numpy as np
    with np.load(path, allow_pickle=False) as f:
        return str(f["content_sha256"])


def _scoring_setup(args, cfg, device, modes=None):
    """The reference statistics and the matching extractors; refuse a pair that does not belong together."""
    from ect.fid import FIDError, load_stats
    ref, ref_meta = load_stats(args.ref)
    net = cfg["fid"]["feature_net"]
    extractors = _extractors(net["kind"], net.get("sha256"), modes or cfg["fid"]["modes"], args.feature_net, device)
    digest = next(iter(extractors.values())).sha256
    if ref_meta.get("feature_net_sha256") != digest:
        raise FIDError(f"reference statistics {args.ref} were computed with another feature network "
                       f"({ref_meta.get('feature_net_sha256')}) than {args.feature_net} ({digest})")
    missing = [m for m in extractors if m not in ref]
    if missing:
        raise FIDError(f"reference statistics {args.ref} have no {missing} statistics; rerun fid-stats")
    return ref, ref_meta, extractors, digest


def cmd_fid(args) -> int:
    import json
    from ect.config import load_config
    from ect.fid import compute_features, fid_of_sets
    from ect.fileio import sha256_file, write_text_atomic
    from ect.sample import load_samples
    cfg = load_config(*args.config)
    device = _setup(args)
    sets = cfg["sample"]["sets"]
    images, seeds, sample_meta = load_samples(args.samples)
    ref, ref_meta, extractors, digest = _scoring_setup(args, cfg, device)
    modes = {}
    for mode, ex in extractors.items():
        fids = fid_of_sets(compute_features(images, ex, cfg["sample"]["batch"], progress=not args.no_progress),
                           *ref[mode], sets)
        modes[mode] = {"fid_min": min(fids), "fid_mean": sum(fids) / len(fids), "fid_sets": fids}
    headline = cfg["fid"]["modes"][0]
    result = {**modes[headline], "mode": headline, "modes": modes, "sets": sets,
              "samples_per_set": len(images) // sets, "seeds": [int(seeds[0]), int(seeds[-1])],
              "samples_sha256": sha256_file(args.samples), "feature_net_sha256": digest, "reference": ref_meta,
              **{k: sample_meta[k] for k in ("set", "sampler", "steps", "nfe", "t_mid", "checkpoint_sha256")
                 if k in sample_meta}}
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"FID ({headline}) {result['fid_min']:.3f} (min of {sets}), {result['fid_mean']:.3f} (mean) -> {args.out}",
          file=sys.stderr)
    return 0


def cmd_fid_curve(args) -> int:
    import json
    from pathlib import Path
    from ect.checkpoint import load_network, read_checkpoint
    from ect.config import load_config
    from ect.fid import FIDError, compute_features, fid_of_sets
    from ect.fileio import write_text_atomic
    from ect.sample import generate
    from tqdm import tqdm
    cfg = load_config(*args.config)
    device = _setup(args)
    mode = cfg["fid"]["modes"][0]
    ref, _, extractors, digest = _scoring_setup(args, cfg, device, modes=[mode])
    snapshots = sorted(Path(args.snapshots).glob("*.pt"))
    if not snapshots:
        raise FIDError(f"no snapshots (*.pt) in {args.snapshots}")
    seeds = list(range(cfg["fid"]["curve_samples"]))
    points = []
    for path in tqdm(snapshots, desc="snapshots", disable=args.no_progress):
        net = load_network(path, device=device)
        point = {"snapshot": path.name, "kimg": read_checkpoint(path)["meta"].get("kimg")}
        for steps in cfg["fid"]["curve_steps"]:
            images = generate(net, seeds, steps=steps, t_mids=cfg["sample"]["t_mid"], batch=cfg["sample"]["batch"],
                              device=device, progress=False)
            feats = compute_features(images, extractors[mode], cfg["sample"]["batch"])
            point[f"fid_{steps}step"] = fid_of_sets(feats, *ref[mode], 1)[0]
        points.append(point)
        print(json.dumps(point), file=sys.stderr, flush=True)
    write_text_atomic(args.out, json.dumps({"samples": len(seeds), "mode": mode, "feature_net_sha256": digest,
                                            "points": points}, indent=1) + "\n")
    return 0


def cmd_report(args) -> int:
    from ect.config import load_config
    from ect.report import build_report
    out = build_report(load_config(*args.config), list(args.config), args.results, args.data, args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _train_args(p: argparse.ArgumentParser, with_teacher: bool) -> None:
    config_arg(p)
    p.add_argument("--section", help="config section to read (default: 'tune' or 'pretrain')")
    p.add_argument("--data", required=True, help="dataset .npz written by 'ect' (uint8 images + labels)")
    if with_teacher:
        p.add_argument("--teacher", required=True, help="initial checkpoint (teacher.pt from convert-edm or pretrain)")
        p.add_argument("--snapshots", help="directory that receives the EMA snapshots at the end")
    p.add_argument("--state-dir", required=True,
                   help="resumable state (weights, EMA, optimiser, step, RNG); rerunning the command resumes from it")
    p.add_argument("--out", required=True, help="final EMA weights, our checkpoint format")
    p.add_argument("--train-log", dest="log", help="copy of the per-tick JSON-lines log, written at the end")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


TRAIN_STEPS = [  # (command = config section, objective, one-line help, description)
    ("pretrain", "edm", "train a small EDM teacher with EDM's loss (toy presets)",
     "Train an EDM-preconditioned network from scratch with EDM's denoising loss. Options come from the "
     "config's 'pretrain' section."),
    ("tune", "ect", "ECT: tune a teacher into a consistency model",
     "Easy Consistency Tuning from a teacher checkpoint. Options come from the config's 'tune' section. Runs "
     "under torchrun for DDP (global batch fixed)."),
]
RESUME_HELP = (" Resumable: rerun the same command to continue. Exit 75 when stopped by SIGTERM/SIGUSR1 after "
               "saving state, 1 when the loss diverges (the last good state is kept).")


def config_arg(p, required=True) -> None:
    p.add_argument("--config", nargs="+", required=required, metavar="YAML",
                   help="preset, then overlays, merged in order and validated (e.g. config/config.yaml)")


def device_args(p) -> None:
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ect", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<step>")

    p = sub.add_parser("convert-edm", help="EDM/ECT .pkl snapshot -> our checkpoint, executing nothing from it",
                       description="Read an EDM (or ECT) training snapshot with a restricted unpickler (an allow-list "
                                   "of globals; the embedded source is never executed), verify its sha256 first when "
                                   "given, and write the 'ema' network as our checkpoint (torch.load weights_only).")
    p.add_argument("src", help="EDM .pkl file")
    p.add_argument("dst", help="output checkpoint (.pt)")
    p.add_argument("--sha256", help="expected sha256 of SRC; a mismatch is an error and nothing is written")
    p.set_defaults(func=cmd_convert_edm)

    p = sub.add_parser("prepare-data", help="write a dataset in our format (uint8 NHWC .npz + content hash)",
                       description="Write a dataset in our on-disk format. 'digits': scikit-learn's bundled 8x8 "
                                   "handwritten digits (real images, no download) upsampled by pixel replication to "
                                   "RGB at --resolution. 'cifar10': the 50,000 training images of the official python "
                                   "tarball (--archive), in EDM's order, at 32x32. The content hash covers the pixels "
                                   "and labels only, not the archive's timestamps.")
    p.add_argument("--source", required=True, choices=["digits", "cifar10"], help="which dataset (config: dataset.source)")
    p.add_argument("--resolution", required=True, type=int, help="image size in pixels (config: dataset.resolution)")
    p.add_argument("--archive", help="the downloaded archive (cifar10: cifar-10-python.tar.gz from 'ect fetch')")
    p.add_argument("--out", required=True, help="output .npz")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("fetch", help="download a file, checksum-verified and resumable",
                       description="Download URL to --out and verify its md5 and/or sha256 (at least one is required) "
                                   "before renaming it into place. Resumes (HTTP Range) after a dropped or stalled "
                                   "connection; any failure leaves no output. Without --sha256 the file's sha256 is "
                                   "printed, to pin in the config. Run on a machine with internet (a login node); "
                                   "'snakemake prefetch' runs every download of a preset.")
    p.add_argument("url", help="http(s) URL (the preset's dataset.url, teacher.url or fid.feature_net.url)")
    p.add_argument("--out", required=True)
    p.add_argument("--md5", help="expected md5 (hex)")
    p.add_argument("--sha256", help="expected sha256 (hex)")
    p.add_argument("--unverified", action="store_true",
                   help="download without a checksum (trust on first use, by hand; the pipeline never passes it)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a read may stall before a retry (default 60)")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_fetch)

    for step, objective, summary, description in TRAIN_STEPS:
        p = sub.add_parser(step, help=summary, description=description + RESUME_HELP)
        _train_args(p, with_teacher=objective == "ect")
        p.set_defaults(func=cmd_train, objective=objective)

    p = sub.add_parser("sample", help="generate images (consistency 1/2-step, or the teacher's Heun sampler)",
                       description="Generate images; image i uses a generator seeded with i, so any seed subset is "
                                   "reproducible and jobs can be split and merged. Writes uint8 NHWC .npz (+ PNG grid). "
                                   "With --config and --set, the sampler settings come from the config's 'sample' "
                                   "section (the pipeline's way); otherwise from the flags.")
    p.add_argument("--checkpoint", required=True, help="our checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output .npz (images uint8 NHWC, seeds, meta)")
    p.add_argument("--grid", help="also write a PNG grid of the first 64 images")
    config_arg(p, required=False)
    p.add_argument("--set", choices=list(SAMPLE_SET_NAMES), help="which of the pipeline's sample sets (with --config)")
    p.add_argument("--seeds", help="seed list, e.g. '0-49999' or '0-99,200-299' (default 0-63)")
    p.add_argument("--sampler", choices=["consistency", "heun"], help="default consistency")
    p.add_argument("--steps", type=int, help="consistency steps (default 1)")
    p.add_argument("--t-mid", type=float, nargs="+", help="intermediate times for multi-step sampling (default 0.821)")
    p.add_argument("--heun-steps", type=int, help="Heun steps (default 18 -> 35 evaluations, EDM CIFAR-10)")
    p.add_argument("--batch", type=int, help="default 256")
    device_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("feature-net", help="train the toy FID feature network (a digits classifier, fixed seed)",
                       description="Train a small CNN classifier on the dataset (80%% train, 20%% held out; seed and "
                                   "epochs from the config's fid.feature_net) and save its 64-d penultimate features "
                                   "as TorchScript with the Inception interface: float images (N, 3, H, W) in "
                                   "[0, 255] -> (N, 64).")
    config_arg(p)
    p.add_argument("--data", required=True, help="dataset .npz")
    p.add_argument("--out", required=True, help="TorchScript file to write")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_feature_net)

    def feature_args(p, scoring=True):
        """The feature network; for scoring steps also the reference statistics and the JSON result."""
        p.add_argument("--feature-net", required=True,
                       help="TorchScript feature network (.pt); checked against its pinned sha256 when there is one")
        if scoring:
            p.add_argument("--ref", required=True, help="reference statistics from 'ect fid-stats'")
            p.add_argument("--out", required=True, help="result .json")

    p = sub.add_parser("fid-stats", help="reference FID statistics (mean, covariance) of a dataset",
                       description="Features of every image of the dataset in each --modes, then their mean and "
                                   "covariance (float64), in one .npz. Takes the feature network's settings rather "
                                   "than a config, so that presets sharing a dataset share its statistics.")
    p.add_argument("--data", required=True, help="dataset .npz")
    p.add_argument("--out", required=True, help="statistics .npz (mu_<mode>, sigma_<mode>, meta)")
    feature_args(p, scoring=False)
    p.add_argument("--kind", required=True, choices=["digits-classifier", "inception"],
                   help="the feature network (config: fid.feature_net.kind)")
    p.add_argument("--sha256", help="expected sha256 of --feature-net (config: fid.feature_net.sha256)")
    p.add_argument("--modes", required=True, nargs="+", choices=list(FID_MODES), metavar="MODE",
                   help=f"clean-fid modes, {' or '.join(FID_MODES)} (config: fid.modes)")
    p.add_argument("--batch", type=int, default=250, help="images per forward pass (default 250)")
    device_args(p)
    p.set_defaults(func=cmd_fid_stats)

    p = sub.add_parser("fid", help="FID of a sample file against reference statistics (min and mean over sets)",
                       description="Split the samples (ordered by seed) into the config's sample.sets equal sets, "
                                   "compute the FID of each against the reference in every fid.modes, and write min, "
                                   "mean and every value as JSON (the first mode is the headline).")
    config_arg(p)
    p.add_argument("--samples", required=True, help="samples .npz from 'ect sample'")
    feature_args(p)
    device_args(p)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("fid-curve", help="FID of every training snapshot (FID against training budget)",
                       description="Sample every snapshot in a directory with the consistency sampler (fid.curve_steps "
                                   "steps, seeds 0..fid.curve_samples-1) and score it against the reference; one JSON "
                                   "with a point per snapshot.")
    config_arg(p)
    p.add_argument("--snapshots", required=True, help="directory of snapshot checkpoints (*.pt)")
    feature_args(p)
    device_args(p)
    p.set_defaults(func=cmd_fid_curve)

    p = sub.add_parser("report", help="the run's HTML report (FID table, grids, curves, protocol, provenance)",
                       description="Render the report of one run from its results directory with Jinja2. The page "
                                   "and its images go to the output's directory, which is replaced as a whole; "
                                   "everything is local, so it reads offline.")
    config_arg(p)
    p.add_argument("--results", required=True, help="the run's results directory (results/<run>)")
    p.add_argument("--data", required=True, help="the dataset .npz (its hashes go into the provenance)")
    p.add_argument("--out", required=True, help="output HTML, e.g. reports/<run>/index.html")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("merge-samples", help="merge sample files from split jobs (ordered by seed)",
                       description="Concatenate .npz sample files of the same model and sampler; seeds must not overlap.")
    p.add_argument("out")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_merge_samples)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
