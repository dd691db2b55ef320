"""The training loop for ECT tuning (and for pretraining a small EDM teacher).

Read top to bottom: set up (devices, DDP, data, networks, optimiser), resume from the state
directory if one is there, then iterate: draw the global batch, accumulate gradients, step,
update the EMA, log, save. Every random draw comes from a named stream keyed by (seed, stream,
iteration, ...), so a resumed run continues the exact same streams, and the global batch is the
same images with the same noise whatever the number of processes.
"""
from __future__ import annotations

import contextlib
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ect.checkpoint import load_state_by_name, read_checkpoint, save_checkpoint
from ect.cost import device_info, iteration_flops, peak_tflops, precision_of
from ect.data import map_dataset
from ect.errors import BadInput
from ect.fileio import (
    atomic_path,
    is_number,
    read_jsonl,
    sha256_file,
    verify_zip,
    write_bytes_atomic,
    write_text_atomic,
)
from ect.layout import StateLayout, snapshot_name
from ect.loss import ect_loss, edm_loss
from ect.networks import build_network, count_parameters, student_arch
from ect.spec import Training
from ect.typed import ConfigError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: state saved, rerun the same command to resume


class TrainingDiverged(RuntimeError):
    pass


class Preempted(RuntimeError):
    pass


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


class StateDirectoryBusy(BadInput):
    pass


