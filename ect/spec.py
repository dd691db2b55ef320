"""The run spec: every setting of a run, its default, bounds and meaning, declared once.

A run is a preset (``config/<preset>.yaml``, which may overlay a base under ``config/base/``) plus any
overlays, merged in order (``ect/config.py`` reads the files). :func:`load_spec` builds the
:class:`RunSpec` from them once; building checks every value and every cross-field rule and raises one
:class:`ConfigError` naming the key. Snakemake builds it when it plans the workflow, so a bad value stops
``snakemake -n`` before any job is queued; every ``ect`` step builds the same spec from the same files.

The JSON schema of the config (``json_schema()``, in ``docs/config.md`` and used by editors) is written
from these declarations; so are the network options (the network constructors' annotated parameters,
``ect/networks.py``). Each step reads only the settings it declares (``STEP_READS``): it is handed a
view of the spec that refuses anything else, and its declared settings are its rerun trigger in
Snakemake and its params in DVC.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import posixpath
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from ect.layout import SAMPLE_SETS
from ect.metrics import FID_MODES, INCEPTION_FILE
from ect.typed import Bound, ConfigError, Mapping, When, build, json_schema, plain, setting

NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
SIZE_NAME = r"[A-Za-z0-9]+"
PRESET_NAME = r"[a-z0-9][a-z0-9-]{0,60}"  # config/<name>.yaml
URL = Bound(pattern=r"https?://[A-Za-z0-9._~:/%+=-]+")  # it goes into shell commands: nothing to quote
SHA256, MD5 = Bound(pattern=r"[0-9a-f]{64}"), Bound(pattern=r"[0-9a-f]{32}")
POSITIVE, AT_LEAST_ONE, NON_NEGATIVE = Bound(gt=0), Bound(ge=1), Bound(ge=0)
MAX_SEEDS = 10_000_000  # one sampling job's seeds: 30 GB of 32x32 RGB images; split larger jobs
TOFU = ("null when no publisher gives a checksum: the file is then fetched trust on first use, its sha256 "
        "recorded in downloads.lock (commit it) by the first fetch and verified by every later one")


class NetworkOptions:
    """``arch``: network kwargs (overrides of a teacher's, or a whole pretraining network). Each key must
    be an option of EDM's or EDM2's network, with a value that network accepts (``ect/networks.py``)."""

    def check(self, value, path: str) -> dict:
        from ect.networks import ArchError, check_arch_options

        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {str(value)[:60]!r} is not of type 'object'")
        try:
            check_arch_options(value)
        except ArchError as exc:  # "network option <key>: ..." names the key under this path
            message = str(exc)
            named = message.startswith(OPTION_PREFIX)
            raise ConfigError(f"{path}.{message.removeprefix(OPTION_PREFIX)}" if named else f"{path}: {message}") from None
        return dict(value)

    def schema(self, defs: dict) -> dict:
        from ect.networks import arch_option_schema

        return arch_option_schema(defs)


Arch = Annotated[dict[str, Any], NetworkOptions()]
OPTION_PREFIX = "network option "  # how ect/networks.py's errors about one option begin


# ---------------------------------------------------------------------------------------------
# Data, teacher, downloads.

@dataclass(frozen=True)
class Dataset:
    """The training images (and the FID reference statistics come from them)."""

    CONDITIONS: ClassVar = (When("source", "cifar10", require=("url", "md5"), equal={"resolution": 32}),
                            When("source", "imagenet", require=("path",)))
    source: Literal["digits", "cifar10", "imagenet"] = setting(
        doc="digits: scikit-learn's bundled handwritten digits (offline); cifar10: the official python tarball; "
            "imagenet: a local copy (path)")
    resolution: int = setting(doc="image size in pixels", ge=8, multiple_of=8)
    path: str | None = setting(None, "imagenet: the ILSVRC2012 training folder (or its tar), or EDM2's prepared "
                                     "zip; it goes into shell commands, so only characters that need no quoting",
                               pattern=r"[A-Za-z0-9._~/+=:@,-]+")
    expected_count: int | None = setting(None, "imagenet: the number of images the source must hold (1281167)",
                                         ge=1)
    url: str | None = setting(None, "the archive to download (cifar10)", URL)
    md5: str | None = setting(None, "the archive's md5", MD5)
    sha256: str | None = setting(None, TOFU, SHA256)
    size: int | None = setting(None, "the archive's size in bytes; a download of any other size is refused", ge=1)
    note: str | None = setting(None, "where the checksums come from")


@dataclass(frozen=True)
class Download:
    """A file to download: a teacher pickle of a scaling study's size."""

    url: str = setting(doc="an http(s) URL", bound=URL)
    sha256: str | None = setting(doc=TOFU, bound=SHA256)
    size: int | None = setting(None, "the file's size in bytes; a download of any other size is refused", ge=1)
    note: str | None = setting(None, "where the checksum comes from")


@dataclass(frozen=True)
class Teacher:
    """The diffusion model ECT starts from."""

    CONDITIONS: ClassVar = (When("source", "edm", require=("url", "sha256"), nullable=("sha256",)),)
    source: Literal["pretrain", "edm"] = setting(
        doc="pretrain: train a small teacher (toy); edm: download an EDM or EDM2 pickle and convert it")
    url: str | None = setting(None, "the pickle's http(s) URL", URL)
    sha256: str | None = setting(None, TOFU, SHA256)
    size: int | None = setting(None, "the file's size in bytes", ge=1)
    note: str | None = setting(None, "where the checksum comes from")
    pretraining_kimg: float | None = setting(
        None, "a downloaded teacher's pretraining budget (thousands of images), shown beside the tuning cost; "
              "EDM2's files name it (edm2-img64-s-1073741-...: 1,073,741 kimg)", gt=0)


# ---------------------------------------------------------------------------------------------
# Training: the loss, then the options of `ect pretrain` and `ect tune`.

@dataclass(frozen=True)
class EDMLoss:
    """EDM's denoising loss (pretraining a teacher): ln σ ~ N(P_mean, P_std²)."""

    P_mean: float = setting(-1.2, "mean of ln σ")
    P_std: float = setting(1.2, "standard deviation of ln σ", gt=0)
    sigma_data: float = setting(0.5, "the data's standard deviation", gt=0)


@dataclass(frozen=True)
class ECTLoss:
    """ECT's objective (docs/method.md, "The objective"): t from ln t ~ N(P_mean, P_std²), r = t(1 - d n(t))
    with d = q^-(stage+1), a stage every ``double`` iterations."""

    P_mean: float = setting(-1.1, "mean of ln t")
    P_std: float = setting(2.0, "standard deviation of ln t", gt=0)
    mapping: Literal["sigmoid", "const"] = setting("sigmoid", "n(t): 1 + k sigmoid(-b t), or 1")
    q: float = setting(2.0, "the t-r gap shrinks by q each stage", gt=1)
    k: float = setting(8.0, "n(t)'s scale ('sigmoid')")
    b: float = setting(1.0, "n(t)'s slope ('sigmoid')")
    c: float = setting(0.0, "0: un-squared L2 distance; > 0: pseudo-Huber with this c", ge=0)
    weighting: Literal["ect", "snrpk"] = setting("ect", "ect: 1/(t - r) (CIFAR-10); snrpk: 1/t² + 1/σ_d² (ImageNet)")
    double: int = setting(25000, "iterations per stage", ge=1)
    sigma_data: float = setting(0.5, "the data's standard deviation", gt=0)

    def stage_at(self, iteration: int) -> int:
        """The stage in effect at (0-based) ``iteration``: it advances every ``double`` iterations."""
        return iteration // self.double


# Options that decide only when a run logs and saves its resumable state, never what it computes: a run
# resumes under other values, and changing them reruns no step.
CADENCE_KEYS = ("tick_kimg", "state_kimg")
ADDED_OPTIONS: tuple = ()  # options added after this digest format: they count in the digest only when set


@dataclass(frozen=True)
class Training:
    """Options of a training run (``ect pretrain`` / ``ect tune``)."""

    objective: ClassVar[str]
    kimg: float = setting(doc="training length in thousands of images", gt=0)
    batch: int = setting(doc="global batch, whatever the number of processes", ge=1)
    batch_gpu: int = setting(0, "per-process micro-batch (0 = batch / processes); gradients accumulate", ge=0)
    optimizer: Literal["radam", "adam"] = setting("radam", "the optimiser")
    lr: float = setting(1e-4, "learning rate", gt=0)
    betas: tuple[float, ...] = setting((0.9, 0.999), "the optimiser's betas", min_items=2, max_items=2,
                                       items=Bound(ge=0, lt=1))
    eps: float = setting(1e-8, "the optimiser's epsilon", gt=0)
    lr_schedule: Literal["constant", "isqrt"] = setting("constant", "isqrt: lr / sqrt(max(iteration / lr_decay_iters, 1))")
    lr_decay_iters: int = setting(2000, "the isqrt schedule's reference iteration", ge=1)
    ema_beta: float = setting(0.9999, "the classic EMA's decay per iteration", ge=0, lt=1)
    ema_halflife_kimg: float = setting(0.0, "> 0 overrides ema_beta: beta = 0.5 ** (batch / (halflife * 1000))", ge=0)
    seed: int = setting(0, "seeds every random stream of the run", ge=0, lt=2**63)
    tick_kimg: float = setting(12.8, "a log line every so many kimg", gt=0)
    snapshot_kimg: float = setting(0.0, "> 0: an EMA snapshot every so many kimg (the FID curve's points)", ge=0)
    state_kimg: float = setting(128.0, "the resumable state every so many kimg", ge=0)
    bf16: bool = setting(False, "bfloat16 autocast")
    tf32: bool = setting(False, "TF32 matrix products and convolutions on CUDA")
    channels_last: bool = setting(False, "channels-last memory format")
    compile: bool = setting(False, "torch.compile the student's training passes (compiled once per process, at start)")
    grad_posinf: float = setting(1e5, "what an infinite gradient becomes (NaN becomes 0): 1e5 (EDM/ECT CIFAR-10) "
                                      "or 0 (ECT ImageNet)", ge=0)
    pf_ema_stds: tuple[float, ...] = setting((), "relative standard deviations of EDM2's power-function EMAs "
                                                 "tracked beside the classic one (ECT ImageNet: 0.010, 0.050, 0.100)",
                                             max_items=8, items=Bound(gt=0, le=0.28))
    output_ema_std: float = setting(0.0, "which EMA is the output and the snapshots: 0 the classic one, else one "
                                         "of pf_ema_stds", ge=0)
    arch: Arch = setting({}, "network kwargs: a whole network (pretrain) or overrides of the teacher's (tune)")

    def __post_init__(self):
        if self.batch_gpu and self.batch % self.batch_gpu:
            raise ConfigError(f"batch_gpu: {self.batch_gpu} does not divide the batch {self.batch}")
        if self.output_ema_std and self.output_ema_std not in self.pf_ema_stds:
            raise ConfigError(f"output_ema_std: {self.output_ema_std} is not one of pf_ema_stds "
                              f"{list(self.pf_ema_stds)} (0 selects the classic EMA)")

    @classmethod
    def from_dict(cls, options: dict):
        """The options of a training section from plain data, every value checked."""
        return build(cls, options, "tune" if cls.objective == "ect" else "pretrain")

    @property
    def total_iters(self) -> int:
        return max(1, round(self.kimg * 1000 / self.batch))

    def every_iters(self, kimg: float) -> int:
        """Iterations between events every ``kimg`` (0: never)."""
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
        """The ECT stage in effect at (0-based) ``iteration`` (pretraining has none)."""
        return self.loss.stage_at(iteration) if self.objective == "ect" else 0

    def digest(self) -> str:
        """What the run computes: every option but CADENCE_KEYS (options added later count only when set).
        A state resumes only under the same digest."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in ADDED_OPTIONS}
        computed = {k: v for k, v in plain(self).items()
                    if k not in CADENCE_KEYS and not (k in defaults and v == plain(defaults[k]))}
        text = json.dumps({"objective": self.objective, **computed}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Pretrain(Training):
    """`ect pretrain`: a small EDM or EDM2 teacher trained from scratch with EDM's loss (toy presets)."""

    objective: ClassVar[str] = "edm"
    loss: EDMLoss = setting(EDMLoss(), "EDM's denoising loss")


@dataclass(frozen=True)
class Tune(Training):
    """`ect tune`: ECT from the teacher; the student is the teacher's network with ``arch``'s overrides."""

    objective: ClassVar[str] = "ect"
    loss: ECTLoss = setting(ECTLoss(), "ECT's objective")


# ---------------------------------------------------------------------------------------------
# Sampling, FID, the report.

@dataclass(frozen=True)
class Sample:
    """The sample sets: every model draws seeds 0 .. sets * samples_per_set - 1."""

    sets: int = setting(doc="FID is reported as min and mean over this many sample sets", ge=1)
    samples_per_set: int = setting(doc="images per set", ge=2)
    t_mid: tuple[float, ...] = setting((0.821,), "intermediate time(s) of multi-step consistency sampling, in (0, 80)",
                                       min_items=1, items=Bound(gt=0, lt=80))
    heun_steps: int = setting(18, "teacher baseline: EDM Heun steps (2n-1 evaluations)", ge=2)
    batch: int = setting(256, "images per forward pass", ge=1)
    class_labels: Literal["dataset", "uniform"] | None = setting(
        None, "set it for a class-conditional model (and only then): each seed's class is the label of a uniformly "
              "drawn training image (dataset: the training set's class frequencies, ECT's protocol) or a uniform "
              "class (EDM2's)")

    def __post_init__(self):
        if self.sets * self.samples_per_set > MAX_SEEDS:
            raise ConfigError(f"sets: {self.sets} x samples_per_set {self.samples_per_set} is more than one job's "
                              f"{MAX_SEEDS:,} seeds")


@dataclass(frozen=True)
class FeatureNet:
    """The network whose features FID compares."""

    CONDITIONS: ClassVar = (When("kind", "inception", require=("url", "sha256"), nullable=("sha256",)),)
    kind: Literal["digits-classifier", "inception"] = setting(
        doc="digits-classifier: trained by a rule (toy); inception: clean-fid's inception-2015-12-05.pt")
    seed: int = setting(0, "digits-classifier: its training seed", ge=0, lt=2**63)
    epochs: int = setting(15, "digits-classifier: its training epochs", ge=1)
    url: str | None = setting(None, "inception: the TorchScript file's URL", URL)
    sha256: str | None = setting(None, TOFU, SHA256)
    size: int | None = setting(None, "the file's size in bytes", ge=1)
    note: str | None = setting(None, "where the checksum comes from")

    def __post_init__(self):
        if self.kind == "inception" and posixpath.basename(self.url) != INCEPTION_FILE:
            raise ConfigError(f"url: clean-fid loads Inception from a file named {INCEPTION_FILE}, not "
                              f"{posixpath.basename(self.url)[:80]!r}")




@dataclass(frozen=True)
class Fid:
    """How samples are scored."""

    feature_net: FeatureNet = setting(doc="the feature network")
    modes: tuple[Literal[FID_MODES], ...] = setting(
        doc="clean-fid modes; the first is the headline number (legacy_tensorflow = the paper's protocol)",
        min_items=1, unique=True)
    curve_samples: int = setting(doc="samples per snapshot for FID against training budget", ge=2, le=MAX_SEEDS)
    curve_steps: tuple[int, ...] = setting(doc="consistency steps scored at every snapshot", min_items=1,
                                           items=Bound(ge=1))
    reference_shards: int = setting(1, "split the dataset's reference statistics into this many jobs, merged after "
                                       "(ImageNet: 1.28M images)", ge=1, le=1024)
    published_reference: Download | None = setting(
        None, "the reference statistics a paper's authors published for this dataset and feature network (EDM's "
              "fid-refs/cifar10-32x32.npz): ours are compared with them before samples are spent (a Frechet "
              "distance below 0.01 passes)")
    dinov2: Download | None = setting(
        None, "DINOv2 ViT weights (dinov2_vitl14_pretrain.pth): every sample set, curve point and scaling point is "
              "also scored with FD_DINOv2, EDM2's protocol (class token at 224 px); null: FID only")

    def __post_init__(self):
        if self.feature_net.kind == "digits-classifier" and self.modes != ("clean",):
            raise ConfigError(f"modes: the digits-classifier feature network supports only ['clean'], not "
                              f"{list(self.modes)}")


SET_NAMES = tuple(SAMPLE_SETS)
TUNED_SETS = tuple(name for name, s in SAMPLE_SETS.items() if s.checkpoint == "tuned")
STATISTICS = ("mean", "min")  # of a number's FID sets: the mean over sets, or the minimum (as EDM reports)
TOLERANCE = 0.05  # a number within 5 % of the paper's is reproduced (and a budget may be overrun by 5 %)


@dataclass(frozen=True)
class Claim:
    """A published FID, at the tuning budget it was published at, that the run is judged against."""

    set: Literal[SET_NAMES] = setting(doc="which model and sampler: one of the run's sample sets")
    fid: float = setting(doc="the published FID", gt=0)
    source: str = setting(doc="where it is published (paper, table, README), as precisely as known")
    kimg: float | None = setting(None, "the tuning budget it was published at (kimg): a snapshot of this run, scored "
                                       "with the full protocol; null: the run's final model", gt=0)
    statistic: Literal[STATISTICS] = setting("mean", "which statistic of our FID sets it is compared with: the "
                                                     "mean over sets, or the minimum (as EDM reports)")
    secondary: bool = setting(False, "quoted by another paper, not read in the original: the report marks it")
    model: str | None = setting(None, "a scaling study's run the number is about (scaling.models, e.g. XL-batch1024): "
                                      "judged from that run's point at its final budget", pattern=r"[A-Za-z0-9-]{1,60}")


@dataclass(frozen=True)
class Budget:
    """A claim that a FID is reached within a compute budget, judged from the tuning snapshots on the named
    device only: time-to-FID and the best FID within the budget."""

    gpu_hours: float = setting(doc="GPU-hours", gt=0)
    device: str = setting(doc="a GPU model, as torch names it (e.g. A100)", pattern=r"[A-Za-z0-9 ._-]{1,40}")
    fid: float = setting(doc="the FID the claim says is reached within the budget", gt=0)
    source: str = setting(doc="where the claim is published")
    set: Literal[TUNED_SETS] = setting("ect-2step", "which sampler the claim is about")
    statistic: Literal[STATISTICS] = setting("mean", "which statistic of the full-protocol sets is compared")


@dataclass(frozen=True)
class Paper:
    """The paper's numbers for this preset (the toy accepts them too, to exercise the verdicts)."""

    source: str = setting(doc="where the numbers come from, in general")
    claims: tuple[Claim, ...] = setting((), "every published number this run is judged against")
    budget: Budget | None = setting(None, "the compute budget a claim names")
    protocol: str | None = setting(None, "how the paper computes its numbers (sets, samples, when)")
    statement: str | None = setting(None, "the paper's claim in its words (a scaling study's report shows it)")


@dataclass(frozen=True)
class Report:
    """The HTML report."""

    paper: Paper | None = setting(doc="the paper's numbers for this preset, or null when the run is not "
                                      "comparable (toy)")
    title: str | None = setting(None, "the report's title")


# ---------------------------------------------------------------------------------------------
# A scaling study; resources.

@dataclass(frozen=True)
class SizeTune:
    """Overrides of the tune section for one size of a scaling study."""

    lr: float | None = setting(None, "its learning rate", gt=0)
    ema_beta: float | None = setting(None, "its classic EMA decay", ge=0, lt=1)
    batch_gpu: int | None = setting(None, "its per-process micro-batch", ge=0)
    arch: Arch = setting({}, "overrides of its student's network")


@dataclass(frozen=True)
class ScalingSeeds:
    """Training repeated with other seeds at chosen budgets: the run-to-run spread beside the set-to-set one."""

    count: int = setting(doc="runs at each of these budgets, the study's own run being the first (seed tune.seed); "
                             "run k trains with seed tune.seed + k", ge=2, le=16)
    budgets_kimg: tuple[float, ...] = setting(doc="budgets of scaling.budgets_kimg that the extra runs reach",
                                              min_items=1, unique=True, items=POSITIVE)
    sizes: tuple[str, ...] | None = setting(None, "the sizes repeated (default: every size)", unique=True, min_items=1)


@dataclass(frozen=True)
class ScalingBatches:
    """Compute grown by the batch at a fixed iteration count, the paper's design: each batch is a run of its
    own that completes the whole curriculum (ECT's stages are counted in iterations), scored at its end."""

    sizes: tuple[str, ...] = setting(doc="the sizes grown this way", min_items=1, unique=True)
    batch: tuple[int, ...] = setting(doc="the global batches, a run each", min_items=1, unique=True, items=AT_LEAST_ONE)
    iterations: int = setting(doc="iterations of every such run: its budget is batch x iterations / 1000 kimg", ge=1)


@dataclass(frozen=True)
class ScalingModel:
    """One training run of a scaling study (not a setting: derived from the scaling section). Its name is its
    size's (the study's own run), ``<size>-seed<k>`` or ``<size>-batch<b>``."""

    size: str
    design: str  # "prefix": its budget points are snapshots of it; "batch": one point, its end
    seed_offset: int = 0  # trains with tune.seed + seed_offset
    batch: int | None = None  # None: tune.batch
    kimg: float | None = None  # None: tune.kimg


@dataclass(frozen=True)
class Scaling:
    """A scaling study: a model per size (its own teacher), each tuned for tune.kimg; its snapshots at
    budgets_kimg are the budget points. Beside them, runs repeated with other seeds (seeds) and runs whose
    compute grows with their batch (batches). `snakemake scaling` runs it."""

    sizes: Annotated[dict[str, Arch], Mapping(keys=SIZE_NAME, min_items=1)] = setting(
        doc="size name -> overrides of the pretraining arch (a preset with a downloaded teacher: {} only)")
    budgets_kimg: tuple[float, ...] = setting(
        doc="the budget points, in kimg of tuning; each a multiple of tune.snapshot_kimg", min_items=1, unique=True,
        items=POSITIVE)
    samples: int = setting(doc="samples per FID set of a point", ge=2)
    sets: int = setting(doc="FID sets per point, at least 3 (the fit's bootstrap redraws them)", ge=3)
    seeds: ScalingSeeds | None = setting(None, "training repeated with other seeds at some budgets")
    batches: ScalingBatches | None = setting(None, "runs whose compute grows with their batch, at fixed iterations")
    reuse: Annotated[dict[str, Annotated[str, Bound(pattern=PRESET_NAME)]], Mapping(keys=SIZE_NAME)] | None = setting(
        None, "size name -> a preset (config/<name>.yaml) whose run is this size's model: its snapshots are the "
              "budget points, nothing is trained again under another name; the preset's dataset, teacher, tune and "
              "fid sections must equal this one's")
    teachers: Annotated[dict[str, Download], Mapping(keys=SIZE_NAME)] | None = setting(
        None, "a downloaded teacher per size (EDM2's S/M/L/XL); every size needs one")
    tune: Annotated[dict[str, SizeTune], Mapping(keys=SIZE_NAME)] | None = setting(
        None, "size name -> overrides of the tune section for that size (its own learning rate, dropout, batch)")

    def __post_init__(self):
        for key in ("teachers", "tune", "reuse"):
            extra = sorted(set(getattr(self, key) or {}) - set(self.sizes))
            if extra:
                raise ConfigError(f"{key}: names sizes {extra} that scaling.sizes does not have")
        for key, section in (("seeds", self.seeds), ("batches", self.batches)):
            extra = sorted(set((section.sizes or ()) if section else ()) - set(self.sizes))
            if extra:
                raise ConfigError(f"{key}.sizes: {extra} are not sizes of scaling.sizes")
        if self.seeds and set(self.seeds.budgets_kimg) - set(self.budgets_kimg):
            raise ConfigError(f"seeds.budgets_kimg: {sorted(set(self.seeds.budgets_kimg) - set(self.budgets_kimg))} "
                              "are not budgets of scaling.budgets_kimg")
        if "size" in self.sizes:
            raise ConfigError("sizes: 'size' names the fit across sizes (fit-size-<n>step.json); call it otherwise")
        if self.sets * self.samples > MAX_SEEDS:
            raise ConfigError(f"sets: {self.sets} x samples {self.samples} is more than {MAX_SEEDS:,} seeds")

    @property
    def models(self) -> dict[str, ScalingModel]:
        """Every training run of the study, by name: a run per size, its seed repeats, its batch-grown runs."""
        out = {size: ScalingModel(size, "prefix") for size in self.sizes}
        if self.seeds:
            for size in self.seeds.sizes or self.sizes:
                out |= {f"{size}-seed{k}": ScalingModel(size, "prefix", seed_offset=k, kimg=max(self.seeds.budgets_kimg))
                        for k in range(1, self.seeds.count)}
        if self.batches:
            for size in self.batches.sizes:
                out |= {f"{size}-batch{b}": ScalingModel(size, "batch", batch=b, kimg=b * self.batches.iterations / 1000)
                        for b in self.batches.batch}
        return out

    def budgets_of(self, model: str) -> tuple[float, ...]:
        """The budget points (kimg) of one of the study's runs."""
        m = self.models[model]
        if m.design == "batch":
            return (m.kimg,)
        return self.seeds.budgets_kimg if m.seed_offset else self.budgets_kimg


# Every rule of the workflow that takes resources (a test keeps this equal to workflow/rules/).
RULES = ("fetch_dataset", "dataset", "fetch_teacher", "teacher", "fetch_feature_net", "fetch_dinov2", "feature_net",
         "fid_reference",
         "fid_reference_merge", "pretrain", "tune", "sample", "fid", "fid_curve", "fid_snapshot", "fid_emas", "fid_budget",
         "fetch_published_reference", "reference_check", "scaling_point", "scaling_points", "scaling_fit", "report")


@dataclass(frozen=True)
class Resources:
    """A rule's resources (the SLURM profile turns them into sbatch options)."""

    runtime: int | None = setting(None, "minutes", ge=1)
    mem_mb: int | None = setting(None, "memory in MB", ge=1)
    threads: int | None = setting(None, "CPU cores (cpus_per_task) and torch threads", ge=1)
    gpu: int | None = setting(None, "GPUs (on each node)", ge=0)
    nodes: int | None = setting(None, "nodes (tune only: one launcher a node, torchrun over all of them)", ge=1,
                                le=4096)
    gpu_model: str | None = setting(None, "a GPU model the cluster knows", pattern=r"[A-Za-z0-9_.-]{1,40}")
    partition: str | None = setting(None, "the SLURM partition (sbatch -p); unset: the cluster's default partition",
                                    pattern=r"[A-Za-z0-9_.-]{1,64}")


# ---------------------------------------------------------------------------------------------
# The run.

@dataclass(frozen=True)
class RunSpec:
    """One run of the pipeline: a preset plus any overlays, merged in order."""

    run: str = setting(doc="run name; every output lives under results/<run>/ and reports/<run>/", pattern=NAME)
    dataset: Dataset = setting(doc="the training images")
    teacher: Teacher = setting(doc="the model ECT starts from")
    tune: Tune = setting(doc="ECT tuning")
    sample: Sample = setting(doc="sampling")
    fid: Fid = setting(doc="scoring")
    report: Report = setting(doc="the report")
    resources: Annotated[dict[str, Resources], Mapping(names=("default", *RULES), min_items=1)] = setting(
        doc="per-rule resources; 'default' for every rule, a rule's name to override it")
    description: str | None = setting(None, "what the run is")
    base: str | None = setting(None, "a preset file this one overlays, relative to this file (config/base/...); "
                                     "read before it")
    pretrain: Pretrain | None = setting(None, "pretraining a teacher (teacher.source: pretrain)")
    scaling: Scaling | None = setting(None, "a scaling study")

    def __post_init__(self):
        for problem in run_problems(self):
            raise ConfigError(problem)

    def resources_of(self, rule: str) -> dict:
        """resources.default overridden by resources.<rule>, without unset values."""
        merged = {**plain(self.resources["default"]), **{k: v for k, v in plain(self.resources.get(
            rule, Resources())).items() if v is not None}}
        return {k: v for k, v in merged.items() if v is not None}

    def processes_of(self, rule: str) -> int:
        """How many training processes a rule's job runs: one a GPU (one a node without GPUs), on every node."""
        res = self.resources_of(rule)
        return max(1, res.get("gpu", 0)) * res.get("nodes", 1)



def training_options(spec, section: str, size: str | None = None, model: str | None = None) -> Training:
    """The options of ``pretrain`` or ``tune`` of a spec (or of a step's view of it), with a scaling study's
    size overrides applied (its pretraining arch, both sections, and its own tune entry), and for one of its
    ``model``s (scaling.models) that run's seed, batch and length."""
    options = getattr(spec, section)
    if options is None:
        raise ConfigError(f"the config has no '{section}' section")
    if model is not None:
        models = spec.scaling.models if spec.scaling else {}
        if model not in models:
            raise ConfigError(f"model {model!r} is not one of the scaling study's runs ({', '.join(models) or 'none'})")
        run = models[model]
        sized = training_options(spec, section, run.size)
        return dataclasses.replace(sized, seed=sized.seed + run.seed_offset, batch=run.batch or sized.batch,
                                   kimg=run.kimg or sized.kimg,
                                   snapshot_kimg=run.kimg if run.design == "batch" else sized.snapshot_kimg)
    if size is None:
        return options
    sizes = spec.scaling.sizes if spec.scaling else {}
    if size not in sizes:
        raise ConfigError(f"size {size!r} is not one of scaling.sizes ({', '.join(sizes) or 'no scaling'})")
    own = (spec.scaling.tune or {}).get(size, SizeTune()) if section == "tune" else SizeTune()
    changes = {k: v for k, v in plain(own).items() if k != "arch" and v is not None}
    try:
        return dataclasses.replace(options, **changes, arch={**options.arch, **sizes[size], **own.arch})
    except ConfigError as exc:
        raise ConfigError(f"scaling.tune.{size} with tune: {exc}") from None


def run_problems(spec: RunSpec):
    """What no single section can check: yield one message per problem (the caller reports the first)."""
    if spec.teacher.source == "pretrain" and spec.pretrain is None:
        yield "top level: 'pretrain' is a required property when teacher.source is 'pretrain'"
    if "default" not in spec.resources:
        yield "resources: 'default' is a required property"
        return
    for key in ("runtime", "mem_mb", "threads"):
        if getattr(spec.resources["default"], key) is None:
            yield f"resources.default: '{key}' is a required property"
    for rule, res in spec.resources.items():
        if rule != "tune" and (res.nodes or 1) > 1:
            yield f"resources.{rule}.nodes: {res.nodes}: only tune runs over several nodes"
    for section in ("pretrain", "tune"):
        if getattr(spec, section) is not None:
            yield from _batch_problems(spec, section)
    yield from _network_problems(spec)
    yield from _scaling_problems(spec)
    if max(spec.fid.curve_steps) - 1 > len(spec.sample.t_mid):
        yield (f"fid.curve_steps asks for {max(spec.fid.curve_steps)} steps but sample.t_mid has "
               f"{len(spec.sample.t_mid)} intermediate times")
    yield from _claim_problems(spec)
    snapshot_every = spec.tune.every_iters(spec.tune.snapshot_kimg)
    if not spec.scaling and not 0 < snapshot_every <= spec.tune.total_iters:
        yield (f"tune.snapshot_kimg: {spec.tune.snapshot_kimg} gives no snapshot within tune.kimg {spec.tune.kimg} "
               "(the FID curve scores the snapshots)")


def is_snapshot(tune: Tune, kimg: float) -> bool:
    """Whether the tuning run writes an EMA snapshot after ``kimg`` thousand images."""
    every, iterations = tune.every_iters(tune.snapshot_kimg), kimg * 1000 / tune.batch
    return (kimg <= tune.kimg and every > 0 and abs(iterations - round(iterations)) < 1e-9
            and round(iterations) % every == 0)


def _claim_problems(spec: RunSpec):
    """Every published number must be one this run can score: its set's steps among fid.curve_steps, its
    budget a snapshot of the run (and only for the tuned model)."""
    paper = spec.report.paper
    if paper is None:
        return
    models = spec.scaling.models if spec.scaling else {}
    for i, claim in enumerate(paper.claims):
        where = f"report.paper.claims.{i}"
        if bool(spec.scaling) != (claim.model is not None):
            yield (f"{where}.model: a scaling study's claims name one of its runs ({', '.join(models)}), a run's "
                   "claims none" if spec.scaling else f"{where}.model: only a scaling study's claims name a run")
        elif claim.model is not None and (claim.model not in models or claim.set not in TUNED_SETS
                                          or claim.kimg is not None):
            yield (f"{where}: {claim.model!r} must be a run of scaling.models, the set a tuned one, and no kimg "
                   "(the run's final budget is judged)")
        elif claim.model is not None and SAMPLE_SETS[claim.set].steps not in spec.fid.curve_steps:
            yield f"{where}.set: {claim.set} is not among the steps a point is scored at (fid.curve_steps)"
        elif claim.kimg is not None and claim.set not in TUNED_SETS:
            yield f"{where}.kimg: {claim.set} is not tuned: its number has no tuning budget (leave kimg out)"
        elif claim.kimg is not None and claim.kimg != spec.tune.kimg:
            if not is_snapshot(spec.tune, claim.kimg):
                yield (f"{where}.kimg: {claim.kimg:g} is not a snapshot of the tuning run (tune.kimg {spec.tune.kimg:g}, "
                       f"a snapshot every tune.snapshot_kimg = {spec.tune.snapshot_kimg:g} kimg)")
            elif SAMPLE_SETS[claim.set].steps not in spec.fid.curve_steps:
                yield f"{where}.set: {claim.set} is not among the steps a snapshot is scored at (fid.curve_steps)"
    if paper.budget and SAMPLE_SETS[paper.budget.set].steps not in spec.fid.curve_steps:
        yield f"report.paper.budget.set: {paper.budget.set} is not among the steps of the FID curve (fid.curve_steps)"


def _processes(spec: RunSpec, section: str) -> str:
    res = spec.resources_of(section)
    gpus = f"resources.{section}.gpu = {max(1, res.get('gpu', 0))} GPUs"
    return f"{gpus} on each of resources.{section}.nodes = {res['nodes']} nodes" if res.get("nodes", 1) > 1 else gpus


def _batch_problems(spec: RunSpec, section: str):
    train = getattr(spec, section)
    gpus = spec.processes_of(section)
    if train.batch % gpus:
        yield f"{section}.batch {train.batch} does not split evenly over {_processes(spec, section)}"
    runs = [(size, None) for size in spec.scaling.sizes] if spec.scaling else [(None, None)]
    if spec.scaling and section == "tune":
        runs += [(None, model) for model, run in spec.scaling.models.items() if run.batch]
    for size, model in runs:
        options = training_options(spec, section, size, model)
        micro, batch = options.batch_gpu, options.batch
        if batch % gpus:
            yield f"scaling.batches.batch {batch} does not split evenly over {_processes(spec, section)}"
        elif micro and (batch // gpus) % micro:
            where = f"scaling.tune.{size}.batch_gpu" if size and micro != train.batch_gpu else f"{section}.batch_gpu"
            yield (f"{where} {micro} does not divide the per-process batch {batch // gpus} "
                   f"({section}.batch {batch} over {gpus} processes{f', run {model}' if model else ''})")


def _network_problems(spec: RunSpec):
    """A pretrained teacher's network, and the student made from it, are known now: check them whole (a
    downloaded teacher's network is known when it is converted)."""
    from ect.networks import ArchError, check_arch, student_arch

    if spec.pretrain is None:
        return
    for size in (spec.scaling.sizes if spec.scaling else [None]):
        teacher = {"img_resolution": spec.dataset.resolution, **training_options(spec, "pretrain", size).arch}
        for section, arch in (("pretrain", teacher), ("tune", student_arch(teacher, training_options(spec, "tune", size).arch))):
            try:
                check_arch(arch)
            except ArchError as exc:
                yield f"{section}.arch{f' (size {size})' if size else ''}: {exc}"


def _scaling_problems(spec: RunSpec):
    """A scaling study's budgets must be snapshots of its tuning runs, and enough of them to fit."""
    scaling = spec.scaling
    if not scaling:
        return
    if len(scaling.budgets_kimg) < 3:
        yield f"scaling.budgets_kimg has {len(scaling.budgets_kimg)} points; a power law per size needs at least 3"
    for model in scaling.models:
        options = training_options(spec, "tune", model=same_run(spec, model) or model)
        for kimg in scaling.budgets_of(model):
            if not is_snapshot(options, kimg):
                where = "scaling.budgets_kimg" if model in scaling.sizes else "scaling.seeds.budgets_kimg"
                yield (f"{where}: {kimg:g} is not a snapshot of run {model} (tune.kimg {options.kimg:g}, a snapshot "
                       f"every tune.snapshot_kimg = {options.snapshot_kimg:g} kimg)")
    downloaded = spec.teacher.source != "pretrain"
    if downloaded and any(scaling.sizes.values()):
        yield ("scaling.sizes: a downloaded teacher brings its architecture; its sizes take no arch overrides ({}): "
               "give each size its own download in scaling.teachers")
    if scaling.teachers is not None and (not downloaded or set(scaling.teachers) != set(scaling.sizes)):
        yield ("scaling.teachers: a download for every size of scaling.sizes, and only with a downloaded teacher "
               "(teacher.source: edm)")
    if scaling.teachers is None and downloaded and len(scaling.sizes) > 1:
        yield "scaling.sizes: several sizes with a downloaded teacher need a teacher each (scaling.teachers)"


def reused_runs(spec) -> dict[str, RunSpec]:
    """The runs a scaling study takes its points from instead of training them (scaling.reuse), by size: each
    preset's spec, read from config/<name>.yaml under the working directory (the repository root), checked to
    be the run this study would train."""
    reuse = spec.scaling.reuse if spec.scaling else None
    out = {}
    for size, preset in (reuse or {}).items():
        other = _preset_spec(preset)
        problem = next(_reuse_problems(spec, other, size), None)
        if problem:
            raise ConfigError(f"scaling.reuse.{size}: config/{preset}.yaml {problem}")
        out[size] = other
    return out


def _preset_spec(preset: str) -> RunSpec:
    """The spec of config/<preset>.yaml under the working directory (cached by its absolute path)."""
    return _spec_of_file(os.path.abspath(f"config/{preset}.yaml"))


@functools.lru_cache(maxsize=16)
def _spec_of_file(path: str) -> RunSpec:
    return load_spec(path)


def _reuse_problems(spec: RunSpec, other: RunSpec, size: str):
    if other.scaling:
        yield "is a scaling study itself"
    for section in ("dataset", "teacher"):
        if getattr(other, section) != getattr(spec, section):
            yield f"has another {section} section"
    if spec.scaling.teachers or spec.scaling.sizes[size]:
        yield "cannot stand in for a size with its own teacher or arch"
    if other.tune != training_options(spec, "tune", size):
        yield f"tunes otherwise than this study's size {size} (its tune section must be equal)"
    if other.fid.feature_net != spec.fid.feature_net:
        yield "scores with another feature network"


def same_run(spec: RunSpec, model: str) -> str | None:
    """The study's own run of a size when ``model`` (a batch-grown run) would train a prefix of it (the same
    options and batch, a length the own run snapshots at): its point is then that snapshot, and nothing is
    trained twice. A prefix is exact: the learning rate, the stage and the EMAs depend only on the iteration."""
    run = spec.scaling.models[model]
    if run.design != "batch":
        return None
    grown, own = training_options(spec, "tune", model=model), training_options(spec, "tune", model=run.size)
    prefix = dataclasses.replace(grown, snapshot_kimg=own.snapshot_kimg, kimg=own.kimg) == own
    return run.size if prefix and is_snapshot(own, grown.kimg) else None


def field_default(cls, name: str):
    """The default of a setting (for a command line that mirrors it)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def load_spec(*paths) -> RunSpec:
    """The run spec of a preset and its overlays (merged in order), every value checked."""
    from ect.config import read_config

    return build_spec(read_config(*paths), " + ".join(map(str, paths)))


def build_spec(config: dict, source: str = "config") -> RunSpec:
    """The run spec of merged config data; one :class:`ConfigError` naming ``source`` and the key."""
    try:
        return build(RunSpec, {k: v for k, v in config.items() if k != "base"})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_schema() -> dict:
    """The JSON schema of a config file, written from the declarations above."""
    return json_schema(RunSpec, "ect-pipeline run config (a preset and its overlays, merged)")


def config_reference() -> str:
    """docs/config.md: every setting with its type, default, bounds and meaning (`make docs` writes it; a
    test keeps it true), from the JSON schema written from the declarations above."""
    schema = config_schema()
    lines = ["# Config reference", "",
             "Generated from the run spec (`ect/spec.py`) by `make docs`; do not edit. A preset and its overlays",
             "are merged (config/README.md), then every value below is checked before anything runs. The JSON",
             "schema of the same settings: `python -m ect.spec --schema`.", ""]
    for name, section in [("(top level)", schema), *schema["$defs"].items()]:
        if "properties" not in section:
            continue
        lines += [f"## {name}", "", section.get("description", ""), "", "| key | type | default | meaning |",
                  "| --- | --- | --- | --- |"]
        required = set(section.get("required", ()))
        for key, prop in section["properties"].items():
            default = "required" if key in required else json.dumps(prop.get("default")) if "default" in prop else "-"
            meaning = prop.get("description", "").replace("|", "\\|")
            lines.append(f"| `{key}` | {_type_words(prop)} | {default} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def _type_words(prop: dict) -> str:
    """A schema property's type and bounds in a few words, for the reference table."""
    if "$ref" in prop:
        return f"[{prop['$ref'].split('/')[-1]}](#{prop['$ref'].split('/')[-1].lower()})"
    if "anyOf" in prop:
        return " or ".join(_type_words(p) for p in prop["anyOf"])
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    words = prop.get("type", "any")
    if words == "array":
        words = f"list of {_type_words(prop.get('items', {}))}"
    if words == "object" and isinstance(prop.get("additionalProperties"), dict):
        words = f"mapping to {_type_words(prop['additionalProperties'])}"
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<",
              "multipleOf": "multiple of", "minItems": "items >=", "maxItems": "items <="}
    extra = [f"{words_} {prop[key]:g}" for key, words_ in bounds.items() if key in prop]
    if "pattern" in prop:
        extra.append(f"matching `{prop['pattern']}`")
    return words + (f" ({', '.join(extra)})" if extra else "")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--schema"]:
        sys.exit("usage: python -m ect.spec --schema   (the JSON schema of a config file)")
    print(json.dumps(config_schema(), indent=2))


# ---------------------------------------------------------------------------------------------
# What each step reads.

# The settings each step reads, as dotted paths of the spec ("" is all of it: the report shows the
# config). A step is handed a view that refuses anything else (StepSettings), the values are its rerun
# trigger in Snakemake (`settings` params) and the keys its DVC params. `{size}` is a scaling study's.
# Steps that are not listed read no config file: their few values are on their command line (steps
# whose outputs several presets share, under resources/).
STEP_READS = {
    "feature_net": ("fid.feature_net",),
    "pretrain": ("pretrain", "scaling.sizes.{size}"),
    "tune": ("tune", "scaling.sizes.{size}", "scaling.tune.{size}", "scaling.models.{model}"),
    "sample": ("sample",),
    "fid": ("sample.sets", "sample.batch", "fid.modes", "fid.feature_net", "fid.dinov2"),
    "fid_curve": ("fid", "sample.t_mid", "sample.class_labels", "sample.batch"),
    "scaling_point": ("scaling.samples", "scaling.sets", "scaling.models.{model}", "sample.t_mid",
                      "sample.class_labels", "sample.batch",
                      "fid.curve_steps", "fid.modes", "fid.feature_net", "fid.dinov2"),
    "fid_snapshot": ("sample.sets", "sample.samples_per_set", "sample.t_mid", "sample.class_labels", "sample.batch",
                     "fid.curve_steps", "fid.modes", "fid.feature_net", "fid.dinov2"),
    "fid_emas": ("sample.sets", "sample.samples_per_set", "sample.t_mid", "sample.class_labels", "sample.batch",
                 "fid.curve_steps", "fid.modes", "fid.feature_net", "fid.dinov2", "tune.output_ema_std"),
    "fid_budget": ("report.paper.budget", "sample.sets", "sample.samples_per_set", "sample.t_mid",
                   "sample.class_labels", "sample.batch", "fid.curve_steps", "fid.curve_samples", "fid.modes",
                   "fid.feature_net", "fid.dinov2"),
    "report": ("",),
}


class UndeclaredSetting(AttributeError):
    """A step read a setting it does not declare in STEP_READS: a bug (its rerun trigger would miss it)."""


def step_paths(step: str, wildcards: dict | None = None) -> tuple[str, ...]:
    """The paths a step reads, its wildcards filled in (a path about a size: only for a size's job)."""
    wildcards = {k: v for k, v in (wildcards or {}).items() if v is not None}
    paths = []
    for key in STEP_READS.get(step, ()):
        try:
            paths.append(key.format(**wildcards))
        except KeyError:
            continue
    return tuple(paths)


class StepSettings:
    """The part of a spec one step may read: attribute (and, for mappings, item) access along its declared
    paths; anything else raises :class:`UndeclaredSetting`."""

    def __init__(self, value, allowed: tuple[str, ...], prefix: str = "", step: str = ""):
        self._value, self._allowed, self._prefix, self._step = value, allowed, prefix, step

    def _child(self, key: str, value):
        path = f"{self._prefix}.{key}" if self._prefix else key
        if any(a == "" or path == a or path.startswith(a + ".") for a in self._allowed):
            return value
        if any(a.startswith(path + ".") for a in self._allowed):  # on the way to a declared path
            return None if value is None else StepSettings(value, self._allowed, path, self._step)
        raise UndeclaredSetting(f"step {self._step!r} reads {path}, which ect/spec.py's STEP_READS does not declare")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._child(name, getattr(self._value, name))

    def __getitem__(self, key: str):
        return self._child(key, self._value[key])

    def __contains__(self, key: str) -> bool:
        return key in self._value

    def get(self, key: str, default=None):
        return self[key] if key in self._value else default


def step_settings(spec: RunSpec, step: str, wildcards: dict | None = None) -> StepSettings:
    """What ``step`` may read of ``spec`` (a scaling study's ``wildcards``: its size); a step that reads it all
    (the report) gets the spec itself."""
    paths = step_paths(step, wildcards)
    return spec if "" in paths else StepSettings(spec, paths, step=step)


def lookup(value, path: str):
    """The value at a dotted ``path`` ('' is the whole)."""
    for part in filter(None, path.split(".")):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def step_values(spec: RunSpec, step: str, wildcards: dict | None = None) -> dict[str, object]:
    """The values a step reads, by path, as plain data: its rerun trigger. A training section leaves out
    CADENCE_KEYS; a path the spec does not have (an absent optional section or size entry) is left out."""
    out = {}
    for path in step_paths(step, wildcards):
        try:
            value = plain(lookup(spec, path))
        except (KeyError, AttributeError, TypeError):
            continue
        if value is None:
            continue
        if path in ("pretrain", "tune"):
            value = {k: v for k, v in value.items() if k not in CADENCE_KEYS}
        out[path] = value
    return out
