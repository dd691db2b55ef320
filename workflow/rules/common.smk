# Config validation, paths and per-rule resources shared by every rule.
import os
import sys

from snakemake.exceptions import WorkflowError

from ect.config import CADENCE_KEYS, ConfigError, load_config, validate_config

# The same files, in the same order, are handed to every `ect` step, so a step sees exactly the
# config Snakemake validated. `--config key=value` has no file to hand over: use an overlay file.
CONFIG_FILES = [os.path.relpath(p) for p in workflow.overwrite_configfiles] or ["config/config.yaml"]
CONFIG = " ".join(CONFIG_FILES)
try:
    validate_config(config, " + ".join(CONFIG_FILES))
    if config != load_config(*CONFIG_FILES, validate=False):
        raise ConfigError("--config key=value is not passed on to the steps: put the values in an overlay "
                          "file and add it with --configfile")
except ConfigError as exc:
    raise WorkflowError(f"invalid config: {exc}")

RUN = config["run"]
RESULTS = f"results/{RUN}"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
DATASET = f"resources/datasets/{config['dataset']['source']}-{config['dataset']['resolution']}/dataset.npz"
# Downloads land under resources/ (fetched on the login node; see the prefetch target).
DATASET_ARCHIVE = f"resources/downloads/{os.path.basename(config['dataset']['url'])}" if "url" in config["dataset"] else None
TEACHER_PICKLE = (f"resources/teachers/{os.path.basename(config['teacher']['url'])}"
                  if config["teacher"]["source"] == "edm" else None)
FEATURE_NET = (f"resources/fid/{os.path.basename(config['fid']['feature_net']['url'])}"
               if config["fid"]["feature_net"]["kind"] == "inception" else f"{RESULTS}/fid/feature-net.pt")
DOWNLOADS = [p for p in (DATASET_ARCHIVE, TEACHER_PICKLE) if p] + ([FEATURE_NET] if FEATURE_NET.startswith("resources/") else [])
# Inception statistics of a downloaded dataset are shared by every run on it (50k images: computed once).
REFERENCE = (f"resources/fid/{config['dataset']['source']}-{config['dataset']['resolution']}-inception-reference.npz"
             if config["fid"]["feature_net"]["kind"] == "inception" else f"{RESULTS}/fid/reference.npz")
TEACHER = f"{RESULTS}/teacher.pt"
PRETRAIN_LOG = f"{RESULTS}/pretrain-log.jsonl"
TUNED = f"{RESULTS}/tuned.pt"
SAMPLE_SETS = ["teacher-1step", "teacher-heun", "ect-1step", "ect-2step"]
REPORT = f"reports/{RUN}/index.html"


def resource_settings_of(rule_name):
    """The config's resources.default, overridden by resources.<rule>."""
    return {**config["resources"]["default"], **config["resources"].get(rule_name, {})}


def resources_of(rule_name):
    """A rule's Snakemake resources: its settings without threads, and no gpu key when it asks for none."""
    res = resource_settings_of(rule_name)
    res.pop("threads")
    if not res.get("gpu"):
        res.pop("gpu", None)
        res.pop("gpu_model", None)
    return res


def gpus_of(rule_name):
    return resources_of(rule_name).get("gpu", 0)


def threads_of(rule_name):
    return resource_settings_of(rule_name)["threads"]


def config_files(wildcards, input):
    """CONFIG, as a rule's `config` param. A param function that takes `input` counts as derived from
    the input files, and Snakemake's params rerun trigger skips those: so a changed list of files (an
    overlay that only sets resources, say) reruns no step. The config values a step reads are its other
    params, and a change to those does rerun it (tests/test_pipeline.py checks both)."""
    return CONFIG


def training_settings(section):
    """A training section as a rule's params, without CADENCE_KEYS: changing when a run logs and saves
    reruns nothing (and a run in progress resumes under the new values)."""
    return {k: v for k, v in config[section].items() if k not in CADENCE_KEYS}


def checksum_args(entry):
    """`--md5 X --sha256 Y ` (trailing space) for whichever checksums a config entry pins; "" for none.

    Steps whose outputs under resources/ several presets share (downloads, reference statistics) take
    these values rather than the config files, so changing preset does not rerun them."""
    return "".join(f"--{key} {entry[key]} " for key in ("md5", "sha256") if entry.get(key))


def checkpoint_of(wildcards):
    """The checkpoint a sample set is drawn from."""
    return TEACHER if wildcards.set.startswith("teacher") else TUNED


def gpu_hours():
    """Requested GPU-hours of each GPU rule = jobs x GPUs x runtime limit (an upper bound, for planning)."""
    jobs = {"sample": len(SAMPLE_SETS), "fid": len(SAMPLE_SETS)}
    rows = []
    for rule_name in ["fid_reference", "tune", "sample", "fid", "fid_curve"]:
        res = resources_of(rule_name)
        if res.get("gpu"):
            n = jobs.get(rule_name, 1)
            rows.append((rule_name, n, res["gpu"], res["runtime"], n * res["gpu"] * res["runtime"] / 60))
    return rows


def _is_dry_run(argv):
    # Snakemake sets workflow.dryrun only after the Snakefile is read: look at the command line.
    return any(a in ("--dry-run", "--dryrun") or (a.startswith("-") and not a.startswith("--") and "n" in a)
               for a in argv)


if _is_dry_run(sys.argv[1:]):
    _rows = gpu_hours()
    if _rows:
        print(f"Requested GPU-hours for run '{RUN}' (jobs x GPUs x runtime limit):")
        for name, n, gpus, minutes, hours in _rows:
            print(f"  {name:<14} {n} job(s) x {gpus} GPU x {minutes} min = {hours:8.1f} GPU-h")
        print(f"  {'total':<14} {sum(r[-1] for r in _rows):.1f} GPU-h")
