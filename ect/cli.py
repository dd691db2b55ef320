"""``ect <step>``: one command per pipeline step, each with explicit inputs, outputs and config.

Exit status 0 only when the step's outputs were written completely.
"""
from __future__ import annotations

import argparse
import pickle
import sys

import torch

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
    cfg = TrainConfig.from_dict({**section(load_config(args.config), args.section or args.command, args.config),
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
    seeds = parse_seeds(args.seeds)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    net = load_network(args.checkpoint, device=device)
    images = generate(net, seeds, sampler=args.sampler, steps=args.steps, t_mids=args.t_mid,
                      heun_steps=args.heun_steps, batch=args.batch, device=device, progress=not args.no_progress)
    meta = {"checkpoint_sha256": sha256_file(args.checkpoint), "sampler": args.sampler,
            "steps": args.steps if args.sampler == "consistency" else args.heun_steps,
            "nfe": nfe(args.sampler, args.steps, args.heun_steps),
            "t_mid": list(args.t_mid[: args.steps - 1]) if args.sampler == "consistency" else []}
    save_samples(args.out, images, seeds, meta)
    if args.grid:
        save_grid(args.grid, images)
    print(f"wrote {len(images)} samples ({meta['nfe']} NFE) to {args.out}", file=sys.stderr)
    return 0


def cmd_merge_samples(args) -> int:
    from ect.sample import merge_samples, save_samples
    images, seeds, meta = merge_samples(args.inputs)
    save_samples(args.out, images, seeds, meta)
    return 0


def cmd_prepare_data(args) -> int:
    from ect.data import save_dataset
    from ect.data.digits import digits_images
    images, labels = digits_images(args.resolution)
    digest = save_dataset(args.out, images, labels)
    print(f"wrote {len(images)} images {images.shape[1:]} to {args.out} (content sha256 {digest})", file=sys.stderr)
    return 0


def _train_args(p: argparse.ArgumentParser, with_teacher: bool) -> None:
    p.add_argument("--config", required=True, help="preset YAML (e.g. config/config.yaml)")
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
                                   "handwritten digits (real images, no download) upsampled to RGB at --resolution.")
    p.add_argument("--source", choices=["digits"], default="digits")
    p.add_argument("--resolution", type=int, default=16, help="output resolution, a multiple of 8 (default 16)")
    p.add_argument("--out", required=True, help="output .npz")
    p.set_defaults(func=cmd_prepare_data)

    for step, objective, summary, description in TRAIN_STEPS:
        p = sub.add_parser(step, help=summary, description=description + RESUME_HELP)
        _train_args(p, with_teacher=objective == "ect")
        p.set_defaults(func=cmd_train, objective=objective)

    p = sub.add_parser("sample", help="generate images (consistency 1/2-step, or the teacher's Heun sampler)",
                       description="Generate images; image i uses a generator seeded with i, so any seed subset is "
                                   "reproducible and jobs can be split and merged. Writes uint8 NHWC .npz (+ PNG grid).")
    p.add_argument("--checkpoint", required=True, help="our checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output .npz (images uint8 NHWC, seeds, meta)")
    p.add_argument("--grid", help="also write a PNG grid of the first 64 images")
    p.add_argument("--seeds", default="0-63", help="seed list, e.g. '0-49999' or '0-99,200-299' (default 0-63)")
    p.add_argument("--sampler", choices=["consistency", "heun"], default="consistency")
    p.add_argument("--steps", type=int, default=1, help="consistency steps (1 or more)")
    p.add_argument("--t-mid", type=float, nargs="+", default=[0.821],
                   help="intermediate times for multi-step sampling (default 0.821, CIFAR-10)")
    p.add_argument("--heun-steps", type=int, default=18, help="Heun steps (18 -> 35 evaluations, EDM CIFAR-10)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sample)

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