@contextlib.contextmanager
def state_directory_lock(state_dir: Path):
    """Hold an exclusive lock on the state directory while training: a second trainer on the same
    directory (a rerun while the first still runs) stops at once, naming the process that holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = StateLayout(state_dir).lock
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

    def __init__(self, state_dir: Path, cfg: Training, arch: dict, net, ema, pf_emas, optimizer):
        self.dir, self.cfg, self.arch = state_dir, cfg, arch
        self.net, self.ema, self.pf_emas, self.optimizer = net, ema, pf_emas, optimizer
        self.iteration = 0
        self.elapsed_s = 0.0  # training wall-clock so far, across resumes (saving and logging excluded)
        self.files = StateLayout(state_dir)
        self.path, self.log_path = self.files.state, self.files.log

    def save(self) -> None:
        buf = io.BytesIO()  # serialised in memory first: a full disk then fails as an OSError naming the file
        torch.save({"net": self.net.state_dict(), "ema": self.ema.state_dict(),
                    "pf_emas": [e.state_dict() for e in self.pf_emas],
                    "optimizer": self.optimizer.state_dict(), "iteration": self.iteration,
                    "stage": self.cfg.stage_at(self.iteration), "data_position": self.iteration * self.cfg.batch,
                    "rng_cpu": torch.get_rng_state(), "config_digest": self.cfg.digest(), "arch": self.arch,
                    "elapsed_s": self.elapsed_s}, buf)
        write_bytes_atomic(self.path, buf.getvalue())

    STATE_KEYS = {"net": dict, "ema": dict, "pf_emas": list, "optimizer": dict, "iteration": int,
                  "rng_cpu": torch.Tensor, "config_digest": str, "elapsed_s": (int, float)}

    def load(self) -> bool:
        """Resume from the saved state if there is one; return whether there was. A state that is damaged,
        incomplete or from another configuration is refused, naming the file and what to do."""
        if not self.path.exists():
            return False
        start_over = f"delete {self.dir} to start over"
        verify_zip(self.path)
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt file
            raise ConfigError(f"{self.path}: not a readable training state ({type(exc).__name__}); {start_over}") from None
        fields = state if type(state) is dict else {}
        bad = [k for k, kind in self.STATE_KEYS.items() if not isinstance(fields.get(k), kind)]
        if not bad and not (type(fields["iteration"]) is int and 0 <= fields["iteration"] <= self.cfg.total_iters
                            and fields["elapsed_s"] >= 0):
            bad = ["iteration or elapsed_s out of range"]
        if bad:
            raise ConfigError(f"{self.path}: a training state with missing or impossible fields ({', '.join(bad)}); "
                              f"{start_over}")
        if state["config_digest"] != self.cfg.digest():
            raise ConfigError(f"{self.path} was written with a different configuration "
                              f"({state['config_digest'][:16]} != {self.cfg.digest()}); {start_over}")
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        for e, saved in zip(self.pf_emas, state["pf_emas"], strict=True):
            e.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        self.iteration, self.elapsed_s = state["iteration"], float(state["elapsed_s"])
        return True

    def append_log(self, line: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def truncate_log(self) -> None:
        """Keep the log lines up to the saved iteration (none for a fresh run). A torn or garbage line (a writer
        killed mid-line) and everything after it is cut, with a note."""
        if not self.log_path.exists():
            return
        records, dropped = read_jsonl(self.log_path)
        if dropped:
            print(f"note: {self.log_path}: cut {dropped} line(s) from the first one that is not a complete JSON "
                  "record (a writer killed mid-line)", file=sys.stderr)
        kept = [r for r in records if type(r.get("iteration")) is int and r["iteration"] <= self.iteration]
        write_text_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))

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


TICK_FIELDS = ("iteration", "kimg", "loss", "stage", "lr")  # every tick line has them, numbers all


def read_train_log(path) -> list[dict]:
    """A published tick log (train-log.jsonl), checked: complete JSON lines with the tick fields as numbers."""
    records, dropped = read_jsonl(path)
    if dropped or not all(all(is_number(r.get(k)) for k in TICK_FIELDS) for r in records):
        raise ConfigError(f"training log {path}: a line that is not a complete tick record; rerun the step that "
                          "wrote it")
    return records


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# The loop.

@dataclass(frozen=True)
class TrainPaths:
    """Where a run reads and writes: the dataset, its state directory, its outputs."""

    data: Path
    state: Path
    out: Path
    init: Path | None = None  # the teacher checkpoint (ECT)
    snapshots: Path | None = None  # where the EMA snapshots are published at the end
    log: Path | None = None  # where the tick log is published at the end
    emas: Path | None = None  # where every EMA (classic, each power-function one) is published at the end


def train(cfg: Training, data_path, state_dir, out_path, init_path=None, snapshot_dir=None, log_path=None,
          progress: bool = True, emas_dir=None) -> dict:
    """Run (or resume) training; write the EMA weights to ``out_path``. Returns a summary dict."""
    paths = TrainPaths(Path(data_path), Path(state_dir), Path(out_path), init_path and Path(init_path),
                       snapshot_dir and Path(snapshot_dir), log_path and Path(log_path), emas_dir and Path(emas_dir))
    d = init_distributed()
    stop = StopFlag()
    try:
        with state_directory_lock(paths.state) if d.main else contextlib.nullcontext():
            return training_loop(cfg, d, stop, paths, progress)
    finally:
        stop.restore()
        if d.world > 1:
            dist.destroy_process_group()


def training_loop(cfg: Training, d: Dist, stop: StopFlag, paths: TrainPaths, progress: bool) -> dict:
    """The whole run, phase by phase."""
    # Processes and precision: the global batch splits evenly into processes and micro-batches; TF32 as
    # the preset says, cuDNN's autotuner on (the reference's --bench).
    per_rank, micro = split_batch(cfg, d.world)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = True

    # Data: the uint8 dataset mapped from its file (one copy a node in the page cache, however many processes;
    # the reference loads it into each); batches are gathered by index.
    images, labels = map_dataset(paths.data)
    images = torch.from_numpy(images).permute(0, 3, 1, 2)  # NCHW uint8

    # Networks: the student (from the teacher's weights, or from scratch), its EMAs, the optimiser.
    nets = build_networks(cfg, paths.init, images.shape[1:], labels, d)
    labels = torch.from_numpy(labels) if nets.arch.get("label_dim", 0) else None  # conditional: it sees them
    opt_cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    optimizer = opt_cls(nets.student.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    # Cost: FLOPs of one iteration (counted once, on shapes), the devices and their peak throughput.
    cost = CostMeter(iteration_flops(nets.arch, cfg.objective, micro, cfg.batch, tuple(images.shape[1:])),
                     device_info(d.device, d.world), d.world)

    # Resume from the state directory when there is a state; otherwise start a fresh log.
    state = TrainState(paths.state, cfg, nets.arch, nets.student, nets.ema, nets.pf_emas, optimizer)
    if state.load() and d.main:
        print(f"resuming from {state.path} at iteration {state.iteration} "
              f"({state.iteration * cfg.batch / 1000:g} kimg)", file=sys.stderr)
    if d.main:
        state.dir.mkdir(parents=True, exist_ok=True)
        state.truncate_log() if state.iteration else state.log_path.unlink(missing_ok=True)
    d.barrier()

    # Train: one iteration per global batch until the budget is spent; log, snapshot and save on the way.
    step = TrainStep.of(cfg, d, nets.student, nets.ema, nets.pf_emas, optimizer, images, labels, per_rank, micro)
    writer = Publisher(cfg, d, state, nets, cost, paths)
    run_iterations(cfg, d, stop, state, step, writer, progress)

    # Done: the final state, the snapshots, the log and every EMA published, the output EMA last.
    writer.save_state()
    if d.main:
        writer.publish(peak_tflops(cost.device, precision_of(cfg.bf16, cfg.tf32))[1])
    return {"iterations": state.iteration, "parameters": count_parameters(nets.student), "arch": nets.arch}


def split_batch(cfg: Training, world: int) -> tuple[int, int]:
    """(images per process, images per micro-batch) of the global batch."""
    if cfg.batch % world:
        raise ConfigError(f"global batch {cfg.batch} is not divisible by {world} processes")
    per_rank = cfg.batch // world
    micro = cfg.batch_gpu or per_rank
    if per_rank % micro:
        raise ConfigError(f"per-process batch {per_rank} is not divisible by batch_gpu {micro}")
    return per_rank, micro


@dataclass
class Networks:
    arch: dict  # the student's kwargs, as every checkpoint of the run records them
    student: torch.nn.Module  # trained in place
    ema: torch.nn.Module  # the classic EMA
    pf_emas: list  # EDM2's power-function EMAs, one per cfg.pf_ema_stds
    output_ema: torch.nn.Module  # the one written as the output and the snapshots
    init_meta: dict  # where the student started from (the teacher's path and sha256)


def build_networks(cfg: Training, init_path, image_shape, labels, d: Dist) -> Networks:
    """ECT starts the student from the teacher's weights (its arch with the config's overrides); pretraining
    builds one from scratch. Every EMA starts as a copy of the student."""
    channels, res = image_shape[0], image_shape[1]
    init_meta = {}
    if cfg.objective == "ect":
        if init_path is None:
            raise ConfigError("ECT tuning needs an initial (teacher) checkpoint")
        teacher = read_checkpoint(init_path)
        arch = student_arch(teacher["arch"], cfg.arch)
        init_meta = {"init": str(init_path), "init_sha256": sha256_file(init_path)}
    else:
        arch = {"kind": "edm", "img_resolution": res, "img_channels": channels, **cfg.arch}
    if arch["img_resolution"] != res or arch["img_channels"] != channels:
        raise ConfigError(f"network expects {arch['img_channels']}x{arch['img_resolution']}² images, "
                          f"dataset has {channels}x{res}²")
    if arch.get("label_dim", 0) and int(labels.max()) >= arch["label_dim"]:
        raise ConfigError(f"the dataset has class {int(labels.max())}, the network only {arch['label_dim']} classes")
    torch.manual_seed(cfg.seed)  # network initialisation
    student = build_network(arch)
    if hasattr(student, "sigma_min"):
        arch["sigma_min"] = student.sigma_min  # record the resolved default in every checkpoint
    if cfg.objective == "ect":
        skipped = load_state_by_name(student, teacher["state_dict"])
        if skipped and d.main:
            print(f"teacher weights not used by the student (skipped): {skipped}", file=sys.stderr)
    ema, *pf_emas = (build_network(arch) for _ in range(1 + len(cfg.pf_ema_stds)))
    for e in (ema, *pf_emas):
        e.load_state_dict(student.state_dict())
        e.eval().requires_grad_(False).to(d.device)
    output_ema = pf_emas[cfg.pf_ema_stds.index(cfg.output_ema_std)] if cfg.output_ema_std else ema
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    student.train().requires_grad_(True).to(d.device, memory_format=memory_format)
    return Networks(arch, student, ema, pf_emas, output_ema, init_meta)


@dataclass
class CostMeter:
    """What the run has cost: FLOPs per iteration, the devices, and (from the state) time and FLOPs so far."""

    flops_per_iteration: int
    device: dict
    world: int

    def so_far(self, state: TrainState) -> dict:
        return {"elapsed_s": state.elapsed_s, "flops": float(state.iteration * self.flops_per_iteration),
                "device_hours": state.elapsed_s * self.world / 3600}


class Publisher:
    """Everything the run writes besides its state: tick lines, EMA snapshots, the outputs at the end."""

    def __init__(self, cfg: Training, d: Dist, state: TrainState, nets: Networks, cost: CostMeter, paths: TrainPaths):
        self.cfg, self.d, self.state, self.nets, self.cost, self.paths = cfg, d, state, nets, cost, paths
        self.peak = peak_tflops(cost.device, precision_of(cfg.bf16, cfg.tf32))[0]
        self.events = TensorBoard(state.files.tensorboard, state.iteration) if d.main else None

    def save_state(self) -> None:
        """The resumable state, if the weights are still finite (else the last good one stays)."""
        if not self.state.weights_finite():
            raise TrainingDiverged(f"weights became non-finite by iteration {self.state.iteration}; the last good "
                                   f"state is kept in {self.paths.state} (not overwritten)")
        if self.d.main:
            self.state.save()
        self.d.barrier()

    def tick(self, losses: list[float], iterations: int, wall_s: float, train_s: float) -> None:
        """One log line: the mean loss of the tick, throughput, memory, cost so far."""
        state, cfg = self.state, self.cfg
        tflops = iterations * self.cost.flops_per_iteration / max(train_s, 1e-9) / 1e12
        line = {"iteration": state.iteration, "kimg": state.iteration * cfg.batch / 1000,
                "loss": float(np.mean(losses)), "stage": cfg.stage_at(state.iteration - 1),
                "lr": cfg.lr_at(state.iteration - 1), "img_per_s": iterations * cfg.batch / max(wall_s, 1e-9),
                "peak_mem_mb": _peak_memory_mb(self.d.device), **self.cost.so_far(state), "tflops": tflops,
                "utilization": tflops / self.peak if self.peak else None}
        state.append_log(line)
        self.events.add(line)
        print(json.dumps(line), flush=True)

    def save_ema(self, path: Path, which=None, std=None) -> None:
        """An EMA (by default the output one) as our checkpoint, with the run's cost so far in its meta."""
        cfg, state = self.cfg, self.state
        which, std = (self.nets.output_ema, cfg.output_ema_std) if which is None else (which, std)
        meta = {"producer": f"ect {'tune' if cfg.objective == 'ect' else 'pretrain'}", "iteration": state.iteration,
                "kimg": state.iteration * cfg.batch / 1000,
                "ema": f"power function, sigma_rel {std:g}" if std else f"classic, beta {cfg.ema_decay():g}",
                "ema_beta": None if std else cfg.ema_decay(), "ema_std": std or None,
                "config_digest": cfg.digest(), "dataset": str(self.paths.data), **self.cost.so_far(state),
                "flops_per_iteration": float(self.cost.flops_per_iteration), "device": self.cost.device,
                **self.nets.init_meta}
        save_checkpoint(path, self.nets.arch, which.state_dict(), meta)

    def publish(self, no_peak_reason: str | None) -> None:
        """The end of a run: snapshots, log, every EMA (for post-hoc choices), then the output."""
        self.events.close()
        if no_peak_reason:
            print(f"utilisation not reported: {no_peak_reason}", file=sys.stderr)
        if self.paths.snapshots is not None:
            _publish_snapshots(self.state.files.snapshots, self.paths.snapshots)
        if self.paths.log is not None:
            log = self.state.log_path
            write_text_atomic(self.paths.log, log.read_text() if log.exists() else "")
        if self.cfg.pf_ema_stds:
            for std, e in zip((0.0, *self.cfg.pf_ema_stds), (self.nets.ema, *self.nets.pf_emas), strict=True):
                self.save_ema(self.state.files.ema(std), e, std)
            if self.paths.emas is not None:
                _publish_snapshots(self.state.files.ema(0.0).parent, self.paths.emas)
        self.save_ema(self.paths.out)


