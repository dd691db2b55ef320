"""The run layout: every file a run reads or writes, and the sample sets, named once.

Snakemake's rules, the DVC generator, the report and the tests take their paths from here, so a
new output or sample set is one edit. Paths are relative to the repository root, where every step
runs. The layout is public (users' scripts read it): add to it freely, rename nothing without a
migration.

- ``resources/`` holds what several runs share: downloads, datasets, Inception reference statistics.
- ``results/<run>/`` holds one run's files, ``reports/<run>/`` its HTML report.
- A scaling study (a config with a ``scaling`` section) has a teacher per size and several training runs
  (its ``models``: a run per size, seed repeats ``<size>-seed<k>``, batch-grown runs ``<size>-batch<b>``):
  a size's teacher lives under ``results/<run>/sizes/<size>/``, a run under ``results/<run>/sizes/<model>/``
  (in the rules, ``{size}`` and ``{model}`` are wildcards), or in the run directory of the preset it
  reuses (scaling.reuse); its points and fits under ``results/<run>/scaling/``.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SampleSet:
    """One set of samples the pipeline draws and scores."""

    checkpoint: str  # "teacher" or "tuned": which of the run's checkpoints it samples
    sampler: str  # "consistency" or "heun"
    steps: int  # consistency steps (the Heun sampler takes its steps from sample.heun_steps)
    label: str  # how the report names it


SAMPLE_SETS = {
    # the teacher used as a 1-step model: what ECT improves on
    "teacher-1step": SampleSet("teacher", "consistency", 1, "Teacher as a 1-step model"),
    # the teacher's own sampler: the diffusion baseline
    "teacher-heun": SampleSet("teacher", "heun", 0, "Teacher, EDM Heun sampler"),
    "ect-1step": SampleSet("tuned", "consistency", 1, "ECT, 1 step"),
    "ect-2step": SampleSet("tuned", "consistency", 2, "ECT, 2 steps"),
}

class RunLayout:
    """The paths of one run, from its spec (``ect/spec.py``). In a scaling study the paths of a training run
    hold ``model`` (by default the ``{model}`` wildcard of the rules) and its teacher's its size (the
    ``{size}`` wildcard when the model is one)."""

    def __init__(self, spec, model: str = "{model}"):
        from ect.spec import reused_runs, same_run

        self.run = spec.run
        self.scaling = spec.scaling
        self.results = f"results/{self.run}"
        self.report_dir = f"reports/{self.run}"
        self.report = f"{self.report_dir}/index.html"

        self._shared_paths(spec)

        # The run's own files (a scaling study's: each size's).
        self.logs = f"{self.results}/logs"
        self.benchmarks = f"{self.results}/benchmarks"
        models = self.scaling.models if self.scaling else {}
        size = models[model].size if model in models else "{size}"
        self.reused = reused_runs(spec)  # size -> the spec of the preset whose run stands in for it
        # the runs trained here: not a reused one, not a batch-grown run that is the size's own run
        self.trained_models = [m for m in models if m not in self.reused and not same_run(spec, m)]
        own = (same_run(spec, model) if model in models else None) or model  # the run whose files these are
        self.size, self.model_name = (size, model) if self.scaling else (None, None)
        self.size_dir = f"{self.results}/sizes/{size}" if self.scaling else self.results
        self.model = f"{self.results}/sizes/{own}" if self.scaling else self.results
        if size in self.reused:  # a run of another preset: its teacher, and the size's own run, are that run's
            other = RunLayout(self.reused[size])
            self.size_dir, self.model = other.results, other.results if own == size else self.model
        self.size_suffix = f"-{size}" if self.scaling else ""  # in the log names of per-size jobs (the teacher)
        self.job_suffix = f"-{model}" if self.scaling else ""  # in the log names of per-run jobs (tuning)
        self.teacher = f"{self.size_dir}/teacher.pt"
        self.pretrain_log = f"{self.size_dir}/pretrain-log.jsonl"
        self.tuned = f"{self.model}/tuned.pt"
        self.emas = f"{self.model}/emas"  # every EMA at the end, when there are power-function ones
        self.snapshots = f"{self.model}/snapshots"
        self.train_log = f"{self.model}/train-log.jsonl"
        self.curve = f"{self.results}/fid/curve.json"
        self.curve_table = f"{self.results}/fid/curve.csv"
        # The paper's numbers: those published at an earlier budget are snapshots scored with the full
        # protocol; a compute-budget claim is judged from the curve; every verdict goes to claims.json.
        paper = spec.report.paper
        self.claim_kimgs = sorted({c.kimg for c in paper.claims if c.kimg is not None and c.kimg != spec.tune.kimg}
                                  ) if paper and not self.scaling else []
        self.judges_budget = bool(paper and paper.budget and not self.scaling)
        self.budget_fid = f"{self.results}/fid/budget.json"
        # A run with power-function EMAs scores each EMA at its end, as EDM2 does.
        self.emas_fid = f"{self.results}/fid/emas.json" if spec.tune.pf_ema_stds and not self.scaling else None
        self.claims = f"{self.results}/claims.json"

        # A scaling study: a FID point per (size, budget), the points as one table, the power-law fits.
        self.scaling_dir = f"{self.results}/scaling"
        self.scaling_points = f"{self.scaling_dir}/points.csv"
        self._jobs = self._job_names(spec)

    def _shared_paths(self, spec) -> None:
        """What several runs share under resources/ (downloads, datasets, Inception statistics), and the downloads
        a run fetches."""
        dataset, teacher, feature_net = spec.dataset, spec.teacher, spec.fid.feature_net
        self.dataset = f"resources/datasets/{dataset.source}-{dataset.resolution}/dataset.npz"
        self.dataset_archive = f"resources/downloads/{posixpath.basename(dataset.url)}" if dataset.url else None
        # A class-conditional run (sample.class_labels set) draws its sampling labels from the dataset's.
        self.labels_source = [self.dataset] if spec.sample.class_labels else []
        # A downloaded teacher: one, or one per size of a scaling study (scaling.teachers).
        self.teacher_downloads = dict(self.scaling.teachers) if self.scaling and self.scaling.teachers else None
        self.teacher_pickle = (f"resources/teachers/{posixpath.basename(teacher.url)}"
                               if teacher.source == "edm" else None)
        # FD_DINOv2's network, when the run scores it: a download, beside Inception.
        dinov2 = spec.fid.dinov2
        self.dinov2 = f"resources/fid/{posixpath.basename(dinov2.url)}" if dinov2 else None
        self.dinov2_inputs = [self.dinov2] if dinov2 else []
        if feature_net.kind == "inception":  # a download; its statistics serve every run on the dataset
            self.feature_net = f"resources/fid/{posixpath.basename(feature_net.url)}"
            self.reference = (f"resources/fid/{dataset.source}-{dataset.resolution}-inception"
                              f"{'-dinov2' if dinov2 else ''}-reference.npz")
        else:  # the toy's digits classifier, trained by the run
            self.feature_net = f"{self.results}/fid/feature-net.pt"
            self.reference = f"{self.results}/fid/reference.npz"
        # Reference statistics of a large dataset are computed in shards (a job each) and merged.
        self.reference_shards = spec.fid.reference_shards
        published = spec.fid.published_reference  # the authors' statistics, to check ours against
        self.published_reference = f"resources/fid/{posixpath.basename(published.url)}" if published else None
        self.reference_check = f"{self.results}/fid/reference-check.json" if published else None
        # What the fetch rules download: rule -> (path, the config entry with its url and checksums).
        teachers = ([(f"fetch_teacher_{size}", self.teacher_pickle_of(size), entry)
                     for size, entry in self.teacher_downloads.items()] if self.teacher_downloads
                    else [("fetch_teacher", self.teacher_pickle, teacher)])
        self.downloads = {rule: (path, entry) for rule, path, entry in (
            ("fetch_dataset", self.dataset_archive, dataset), *teachers,
            ("fetch_feature_net", self.feature_net if feature_net.kind == "inception" else None, feature_net),
            ("fetch_dinov2", self.dinov2, dinov2),
            ("fetch_published_reference", self.published_reference, published),
        ) if path}

    def _job_names(self, spec) -> list[tuple[str, str]]:
        """(the rule whose resources it takes, job name) of every job of the run but the report; a job's name
        is its log's and its benchmark's (a test keeps this equal to Snakemake's DAG)."""
        jobs = [(rule, rule) for rule in self.downloads] + [("dataset", "dataset")]
        if spec.fid.feature_net.kind == "digits-classifier":
            jobs.append(("feature_net", "feature_net"))
        if self.reference_shards > 1:
            jobs += [("fid_reference", f"fid_reference-{i}") for i in range(self.reference_shards)]
        jobs.append(("fid_reference_merge" if self.reference_shards > 1 else "fid_reference", "fid_reference"))
        jobs += [("reference_check", "reference_check")] if self.reference_check else []
        teacher = "pretrain" if spec.teacher.source == "pretrain" else "teacher"
        if self.scaling:
            jobs += [(teacher, f"{teacher}-{size}") for size in self.scaling.sizes if size not in self.reused]
            jobs += [(teacher, teacher) for _ in self.reused][:1]  # the reused run's own (its log names no size)
            jobs += [("tune", f"tune-{model}") for model in self.trained_models]
            jobs += [("tune", "tune") for _ in self.reused][:1]
            jobs += [("scaling_point", f"scaling_point-{model}-{kimg:g}") for model in self.scaling.models
                     for kimg in self.scaling.budgets_of(model)]
            jobs += [("scaling_points", "scaling_points")]
            jobs += [("scaling_fit", f"scaling_fit-{fit}") for fit in self.scaling_fits(spec.fid.curve_steps)]
        else:
            jobs += [(teacher, teacher), ("tune", "tune")]
        if not self.scaling:
            jobs += [(rule, f"{rule}-{name}") for rule in ("sample", "fid") for name in SAMPLE_SETS]
            jobs.append(("fid_curve", "fid_curve"))
            jobs += [("fid_snapshot", f"fid_snapshot-{kimg:g}") for kimg in self.claim_kimgs]
            jobs += [("fid_budget", "fid_budget")] if self.judges_budget else []
            jobs += [("fid_emas", "fid_emas")] if self.emas_fid else []
        return jobs

    def jobs(self) -> list[tuple[str, str]]:
        return list(self._jobs)

    @staticmethod
    def fetch_record(download: str) -> str:
        """Beside a download, how it was fetched and verified (`ect fetch --record-out`): the report shows it."""
        return f"{download}.fetch.json"

    def teacher_pickle_of(self, size: str) -> str:
        """The downloaded teacher of a size: its own (scaling.teachers) or the preset's one."""
        if self.teacher_downloads:
            return f"resources/teachers/{posixpath.basename(self.teacher_downloads[size].url)}"
        return self.teacher_pickle

    def teacher_entry_of(self, size: str, teacher):
        """The config entry (url, checksums) of a size's downloaded teacher."""
        return self.teacher_downloads[size] if self.teacher_downloads else teacher

    def state(self, step: str) -> str:
        """A training step's resumable state: never a declared output, so nothing deletes it."""
        return f"{self.size_dir if step == 'pretrain' else self.model}/state/{step}"

    def reference_shard(self, shard) -> str:
        """The feature moments of one shard of the reference statistics."""
        return self.reference.replace(".npz", f".shard{shard}of{self.reference_shards}.npz")

    def scaling_point(self, model: str, kimg: str) -> str:
        return f"{self.scaling_dir}/points/{model}-{kimg}.json"

    def scaling_fit(self, name: str) -> str:
        """``fit-<n>step.json`` (the compute frontier across sizes), ``fit-<size>-<n>step.json`` (one size's
        prefix points), ``fit-<size>-batch-<n>step.json`` (its batch-grown runs), ``fit-size-<n>step.json``
        (across sizes at one budget)."""
        return f"{self.scaling_dir}/fit-{name}.json"

    def scaling_fits(self, steps) -> dict[str, list[str]]:
        """Every fit of the study, by name, with its `ect scaling-fit` options."""
        fits = {}
        for n in steps:
            fits[f"{n}step"] = ["--steps", str(n), "--frontier"]
            for size in self.scaling.sizes:
                fits[f"{size}-{n}step"] = ["--steps", str(n), "--size", size, "--design", "prefix"]
            for size in (self.scaling.batches.sizes if self.scaling.batches and
                         len(self.scaling.batches.batch) >= 3 else ()):
                fits[f"{size}-batch-{n}step"] = ["--steps", str(n), "--size", size, "--design", "batch"]
            if len(self.scaling.sizes) >= 3:
                fits[f"size-{n}step"] = ["--steps", str(n), "--axis", "size"]
        return fits

    def snapshot(self, images_seen: int) -> str:
        """The EMA snapshot after ``images_seen`` training images."""
        return f"{self.snapshots}/{snapshot_name(images_seen)}"

    def snapshot_fid(self, kimg) -> str:
        """A snapshot at a budget the paper publishes a number at, scored with the full protocol."""
        return f"{self.results}/fid/snapshot-{kimg}.json"

    def checkpoint(self, name: str) -> str:
        return {"teacher": self.teacher, "tuned": self.tuned}[name]

    def samples(self, sample_set: str) -> str:
        return f"{self.results}/samples/{sample_set}.npz"

    def grid(self, sample_set: str) -> str:
        return f"{self.results}/samples/{sample_set}.png"

    def fid(self, sample_set: str) -> str:
        return f"{self.results}/fid/{sample_set}.json"

    def log(self, job: str) -> str:
        return f"{self.logs}/{job}.log"

    def benchmark(self, job: str) -> str:
        return f"{self.benchmarks}/{job}.tsv"

    def model_log(self, job: str) -> str:
        """The log of a job that trains the run's model (in a scaling study, one per run)."""
        return self.log(job + self.job_suffix)

    def model_benchmark(self, job: str) -> str:
        return self.benchmark(job + self.job_suffix)

    def size_log(self, job: str) -> str:
        """The log of a job that makes a size's teacher (in a scaling study, one per size)."""
        return self.log(job + self.size_suffix)

    def size_benchmark(self, job: str) -> str:
        return self.benchmark(job + self.size_suffix)


@dataclass(frozen=True)
class StateLayout:
    """Inside a training run's state directory (``RunLayout.state``; never a declared output): what a killed
    run resumes from, and what it publishes at the end."""

    dir: Path

    @property
    def state(self) -> Path:  # weights, EMAs, optimiser, iteration, random state
        return self.dir / "state.pt"

    @property
    def log(self) -> Path:  # the tick log, published as train-log.jsonl at the end
        return self.dir / "log.jsonl"

    @property
    def lock(self) -> Path:  # held by the one trainer on this directory
        return self.dir / "lock"

    @property
    def snapshots(self) -> Path:  # EMA snapshots, published at the end
        return self.dir / "snapshots"

    @property
    def tensorboard(self) -> Path:
        return self.dir / "tensorboard"

    def ema(self, std: float) -> Path:
        """Every EMA at the end, for post-hoc choices: the classic one (std 0) and each power-function one."""
        return self.dir / "emas" / (f"pf-{std:.3f}.pt" if std else "classic.pt")


def snapshot_name(images_seen: int) -> str:
    """``kimg000012.800.pt``: sorts by training length."""
    return f"kimg{images_seen / 1000:010.3f}.pt"
