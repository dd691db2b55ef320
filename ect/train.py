"""The training loop for ECT tuning (and for pretraining a small EDM teacher).

Read top to bottom: set up (devices, DDP, data, networks, optimiser), resume from the state
directory if one is there, then iterate: sample the global batch, accumulate gradients, step,
update the EMA, log, save. Every random draw is derived from (seed, iteration, rank, round), so
a resumed run continues the exact same streams, and the global batch is the same samples with
the same noise whatever the number of processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ect.checkpoint import load_state_by_name, read_checkpoint, save_checkpoint
from ect.config import CADENCE_KEYS
from ect.data import load_dataset
from ect.fileio import atomic_path, sha256_file, write_text_atomic
from ect.loss import ECTLossConfig, EDMLossConfig, ect_loss, edm_loss, stage_at
from ect.networks import build_network, count_parameters

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: state saved, rerun the same command to resume


class TrainingDiverged(RuntimeError):
    pass


class Preempted(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "ect"  # "ect" (tune) or "edm" (pretrain a teacher)
    kimg: float = 25600.0  # training length in thousands of images
    batch: int = 128  # global batch, fixed whatever the number of processes
    batch_gpu: int = 0  # per-process micro-batch for gradient accumulation; 0 = batch / processes
    optimizer: str = "radam"
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: str = "constant"  # or "isqrt": lr / sqrt(max(iteration / lr_decay_iters, 1))
    lr_decay_iters: int = 2000
    ema_beta: float = 0.9999
    ema_halflife_kimg: float = 0.0  # > 0 overrides ema_beta: beta = 0.5 ** (batch / (halflife_kimg * 1000))
    seed: int = 0
    tick_kimg: float = 12.8  # one log line per tick
    snapshot_kimg: float = 0.0  # > 0: EMA snapshot every so many kimg
    state_kimg: float = 128.0  # resumable state every so many kimg
    bf16: bool = False
    tf32: bool = False
    channels_last: bool = False
    arch: dict = field(default_factory=dict)  # network kwargs (pretrain) or overrides of the teacher's (tune)
    loss: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        cfg = cls(**d)
        cfg.loss_config()  # validates loss keys and values
        if cfg.objective not in ("ect", "edm"):
            raise ValueError(f"objective must be 'ect' or 'edm', not {cfg.objective!r}")
        if cfg.optimizer not in ("radam", "adam"):
            raise ValueError(f"optimizer must be 'radam' or 'adam', not {cfg.optimizer!r}")
        if cfg.lr_schedule not in ("constant", "isqrt"):
            raise ValueError(f"lr_schedule must be 'constant' or 'isqrt', not {cfg.lr_schedule!r}")
        if cfg.batch < 1 or cfg.kimg <= 0 or cfg.lr <= 0 or not 0 <= cfg.ema_beta < 1:
            raise ValueError("need batch >= 1, kimg > 0, lr > 0 and 0 <= ema_beta < 1")
        return cfg

    def loss_config(self):
        kind = ECTLossConfig if self.objective == "ect" else EDMLossConfig
        names = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(self.loss) - names)
        if unknown:
            raise ValueError(f"unknown loss option(s) {unknown} for objective {self.objective!r}; known: {sorted(names)}")
        return kind(**self.loss)

    @property
    def total_iters(self) -> int:
        return max(1, round(self.kimg * 1000 / self.batch))

    def every_iters(self, kimg: float) -> int:
        return max(1, round(kimg * 1000 / self.batch)) if kimg > 0 else 0

    def ema_decay(self) -> float:
        if self.ema_halflife_kimg > 0:
            return 0.5 ** (self.batch / (self.ema_halflife_kimg * 1000))
        return self.ema_beta

    def lr_at(self, iteration: int) -> float:
        if self.lr_schedule == "isqrt":
            return self.lr / math.sqrt(max(iteration / self.lr_decay_iters, 1))
        return self.lr

    def digest(self) -> str:
        """What the run computes: every option but CADENCE_KEYS. A state resumes only under the same digest."""
        computed = {k: v for k, v in dataclasses.asdict(self).items() if k not in CADENCE_KEYS}
        return hashlib.sha256(json.dumps(computed, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Deterministic randomness: every stream is a function of (seed, iteration, ...).

def derived_seed(*key: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:7], "little")


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*key))


def batch_indices(seed: int, iteration: int, batch: int, num_images: int) -> torch.Tensor:
    """Dataset indices of the global batch: consecutive slices of per-epoch seeded permutations."""
    positions = torch.arange(iteration * batch, (iteration + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for epoch in positions.div(num_images, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(num_images, generator=_generator(seed, 1, epoch))
        sel = positions // num_images == epoch
        out[sel] = perm[positions[sel] % num_images]
    return out


def batch_noise(seed: int, iteration: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(standard normals for ln t [B,1,1,1], image noise ε [B,C,H,W]) for the global batch."""
    gen = _generator(seed, 2, iteration)
    return torch.randn([shape[0], 1, 1, 1], generator=gen), torch.randn(shape, generator=gen)


# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (one tiny all-reduce)."""
        if self.world == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        dist.all_reduce(t)
        return t.item() == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (a scheduler's time-limit warning); checked once per iteration."""

    def __init__(self):
        self.signum = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_state(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _rewrite_log(log_path: Path, upto_iteration: int) -> None:
    """Drop log lines written after the state we resume from, so the log has no duplicates."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["iteration"] <= upto_iteration]
    write_text_atomic(log_path, "".join(line + "\n" for line in kept))


def train(cfg: TrainConfig, data_path, state_dir, out_path, init_path=None, snapshot_dir=None, log_path=None,
          progress: bool = True) -> dict:
    """Run (or resume) training; write the EMA weights to ``out_path``. Returns a summary dict."""
    state_dir = Path(state_dir)
    d = init_distributed()
    stop = StopFlag()
    try:
        return _train(cfg, d, stop, Path(data_path), state_dir, Path(out_path), init_path, snapshot_dir, log_path,
                      progress)
    finally:
        stop.restore()
        if d.world > 1:
            dist.destroy_process_group()


def _train(cfg, d: Dist, stop: StopFlag, data_path, state_dir, out_path, init_path, snapshot_dir, log_path, progress):
    if cfg.batch % d.world:
        raise ValueError(f"global batch {cfg.batch} is not divisible by {d.world} processes")
    per_rank = cfg.batch // d.world
    micro = cfg.batch_gpu or per_rank
    if per_rank % micro:
        raise ValueError(f"per-process batch {per_rank} is not divisible by batch_gpu {micro}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    loss_cfg = cfg.loss_config()

    # Data: the whole (small) uint8 dataset in memory; batches are gathered by index.
    images, labels = load_dataset(data_path)
    images = torch.from_numpy(images).permute(0, 3, 1, 2)  # NCHW uint8
    num_images, channels, res = images.shape[0], images.shape[1], images.shape[2]

    # Networks.
    init_meta = {}
    if cfg.objective == "ect":
        if init_path is None:
            raise ValueError("ECT tuning needs an initial (teacher) checkpoint")
        teacher = read_checkpoint(init_path)
        arch = {**teacher["arch"], "kind": "ect", "sigma_min": None, "augment_dim": 0, **cfg.arch}
        init_meta = {"init": str(init_path), "init_sha256": sha256_file(init_path)}
    else:
        arch = {"kind": "edm", "img_resolution": res, "img_channels": channels, **cfg.arch}
    if arch["img_resolution"] != res or arch["img_channels"] != channels:
        raise ValueError(f"network expects {arch['img_channels']}x{arch['img_resolution']}² images, "
                         f"dataset has {channels}x{res}²")
    torch.manual_seed(cfg.seed)  # network initialisation
    net = build_network(arch)
    arch["sigma_min"] = net.sigma_min  # record the resolved default in every checkpoint
    if cfg.objective == "ect":
        skipped = load_state_by_name(net, teacher["state_dict"])
        if skipped and d.main:
            print(f"teacher weights not used by the student (skipped): {skipped}", file=sys.stderr)
    ema = build_network(arch)
    ema.load_state_dict(net.state_dict())
    ema.eval().requires_grad_(False)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net.train().requires_grad_(True).to(d.device, memory_format=memory_format)
    ema.to(d.device)
    opt_cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    optimizer = opt_cls(net.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    # Resume.
    state_path = state_dir / "state.pt"
    live_log = state_dir / "log.jsonl"
    start = 0
    if state_path.exists():
        state = _load_state(state_path)
        if state["config_digest"] != cfg.digest():
            raise ValueError(f"{state_path} was written with a different configuration "
                             f"({state['config_digest']} != {cfg.digest()}); delete {state_dir} to start over")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        start = state["iteration"]
        if d.main:
            _rewrite_log(live_log, start)
            print(f"resuming from {state_path} at iteration {start} ({start * cfg.batch / 1000:g} kimg)", file=sys.stderr)
    elif d.main:
        state_dir.mkdir(parents=True, exist_ok=True)
        live_log.unlink(missing_ok=True)
    if d.world > 1:
        dist.barrier()

    ddp = torch.nn.parallel.DistributedDataParallel(net) if d.world > 1 else net
    beta = cfg.ema_decay()
    tick_every, state_every = cfg.every_iters(cfg.tick_kimg), cfg.every_iters(cfg.state_kimg)
    snapshot_every = cfg.every_iters(cfg.snapshot_kimg)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def stage_of(iteration):
        return stage_at(iteration, loss_cfg.double) if cfg.objective == "ect" else 0

    def save_state(iteration):
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise TrainingDiverged(f"weights became non-finite by iteration {iteration}; the last good state "
                                   f"is kept in {state_dir} (not overwritten)")
        if d.main:
            _save_state(state_path, {"net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                                     "iteration": iteration, "stage": stage_of(iteration),
                                     "data_position": iteration * cfg.batch, "rng_cpu": torch.get_rng_state(),
                                     "config_digest": cfg.digest(), "arch": arch})
        if d.world > 1:
            dist.barrier()

    def save_ema(path, iteration):
        meta = {"producer": f"ect {'tune' if cfg.objective == 'ect' else 'pretrain'}", "iteration": iteration,
                "kimg": iteration * cfg.batch / 1000, "ema_beta": beta, "config_digest": cfg.digest(),
                "dataset": str(data_path), **init_meta}
        save_checkpoint(path, arch, ema.state_dict(), meta)

    bar = tqdm(total=cfg.total_iters, initial=start, unit="it", disable=not (progress and d.main), file=sys.stderr,
               desc=cfg.objective)
    tick_start, tick_iter, tick_losses = time.perf_counter(), start, []
    iteration = start
    while iteration < cfg.total_iters:
        if not d.all_true(stop.signum == 0):
            save_state(iteration)
            raise Preempted(f"received signal {stop.signum}: state saved at iteration {iteration} in {state_dir}; "
                            "rerun the same command to resume")
        stage = stage_of(iteration)
        lr = cfg.lr_at(iteration)
        for g in optimizer.param_groups:
            g["lr"] = lr

        idx = batch_indices(cfg.seed, iteration, cfg.batch, num_images)
        t_normal, eps = batch_noise(cfg.seed, iteration, (cfg.batch, channels, res, res))
        lo = d.rank * per_rank
        optimizer.zero_grad(set_to_none=True)
        iter_loss = torch.zeros((), device=d.device)
        for rnd, s in enumerate(range(lo, lo + per_rank, micro)):
            sl = slice(s, s + micro)
            y = (images[idx[sl]].to(d.device, torch.float32) / 127.5 - 1).contiguous(memory_format=memory_format)
            tn, e = t_normal[sl].to(d.device), eps[sl].to(d.device)
            torch.manual_seed(derived_seed(cfg.seed, 3, iteration, d.rank, rnd))  # dropout masks
            sync = contextlib.nullcontext() if (d.world == 1 or s + micro >= lo + per_rank) else ddp.no_sync()
            with sync:
                with autocast:
                    if cfg.objective == "ect":
                        per_sample, _ = ect_loss(ddp, net, y, tn, e, stage, loss_cfg)
                    else:
                        per_sample = edm_loss(ddp, y, tn, e, loss_cfg)
                (per_sample.float().sum() / per_rank).backward()
            iter_loss += per_sample.detach().float().sum()
        mean_loss = iter_loss / per_rank
        if d.world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= d.world
        if not torch.isfinite(mean_loss):
            raise TrainingDiverged(f"loss became {mean_loss.item()} at iteration {iteration}; the last good state "
                                   f"is kept in {state_dir} (not overwritten)")
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p.detach(), 1 - beta)
        iteration += 1
        bar.update(1)
        tick_losses.append(mean_loss.item())

        if d.main and (iteration % tick_every == 0 or iteration == cfg.total_iters):
            elapsed = time.perf_counter() - tick_start
            line = {"iteration": iteration, "kimg": iteration * cfg.batch / 1000, "loss": float(np.mean(tick_losses)),
                    "stage": stage, "lr": lr, "img_per_s": (iteration - tick_iter) * cfg.batch / max(elapsed, 1e-9),
                    "peak_mem_mb": _peak_memory_mb(d.device)}
            with open(live_log, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)
            tick_start, tick_iter, tick_losses = time.perf_counter(), iteration, []
        if d.main and snapshot_every and iteration % snapshot_every == 0:
            save_ema(state_dir / "snapshots" / snapshot_name(iteration * cfg.batch), iteration)
        if state_every and iteration % state_every == 0 and iteration < cfg.total_iters:
            save_state(iteration)
    bar.close()

    save_state(iteration)
    if d.main:
        if snapshot_dir is not None:
            _publish_snapshots(state_dir / "snapshots", Path(snapshot_dir))
        if log_path is not None:
            write_text_atomic(log_path, live_log.read_text() if live_log.exists() else "")
        save_ema(out_path, iteration)
    return {"iterations": iteration, "parameters": count_parameters(net), "arch": arch}


def _publish_snapshots(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.pt")) if src.exists() else []:
        with atomic_path(dst / path.name) as tmp:
            tmp.write_bytes(path.read_bytes())


def snapshot_name(images_seen: int) -> str:
    """``kimg000012.800.pt``: sorts by training length."""
    return f"kimg{images_seen / 1000:010.3f}.pt"


def run_cli(cfg: TrainConfig, **kwargs) -> int:
    """Train with scheduler-friendly exit codes: 0 done, 75 preempted (resumable), 1 diverged."""
    try:
        train(cfg, **kwargs)
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

