"""The run layout: every file a run reads or writes, and the sample sets, named once.

Snakemake's rules, the DVC generator, the report and the tests take their paths from here, so a
new output or sample set is one edit. Paths are relative to the repository root, where every step
runs. The layout is public (users' scripts read it): add to it freely, rename nothing without a
migration.

- ``resources/`` holds what several runs share: downloads, datasets, Inception reference statistics.
- ``results/<run>/`` holds one run's files, ``reports/<run>/`` its HTML report.
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
    "teacher-heun": SampleSet("teacher", "heun", 0, "Teacher, EDM Heun sampler"),
    "ect-1step": SampleSet("tuned", "consistency", 1, "ECT, 1 step", "fid_1step"),
    "ect-2step": SampleSet("tuned", "consistency", 2, "ECT, 2 steps", "fid_2step"),
}

# The config keys each step reads from the config files it is given: they are the step's params in
# Snakemake and in DVC, so changing one reruns exactly the steps that read it. "" is the whole config
# (the report shows it). Steps that are not listed read no config file: their few values are on their
# command line (steps whose outputs several presets share, under resources/).
STEP_READS = {
    "feature_net": ("fid.feature_net",),
    "pretrain": ("pretrain",),
    "tune": ("tune",),
    "sample": ("sample",),
    "fid": ("sample.sets", "fid.modes"),
    "fid_curve": ("fid", "sample.t_mid"),
    "report": ("",),
}
TRAINING_SECTIONS = ("pretrain", "tune")


def lookup(config: dict, key: str):
    """``config["a"]["b"]`` for ``"a.b"``; the whole config for ``""``."""
    value = config
    for part in filter(None, key.split(".")):
        value = value[part]
    return value


def step_settings(config: dict, step: str) -> dict[str, object]:
    """The values a step reads, by key. A training section leaves out CADENCE_KEYS (when to save and
    log): changing them reruns nothing, and a run in progress resumes under the new values."""
    out = {}
    for key in STEP_READS.get(step, ()):
        if key in TRAINING_SECTIONS:
            out.update({f"{key}.{k}": v for k, v in config[key].items() if k not in CADENCE_KEYS})
        else:
            out[key] = lookup(config, key)
    return out


class RunLayout:
    """The paths of one run, from its (validated) config."""

    def __init__(self, config: dict):
        self.run = config["run"]
        dataset, teacher, feature_net = config["dataset"], config["teacher"], config["fid"]["feature_net"]
        self.results = f"results/{self.run}"
        self.report_dir = f"reports/{self.run}"
        self.report = f"{self.report_dir}/index.html"

        # Shared by every run on the same data (resources/).
        self.dataset = f"resources/datasets/{dataset['source']}-{dataset['resolution']}/dataset.npz"
        self.dataset_archive = (f"resources/downloads/{posixpath.basename(dataset['url'])}"
                                if dataset.get("url") else None)
        self.teacher_pickle = (f"resources/teachers/{posixpath.basename(teacher['url'])}"
                               if teacher["source"] == "edm" else None)
        if feature_net["kind"] == "inception":  # a download; its statistics serve every run on the dataset
            self.feature_net = f"resources/fid/{posixpath.basename(feature_net['url'])}"
            self.reference = f"resources/fid/{dataset['source']}-{dataset['resolution']}-inception-reference.npz"
        else:  # the toy's digits classifier, trained by the run
            self.feature_net = f"{self.results}/fid/feature-net.pt"
            self.reference = f"{self.results}/fid/reference.npz"
        # What the fetch rules download: rule -> (path, the config entry with its url and checksums).
        self.downloads = {rule: (path, entry) for rule, path, entry in (
            ("fetch_dataset", self.dataset_archive, dataset),
            ("fetch_teacher", self.teacher_pickle, teacher),
            ("fetch_feature_net", self.feature_net if feature_net["kind"] == "inception" else None, feature_net),
        ) if path}

        # The run's own files.
        self.teacher = f"{self.results}/teacher.pt"
        self.pretrain_log = f"{self.results}/pretrain-log.jsonl"
        self.tuned = f"{self.results}/tuned.pt"
        self.snapshots = f"{self.results}/snapshots"
        self.train_log = f"{self.results}/train-log.jsonl"
        self.curve = f"{self.results}/fid/curve.json"
        self.logs = f"{self.results}/logs"
        self.benchmarks = f"{self.results}/benchmarks"

    def state(self, step: str) -> str:
        """A training step's resumable state: never a declared output, so nothing deletes it."""
        return f"{self.results}/state/{step}"

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
