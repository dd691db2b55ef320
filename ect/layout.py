"""The run layout: every file a run reads or writes, and the sample sets, named once.

Snakemake's rules, the DVC generator, the report and the tests take their paths from here, so a
new output or sample set is one edit. Paths are relative to the repository root, where every step
runs. The layout is public (users' scripts read it): add to it freely, rename nothing without a
migration.

- ``resources/`` holds what several runs share: downloads, datasets, Inception reference statistics.
- ``results/<run>/`` holds one run's files, ``reports/<run>/`` its HTML report.
- A scaling study (a config with a ``scaling`` section) trains one model per size: each size's
  teacher, tuning run and logs live under ``results/<run>/sizes/<size>/`` (in the rules, ``{size}`` is
  a wildcard), its points and fits under ``results/<run>/scaling/``.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass

from ect.config import CADENCE_KEYS


@dataclass(frozen=True)
class SampleSet:
    """One set of samples the pipeline draws and scores."""

    checkpoint: str  # "teacher" or "tuned": which of the run's checkpoints it samples
    sampler: str  # "consistency" or "heun"
    steps: int  # consistency steps (the Heun sampler takes its steps from sample.heun_steps)
    label: str  # how the report names it
    paper_key: str | None = None  # the key of report.paper holding the paper's number for it


SAMPLE_SETS = {
    # the teacher used as a 1-step model: what ECT improves on
    "teacher-1step": SampleSet("teacher", "consistency", 1, "Teacher as a 1-step model"),
    # the teacher's own sampler: the diffusion baseline
    "teacher-heun": SampleSet("teacher", "heun", 0, "Teacher, EDM Heun sampler", "fid_teacher_heun"),
    "ect-1step": SampleSet("tuned", "consistency", 1, "ECT, 1 step", "fid_1step"),
    "ect-2step": SampleSet("tuned", "consistency", 2, "ECT, 2 steps", "fid_2step"),
}

# The config keys each step reads from the config files it is given: they are the step's params in
# Snakemake and in DVC, so changing one reruns exactly the steps that read it. "" is the whole config
# (the report shows it). Steps that are not listed read no config file: their few values are on their
# command line (steps whose outputs several presets share, under resources/).
STEP_READS = {
    "feature_net": ("fid.feature_net",),
    "pretrain": ("pretrain", "scaling.sizes.{size}"),
    "tune": ("tune", "scaling.tune.{size}"),
    "sample": ("sample",),
    "fid": ("sample.sets", "fid.modes"),
    "fid_curve": ("fid", "sample.t_mid", "sample.class_labels"),
    "scaling_point": ("scaling.samples", "scaling.sets", "sample.t_mid", "sample.class_labels", "fid.curve_steps",
                      "fid.modes"),
    "report": ("",),
}
TRAINING_SECTIONS = ("pretrain", "tune")


def lookup(config: dict, key: str):
    """``config["a"]["b"]`` for ``"a.b"``; the whole config for ``""``."""
    value = config
    for part in filter(None, key.split(".")):
        value = value[part]
    return value


def step_settings(config: dict, step: str, wildcards: dict | None = None) -> dict[str, object]:
    """The values a step reads, by key. A training section leaves out CADENCE_KEYS (when to save and
    log): changing them reruns nothing, and a run in progress resumes under the new values. A key with a
    ``{wildcard}`` is the job's (a scaling study's size); a key the config lacks (an optional section or
    value) is skipped."""
    out = {}
    for key in STEP_READS.get(step, ()):
        if key and key.split(".")[0] not in config:
            continue
        key = key.format(**(wildcards or {}))
        if key in TRAINING_SECTIONS:
            out.update({f"{key}.{k}": v for k, v in config.get(key, {}).items() if k not in CADENCE_KEYS})
            continue
        try:
            out[key] = lookup(config, key)
        except KeyError:
            continue
    return out


class RunLayout:
    """The paths of one run, from its (validated) config. In a scaling study the per-size paths hold
    ``size`` (by default the ``{size}`` wildcard of the rules)."""

    def __init__(self, config: dict, size: str = "{size}"):
        self.run = config["run"]
        self.scaling = config.get("scaling")
        dataset, teacher, feature_net = config["dataset"], config["teacher"], config["fid"]["feature_net"]
        self.results = f"results/{self.run}"
        self.report_dir = f"reports/{self.run}"
        self.report = f"{self.report_dir}/index.html"

        # Shared by every run on the same data (resources/).
        self.dataset = f"resources/datasets/{dataset['source']}-{dataset['resolution']}/dataset.npz"
        self.dataset_archive = (f"resources/downloads/{posixpath.basename(dataset['url'])}"
                                if dataset.get("url") else None)
        # A class-conditional run (sample.class_labels set) draws its sampling labels from the dataset's.
        self.labels_source = [self.dataset] if "class_labels" in config["sample"] else []
        # A downloaded teacher: one, or one per size of a scaling study (scaling.teachers).
        self.teacher_downloads = (dict(self.scaling["teachers"])
                                  if self.scaling and "teachers" in self.scaling else None)
        self.teacher_pickle = (f"resources/teachers/{posixpath.basename(teacher['url'])}"
                               if teacher["source"] == "edm" else None)
        if feature_net["kind"] == "inception":  # a download; its statistics serve every run on the dataset
            self.feature_net = f"resources/fid/{posixpath.basename(feature_net['url'])}"
            self.reference = f"resources/fid/{dataset['source']}-{dataset['resolution']}-inception-reference.npz"
        else:  # the toy's digits classifier, trained by the run
            self.feature_net = f"{self.results}/fid/feature-net.pt"
            self.reference = f"{self.results}/fid/reference.npz"
        # Reference statistics of a large dataset are computed in shards (a job each) and merged.
        self.reference_shards = config["fid"].get("reference_shards", 1)
        # What the fetch rules download: rule -> (path, the config entry with its url and checksums).
        teachers = ([(f"fetch_teacher_{size}", self.teacher_pickle_of(size), entry)
                     for size, entry in self.teacher_downloads.items()] if self.teacher_downloads
                    else [("fetch_teacher", self.teacher_pickle, teacher)])
        self.downloads = {rule: (path, entry) for rule, path, entry in (
            ("fetch_dataset", self.dataset_archive, dataset), *teachers,
            ("fetch_feature_net", self.feature_net if feature_net["kind"] == "inception" else None, feature_net),
        ) if path}

        # The run's own files (a scaling study's: each size's).
        self.logs = f"{self.results}/logs"
        self.benchmarks = f"{self.results}/benchmarks"
        self.size = size if self.scaling else None
        self.model = f"{self.results}/sizes/{size}" if self.scaling else self.results
        self.job_suffix = f"-{size}" if self.scaling else ""  # in the log and benchmark names of per-size jobs
        self.teacher = f"{self.model}/teacher.pt"
        self.pretrain_log = f"{self.model}/pretrain-log.jsonl"
        self.tuned = f"{self.model}/tuned.pt"
        self.snapshots = f"{self.model}/snapshots"
        self.train_log = f"{self.model}/train-log.jsonl"
        self.curve = f"{self.results}/fid/curve.json"
        self.curve_table = f"{self.results}/fid/curve.csv"

        # A scaling study: a FID point per (size, budget), the points as one table, the power-law fits.
        self.scaling_dir = f"{self.results}/scaling"
        self.scaling_points = f"{self.scaling_dir}/points.csv"

    def teacher_pickle_of(self, size: str) -> str:
        """The downloaded teacher of a size: its own (scaling.teachers) or the preset's one."""
        if self.teacher_downloads:
            return f"resources/teachers/{posixpath.basename(self.teacher_downloads[size]['url'])}"
        return self.teacher_pickle

    def teacher_entry_of(self, size: str, teacher: dict) -> dict:
        """The config entry (url, checksums) of a size's downloaded teacher."""
        return self.teacher_downloads[size] if self.teacher_downloads else teacher

    def state(self, step: str) -> str:
        """A training step's resumable state: never a declared output, so nothing deletes it."""
        return f"{self.model}/state/{step}"

    def reference_shard(self, shard) -> str:
        """The feature moments of one shard of the reference statistics."""
        return self.reference.replace(".npz", f".shard{shard}of{self.reference_shards}.npz")

    def scaling_point(self, size: str, kimg: str) -> str:
        return f"{self.scaling_dir}/points/{size}-{kimg}.json"

    def scaling_fit(self, name: str) -> str:
        """``fit-2step.json`` (the compute frontier across sizes), ``fit-<size>-2step.json`` (one size)."""
        return f"{self.scaling_dir}/fit-{name}.json"

    def scaling_fit_names(self, steps) -> list[str]:
        return [f"{n}step" for n in steps] + [f"{s}-{n}step" for s in self.scaling["sizes"] for n in steps]

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
        """The log of a job that trains the run's model (in a scaling study, one per size)."""
        return self.log(job + self.job_suffix)

    def model_benchmark(self, job: str) -> str:
        return self.benchmark(job + self.job_suffix)