def run_iterations(cfg: Training, d: Dist, stop: StopFlag, state: TrainState, step: TrainStep, writer: Publisher,
                   progress: bool) -> None:
    """Iterate until the budget is spent: each iteration is checked, counted and timed; ticks, snapshots and
    states follow at their own cadence. A signal saves the state and stops (exit 75)."""
    tick_every, state_every = cfg.every_iters(cfg.tick_kimg), cfg.every_iters(cfg.state_kimg)
    snapshot_every = cfg.every_iters(cfg.snapshot_kimg)
    bar = tqdm(total=cfg.total_iters, initial=state.iteration, unit="it", disable=not (progress and d.main),
               file=sys.stderr, desc=cfg.objective)
    tick_start, tick_first, tick_losses, tick_train_s = time.perf_counter(), state.iteration, [], 0.0
    while state.iteration < cfg.total_iters:
        if not d.all_true(stop.signum == 0):  # SIGTERM/SIGUSR1 on any process
            writer.save_state()
            raise Preempted(f"received signal {stop.signum}: state saved at iteration {state.iteration} in "
                            f"{state.dir}; rerun the same command to resume")
        started = time.perf_counter()
        loss = step(state.iteration)
        step_s = time.perf_counter() - started  # the run's training time: saving and logging excluded
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at iteration {state.iteration}; the last good state "
                                   f"is kept in {state.dir} (not overwritten)")
        state.elapsed_s += step_s
        tick_train_s += step_s
        state.iteration += 1
        bar.update(1)
        tick_losses.append(loss)
        if d.main and (state.iteration % tick_every == 0 or state.iteration == cfg.total_iters):
            writer.tick(tick_losses, state.iteration - tick_first, time.perf_counter() - tick_start, tick_train_s)
            tick_start, tick_first, tick_losses, tick_train_s = time.perf_counter(), state.iteration, [], 0.0
        if d.main and snapshot_every and state.iteration % snapshot_every == 0:
            writer.save_ema(state.files.snapshots / snapshot_name(state.iteration * cfg.batch))
        if state_every and state.iteration % state_every == 0 and state.iteration < cfg.total_iters:
            writer.save_state()
    bar.close()


