"""The training loop for ECT tuning (and for pretraining a small EDM teacher).

Read top to bottom: set up (devices, DDP, data, networks, optimiser), resume from the state
directory if one is there, then iterate: draw the global batch, accumulate gradients, step,
update the EMA, log, save. Every random draw comes from a named stream keyed by (seed, stream,
iteration, ...), so a resumed run continues the exact same streams, and the global batch is the
same images with the same noise whatever the number of processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import io
import json
import math
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ect.checkpoint import load_state_by_name, read_checkpoint, save_checkpoint
from ect.config import CADENCE_KEYS, ConfigError, section
from ect.cost import device_info, iteration_flops, peak_tflops, precision_of
from ect.data import load_dataset
from ect.fileio import atomic_path, sha256_file, write_bytes_atomic, write_text_atomic
from ect.loss import ECTLossConfig, EDMLossConfig, ect_loss, edm_loss, stage_at
from ect.networks import build_network, count_parameters, student_arch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: state saved, rerun the same command to resume


class TrainingDiverged(RuntimeError):
    pass


class Preempted(RuntimeError):
    pass


ADDED_OPTIONS = ("grad_posinf", "pf_ema_stds", "output_ema_std")  # TrainConfig.digest: absent = default


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
    grad_posinf: float = 1e5  # what an infinite gradient becomes (NaN: 0); ECT's ImageNet branch zeroes them too
    pf_ema_stds: tuple = ()  # EDM2's power-function EMAs (relative stds) tracked beside the classic EMA
    output_ema_std: float = 0.0  # the EMA written as the output and the snapshots: 0 = classic, else a pf std
    arch: dict = field(default_factory=dict)  # network kwargs (pretrain) or overrides of the teacher's (tune)
    loss: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        for key in ("betas", "pf_ema_stds"):
            if key in d:
                d[key] = tuple(d[key])
        cfg = cls(**d)
        cfg.loss_config()  # validates loss keys and values
        if cfg.objective not in ("ect", "edm"):
            raise ValueError(f"objective must be 'ect' or 'edm', not {cfg.objective!r}")
        if cfg.optimizer not in ("radam", "adam"):
            raise ValueError(f"optimizer must be 'radam' or 'adam', not {cfg.optimizer!r}")
        if cfg.lr_schedule not in ("constant", "isqrt"):
            raise ValueError(f"lr_schedule must be 'constant' or 'isqrt', not {cfg.lr_schedule!r}")
        if cfg.batch < 1 or not cfg.kimg > 0 or not cfg.lr > 0 or not 0 <= cfg.ema_beta < 1:
            raise ValueError("need batch >= 1, kimg > 0, lr > 0 and 0 <= ema_beta < 1")
        if cfg.batch_gpu < 0 or (cfg.batch_gpu and cfg.batch % cfg.batch_gpu):
            raise ValueError(f"batch_gpu {cfg.batch_gpu} does not divide the batch {cfg.batch}")
        if not all(0 < std <= 0.28 for std in cfg.pf_ema_stds):
            raise ValueError(f"pf_ema_stds must lie in (0, 0.28], not {list(cfg.pf_ema_stds)}")
        if cfg.output_ema_std and cfg.output_ema_std not in cfg.pf_ema_stds:
            raise ValueError(f"output_ema_std {cfg.output_ema_std} is not one of pf_ema_stds {list(cfg.pf_ema_stds)} "
                             "(0 selects the classic EMA)")
        if not cfg.grad_posinf >= 0:
            raise ValueError(f"grad_posinf must be >= 0, not {cfg.grad_posinf}")
        return cfg

    @classmethod
    def from_config(cls, config: dict, section_name: str, objective: str, size: str | None = None) -> TrainConfig:
        """The options of one training section of a (validated) config; with a scaling study's ``size``, its
        arch overrides applied."""
        options = {**section(config, section_name), "objective": objective}
        if size is not None:
            scaling = config.get("scaling") or {}
            sizes = scaling.get("sizes", {})
            if size not in sizes:
                raise ConfigError(f"size {size!r} is not one of scaling.sizes ({', '.join(sizes) or 'no scaling'})")
            own = (scaling.get("tune") or {}).get(size, {}) if section_name == "tune" else {}
            options.update({k: v for k, v in own.items() if k != "arch"})
            options["arch"] = {**options.get("arch", {}), **sizes[size], **own.get("arch", {})}
        return cls.from_dict(options)

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

    def stage_at(self, iteration: int) -> int:
        """The ECT stage at ``iteration`` (pretraining has none)."""
        return stage_at(iteration, self.loss_config().double) if self.objective == "ect" else 0

    def digest(self) -> str:
        """What the run computes: every option but CADENCE_KEYS. A state resumes only under the same digest.
        Options added since the first release count only when set, so older states still resume."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in ADDED_OPTIONS}
        computed = {k: v for k, v in dataclasses.asdict(self).items()
                    if k not in CADENCE_KEYS and not (k in defaults and v == defaults[k])}
        return hashlib.sha256(json.dumps(computed, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Deterministic randomness: every draw comes from a named stream, keyed by (seed, stream, ...).

class Stream(enum.IntEnum):
    BATCH_ORDER = 1  # which images make up each global batch: per-epoch permutations of the dataset
    NOISE = 2  # the normals behind ln t and the image noise of each global batch
    DROPOUT = 3  # dropout masks, per iteration, process and accumulation round


def derived_seed(*key: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(tuple(int(k) for k in key)).encode()).digest()[:7], "little")


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*key))