@dataclass
class TrainStep:
    """One iteration: this process's share of the global batch in micro-batches (gradients accumulated,
    synchronised on the last), the optimiser step, the EMA update. Returns the batch's mean loss."""

    cfg: Training
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

    @classmethod
    def of(cls, cfg: Training, d: Dist, student, ema, pf_emas, optimizer, images, labels, per_rank: int,
           micro: int) -> TrainStep:
        """The step with the throughput options of ``cfg``: DDP over several processes, torch.compile of the
        student's passes (the states hold the plain network), channels-last batches, bfloat16 autocast."""
        model = torch.nn.parallel.DistributedDataParallel(student) if d.world > 1 else student
        model = torch.compile(model) if cfg.compile else model
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        return cls(cfg, d, model, student, ema, pf_emas, optimizer, images, labels, per_rank, micro, memory_format,
                   torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.bf16))

    def __call__(self, iteration: int) -> float:
        cfg, d = self.cfg, self.d
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(iteration)
        # The global batch (the same images and noise whatever the number of processes); this process's share.
        indices = batch_indices(cfg.seed, iteration, cfg.batch, self.images.shape[0])
        t_normals, noise = batch_noise(cfg.seed, iteration, (cfg.batch, *self.images.shape[1:]))
        first = d.rank * self.per_rank
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=d.device)
        for micro_index, start in enumerate(range(first, first + self.per_rank, self.micro)):
            rows = slice(start, start + self.micro)
            torch.manual_seed(derived_seed(cfg.seed, Stream.DROPOUT, iteration, d.rank, micro_index))
            last = d.world == 1 or start + self.micro >= first + self.per_rank  # DDP syncs gradients on the last
            with contextlib.nullcontext() if last else self.model.no_sync():
                per_sample = self.micro_batch_loss(indices[rows], t_normals[rows], noise[rows], iteration)
                (per_sample.float().sum() / self.per_rank).backward()
            loss_sum += per_sample.detach().float().sum()
        mean_loss = loss_sum / self.per_rank
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

    def micro_batch_loss(self, indices, t_normals, noise, iteration: int) -> torch.Tensor:
        """The per-sample loss of one micro-batch: images in [-1, 1], their noise, (conditional) one-hot labels."""
        cfg, device = self.cfg, self.d.device
        images = (self.images[indices].to(device, torch.float32) / 127.5 - 1).contiguous(
            memory_format=self.memory_format)
        t_normals, noise = t_normals.to(device), noise.to(device)
        labels = (None if self.labels is None else
                  torch.nn.functional.one_hot(self.labels[indices], self.net.label_dim).to(device, torch.float32))
        with self.autocast:
            if cfg.objective == "ect":
                return ect_loss(self.model, self.net, images, t_normals, noise, cfg.stage_at(iteration), cfg.loss,
                                labels)[0]
            # an EDM2 network with a log-variance head trains with EDM2's uncertainty weighting
            return edm_loss(self.model, images, t_normals, noise, cfg.loss, labels,
                            uncertainty=getattr(self.net, "logvar_channels", 0) > 0)


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


def run_cli(cfg: Training, **kwargs) -> int:
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