def batch_indices(seed: int, iteration: int, batch: int, num_images: int) -> torch.Tensor:
    """Dataset indices of the global batch: consecutive slices of per-epoch seeded permutations."""
    positions = torch.arange(iteration * batch, (iteration + 1) * batch)
    out = torch.empty(batch, dtype=torch.long)
    for epoch in positions.div(num_images, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(num_images, generator=_generator(seed, Stream.BATCH_ORDER, epoch))
        sel = positions // num_images == epoch
        out[sel] = perm[positions[sel] % num_images]
    return out


def batch_noise(seed: int, iteration: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(standard normals for ln t [B,1,1,1], image noise ε [B,C,H,W]) for the global batch."""
    gen = _generator(seed, Stream.NOISE, iteration)
    return torch.randn([shape[0], 1, 1, 1], generator=gen), torch.randn(shape, generator=gen)


# ---------------------------------------------------------------------------------------------
# Processes, signals and the state directory.

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

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


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
    """Set by SIGTERM / SIGUSR1 (a scheduler's time-limit warning, or our parent dying); checked once per
    iteration."""

    def __init__(self):
        self.signum = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StateDirectoryBusy(RuntimeError):
    pass


@contextlib.contextmanager
def state_directory_lock(state_dir: Path):
    """Hold an exclusive lock on the state directory while training: a second trainer on the same
    directory (a rerun while the first still runs) stops at once, naming the process that holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise StateDirectoryBusy(f"state directory {state_dir} is in use by {holder}: another trainer is still "
                                     "running on it; stop that process (or wait for it) and rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


class TrainState:
    """Everything a run needs to continue exactly where it stopped; it saves and loads itself.

    A state resumes only under the configuration that wrote it (its digest); the log lines written
    after it was saved are dropped on resume, so the log has no duplicates.
    """

    def __init__(self, state_dir: Path, cfg: TrainConfig, arch: dict, net, ema, pf_emas, optimizer):
        self.dir, self.cfg, self.arch = state_dir, cfg, arch
        self.net, self.ema, self.pf_emas, self.optimizer = net, ema, pf_emas, optimizer
        self.iteration = 0
        self.elapsed_s = 0.0  # training wall-clock so far, across resumes (saving and logging excluded)
        self.path, self.log_path = state_dir / "state.pt", state_dir / "log.jsonl"

    def save(self) -> None:
        buf = io.BytesIO()  # serialised in memory first: a full disk then fails as an OSError naming the file
        torch.save({"net": self.net.state_dict(), "ema": self.ema.state_dict(),
                    "pf_emas": [e.state_dict() for e in self.pf_emas],
                    "optimizer": self.optimizer.state_dict(), "iteration": self.iteration,
                    "stage": self.cfg.stage_at(self.iteration), "data_position": self.iteration * self.cfg.batch,
                    "rng_cpu": torch.get_rng_state(), "config_digest": self.cfg.digest(), "arch": self.arch,
                    "elapsed_s": self.elapsed_s}, buf)
        write_bytes_atomic(self.path, buf.getvalue())

    def load(self) -> bool:
        """Resume from the saved state if there is one; return whether there was."""
        if not self.path.exists():
            return False
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["config_digest"] != self.cfg.digest():
            raise ConfigError(f"{self.path} was written with a different configuration "
                              f"({state['config_digest']} != {self.cfg.digest()}); delete {self.dir} to start over")
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        for e, saved in zip(self.pf_emas, state.get("pf_emas", []), strict=True):
            e.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        self.iteration, self.elapsed_s = state["iteration"], float(state.get("elapsed_s", 0.0))
        return True

    def append_log(self, line: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def truncate_log(self) -> None:
        """Keep the log lines up to the saved iteration (none for a fresh run)."""
        if self.log_path.exists():
            kept = [line for line in self.log_path.read_text().splitlines()
                    if line and json.loads(line)["iteration"] <= self.iteration]
            write_text_atomic(self.log_path, "".join(line + "\n" for line in kept))

    def weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.net.parameters())


class TensorBoard:
    """The tick lines as TensorBoard events beside the JSON log, to watch a long run live
    (`tensorboard --logdir results/<run>/state`). On resume, events after the saved iteration are purged."""

    SCALARS = ("loss", "stage", "lr", "img_per_s", "tflops", "utilization", "elapsed_s")

    def __init__(self, log_dir: Path, iteration: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=iteration or None)

    def add(self, line: dict) -> None:
        for key in self.SCALARS:
            if line.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", line[key], line["iteration"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# The loop.

def train(cfg: TrainConfig, data_path, state_dir, out_path, init_path=None, snapshot_dir=None, log_path=None,
          progress: bool = True) -> dict:
    """Run (or resume) training; write the EMA weights to ``out_path``. Returns a summary dict."""
    d = init_distributed()
    stop = StopFlag()
    try:
        lock = state_directory_lock(Path(state_dir)) if d.main else contextlib.nullcontext()
        with lock:
            return _train(cfg, d, stop, Path(data_path), Path(state_dir), Path(out_path), init_path, snapshot_dir,
                          log_path, progress)
    finally:
        stop.restore()
        if d.world > 1:
            dist.destroy_process_group()


def _train(cfg, d: Dist, stop: StopFlag, data_path, state_dir, out_path, init_path, snapshot_dir, log_path, progress):
    # Processes and precision: the global batch splits evenly into processes and micro-batches.
    if cfg.batch % d.world:
        raise ValueError(f"global batch {cfg.batch} is not divisible by {d.world} processes")
    per_rank = cfg.batch // d.world
    micro = cfg.batch_gpu or per_rank
    if per_rank % micro:
        raise ValueError(f"per-process batch {per_rank} is not divisible by batch_gpu {micro}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = True  # the reference's default (--bench): fastest convolutions per shape
    loss_cfg = cfg.loss_config()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    # Data: the whole uint8 dataset in memory (as the reference caches it); batches are gathered by index.
    images, labels = load_dataset(data_path)
    images = torch.from_numpy(images).permute(0, 3, 1, 2)  # NCHW uint8
    channels, res = images.shape[1], images.shape[2]

    # Networks: ECT starts the student from the teacher's weights (its arch with the config's
    # overrides); pretraining builds one from scratch. The EMA starts as a copy of the student.
    init_meta = {}
    if cfg.objective == "ect":
        if init_path is None:
            raise ValueError("ECT tuning needs an initial (teacher) checkpoint")
        teacher = read_checkpoint(init_path)
        arch = student_arch(teacher["arch"], cfg.arch)
        init_meta = {"init": str(init_path), "init_sha256": sha256_file(init_path)}
    else:
        arch = {"kind": "edm", "img_resolution": res, "img_channels": channels, **cfg.arch}
    if arch["img_resolution"] != res or arch["img_channels"] != channels:
        raise ValueError(f"network expects {arch['img_channels']}x{arch['img_resolution']}² images, "
                         f"dataset has {channels}x{res}²")
    label_dim = arch.get("label_dim", 0)
    if label_dim and int(labels.max()) >= label_dim:
        raise ValueError(f"the dataset has class {int(labels.max())}, the network only {label_dim} classes")
    labels = torch.from_numpy(labels) if label_dim else None  # a class-conditional network sees the labels
    torch.manual_seed(cfg.seed)  # network initialisation
    net = build_network(arch)
    if hasattr(net, "sigma_min"):
        arch["sigma_min"] = net.sigma_min  # record the resolved default in every checkpoint
    if cfg.objective == "ect":
        skipped = load_state_by_name(net, teacher["state_dict"])
        if skipped and d.main:
            print(f"teacher weights not used by the student (skipped): {skipped}", file=sys.stderr)
    ema, *pf_emas = (build_network(arch) for _ in range(1 + len(cfg.pf_ema_stds)))
    for e in (ema, *pf_emas):
        e.load_state_dict(net.state_dict())
        e.eval().requires_grad_(False).to(d.device)
    output_ema = pf_emas[cfg.pf_ema_stds.index(cfg.output_ema_std)] if cfg.output_ema_std else ema
    net.train().requires_grad_(True).to(d.device, memory_format=memory_format)
    opt_cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    optimizer = opt_cls(net.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    # Cost: FLOPs of one iteration (counted once, on shapes), the devices and their peak throughput.
    flops_per_iteration = iteration_flops(arch, cfg.objective, micro, cfg.batch, (channels, res, res))
    device = device_info(d.device, d.world)
    peak, no_peak_reason = peak_tflops(device, precision_of(cfg.bf16, cfg.tf32))

    # Resume from the state directory when there is a state; otherwise start a fresh log.
    state = TrainState(state_dir, cfg, arch, net, ema, pf_emas, optimizer)
    if state.load() and d.main:
        print(f"resuming from {state.path} at iteration {state.iteration} "
              f"({state.iteration * cfg.batch / 1000:g} kimg)", file=sys.stderr)
    if d.main:
        state.dir.mkdir(parents=True, exist_ok=True)
        state.truncate_log() if state.iteration else state.log_path.unlink(missing_ok=True)
    d.barrier()

    def save_state():
        if not state.weights_finite():
            raise TrainingDiverged(f"weights became non-finite by iteration {state.iteration}; the last good state "
                                   f"is kept in {state_dir} (not overwritten)")
        if d.main:
            state.save()
        d.barrier()

    def cost():
        """What the run has cost so far: training time, FLOPs, device-hours."""
        return {"elapsed_s": state.elapsed_s, "flops": float(state.iteration * flops_per_iteration),
                "device_hours": state.elapsed_s * d.world / 3600}

    def save_ema(path, which=None, std=None):
        which, std = (output_ema, cfg.output_ema_std) if which is None else (which, std)
        meta = {"producer": f"ect {'tune' if cfg.objective == 'ect' else 'pretrain'}", "iteration": state.iteration,
                "kimg": state.iteration * cfg.batch / 1000,
                "ema": f"power function, sigma_rel {std:g}" if std else f"classic, beta {cfg.ema_decay():g}",
                "ema_beta": None if std else cfg.ema_decay(), "ema_std": std or None,
                "config_digest": cfg.digest(), "dataset": str(data_path), **cost(),
                "flops_per_iteration": float(flops_per_iteration), "device": device, **init_meta}
        save_checkpoint(path, arch, which.state_dict(), meta)

    # Train: one iteration per global batch until the budget is spent.
    model = torch.nn.parallel.DistributedDataParallel(net) if d.world > 1 else net
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    step = TrainStep(cfg, loss_cfg, d, model, net, ema, pf_emas, optimizer, images, labels, per_rank, micro,
                     memory_format, autocast)
    tick_every, state_every = cfg.every_iters(cfg.tick_kimg), cfg.every_iters(cfg.state_kimg)
    snapshot_every = cfg.every_iters(cfg.snapshot_kimg)
    bar = tqdm(total=cfg.total_iters, initial=state.iteration, unit="it", disable=not (progress and d.main),
               file=sys.stderr, desc=cfg.objective)
    events = TensorBoard(state_dir / "tensorboard", state.iteration) if d.main else None
    tick_start, tick_iter, tick_losses, tick_train_s = time.perf_counter(), state.iteration, [], 0.0
    while state.iteration < cfg.total_iters:
        # Stop cleanly when asked (SIGTERM/SIGUSR1 on any process): save the state, exit 75.
        if not d.all_true(stop.signum == 0):
            save_state()
            raise Preempted(f"received signal {stop.signum}: state saved at iteration {state.iteration} in "
                            f"{state_dir}; rerun the same command to resume")

        # One iteration (its wall-clock time is the run's training time).
        started = time.perf_counter()
        loss = step(state.iteration)
        tick_train_s += time.perf_counter() - started
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at iteration {state.iteration}; the last good state "
                                   f"is kept in {state_dir} (not overwritten)")
        state.elapsed_s += time.perf_counter() - started
        state.iteration += 1
        bar.update(1)
        tick_losses.append(loss)

        # Log a tick, snapshot the EMA, save the state, each at its own cadence.
        if d.main and (state.iteration % tick_every == 0 or state.iteration == cfg.total_iters):
            elapsed = time.perf_counter() - tick_start
            tflops = (state.iteration - tick_iter) * flops_per_iteration / max(tick_train_s, 1e-9) / 1e12
            line = {"iteration": state.iteration, "kimg": state.iteration * cfg.batch / 1000,
                    "loss": float(np.mean(tick_losses)), "stage": cfg.stage_at(state.iteration - 1),
                    "lr": cfg.lr_at(state.iteration - 1),
                    "img_per_s": (state.iteration - tick_iter) * cfg.batch / max(elapsed, 1e-9),
                    "peak_mem_mb": _peak_memory_mb(d.device), **cost(), "tflops": tflops,
                    "utilization": tflops / peak if peak else None}
            state.append_log(line)
            events.add(line)
            print(json.dumps(line), flush=True)
            tick_start, tick_iter, tick_losses, tick_train_s = time.perf_counter(), state.iteration, [], 0.0
        if d.main and snapshot_every and state.iteration % snapshot_every == 0:
            save_ema(state_dir / "snapshots" / snapshot_name(state.iteration * cfg.batch))
        if state_every and state.iteration % state_every == 0 and state.iteration < cfg.total_iters:
            save_state()
    bar.close()

    # Done: the final state, the snapshots and the log published, the EMA weights as the output.
    save_state()
    if d.main:
        events.close()
        if no_peak_reason:
            print(f"utilisation not reported: {no_peak_reason}", file=sys.stderr)
        if snapshot_dir is not None:
            _publish_snapshots(state_dir / "snapshots", Path(snapshot_dir))
        if log_path is not None:
            write_text_atomic(log_path, state.log_path.read_text() if state.log_path.exists() else "")
        if cfg.pf_ema_stds:  # every EMA, for post-hoc choices
            for std, e in zip((0.0, *cfg.pf_ema_stds), (ema, *pf_emas), strict=True):
                save_ema(state_dir / "emas" / (f"pf-{std:.3f}.pt" if std else "classic.pt"), e, std)
        save_ema(out_path)
    return {"iterations": state.iteration, "parameters": count_parameters(net), "arch": arch}


@dataclass
class TrainStep:
    """One iteration: this process's share of the global batch in micro-batches (gradients accumulated,
    synchronised on the last), the optimiser step, the EMA update. Returns the batch's mean loss."""

    cfg: TrainConfig
    loss_cfg: object
    d: Dist
    model: torch.nn.Module  # the student, DDP-wrapped when there are several processes
    net: torch.nn.Module  # the student itself: the ECT target pass runs on it
    ema: torch.nn.Module
    pf_emas: list  # power-function EMAs, one per cfg.pf_ema_stds
    optimizer: torch.optim.Optimizer
    images: torch.Tensor  # the dataset, uint8 NCHW
    labels: torch.Tensor | None  # its classes (int64), for a class-conditional network; else None
    per_rank: int
    micro: int
    memory_format: torch.memory_format
    autocast: object

    def __call__(self, iteration: int) -> float:
        cfg, d = self.cfg, self.d
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.lr_at(iteration)
        stage = cfg.stage_at(iteration)
        idx = batch_indices(cfg.seed, iteration, cfg.batch, self.images.shape[0])
        t_normal, eps = batch_noise(cfg.seed, iteration, (cfg.batch, *self.images.shape[1:]))
        lo = d.rank * self.per_rank
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=d.device)
        for rnd, s in enumerate(range(lo, lo + self.per_rank, self.micro)):
            sl = slice(s, s + self.micro)
            y = (self.images[idx[sl]].to(d.device, torch.float32) / 127.5 - 1).contiguous(
                memory_format=self.memory_format)
            tn, e = t_normal[sl].to(d.device), eps[sl].to(d.device)
            cl = (None if self.labels is None else
                  torch.nn.functional.one_hot(self.labels[idx[sl]], self.net.label_dim).to(d.device, torch.float32))
            torch.manual_seed(derived_seed(cfg.seed, Stream.DROPOUT, iteration, d.rank, rnd))
            last = d.world == 1 or s + self.micro >= lo + self.per_rank  # DDP syncs gradients on the last only
            with contextlib.nullcontext() if last else self.model.no_sync():
                with self.autocast:
                    if cfg.objective == "ect":
                        per_sample, _ = ect_loss(self.model, self.net, y, tn, e, stage, self.loss_cfg, cl)
                    else:  # an EDM2 network with a log-variance head trains with EDM2's uncertainty weighting
                        per_sample = edm_loss(self.model, y, tn, e, self.loss_cfg, cl,
                                              uncertainty=getattr(self.net, "logvar_channels", 0) > 0)
                (per_sample.float().sum() / self.per_rank).backward()
            total += per_sample.detach().float().sum()
        mean_loss = total / self.per_rank
        if d.world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= d.world
        if not torch.isfinite(mean_loss):
            return float(mean_loss)  # the caller stops: the state on disk is the last good one
        for p in self.net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=cfg.grad_posinf, neginf=-cfg.grad_posinf, out=p.grad)
        self.optimizer.step()
        ema_update(self.ema, self.net, cfg.ema_decay())
        for std, pf_ema in zip(cfg.pf_ema_stds, self.pf_emas, strict=True):
            ema_update(pf_ema, self.net, power_function_beta(std, iteration))
        return mean_loss.item()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1 - beta)


def power_function_gamma(std: float) -> float:
    """EDM2's power-function EMA exponent γ for a relative standard deviation σ_rel: the largest real root
    of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0."""
    s = std**-2
    return float(max(r.real for r in np.roots([1, 7, 16 - s, 12 - s]) if abs(r.imag) < 1e-6))


def power_function_beta(std: float, iteration: int) -> float:
    """The power-function EMA's β after (0-based) ``iteration``: (1 − batch/images_seen)^(γ+1) with
    images_seen = (iteration + 1)·batch. β = 0 at the first step: the average covers this run only."""
    return (iteration / (iteration + 1)) ** (power_function_gamma(std) + 1)


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
