# Config validation, paths and per-rule resources shared by every rule.
import os

from snakemake.exceptions import WorkflowError

from ect.config import ConfigError, load_config, validate_config

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
REFERENCE = f"{RESULTS}/fid/reference.npz"
TEACHER = f"{RESULTS}/teacher.pt"
PRETRAIN_LOG = f"{RESULTS}/pretrain-log.jsonl"
TUNED = f"{RESULTS}/tuned.pt"
SAMPLE_SETS = ["teacher-1step", "teacher-heun", "ect-1step", "ect-2step"]
REPORT = f"reports/{RUN}/index.html"


def resources_of(rule_name):
    """The config's resources.default, overridden by resources.<rule>."""
    res = {**config["resources"]["default"], **config["resources"].get(rule_name, {})}
    res.pop("threads")
    return res


def threads_of(rule_name):
    return {**config["resources"]["default"], **config["resources"].get(rule_name, {})}["threads"]


def checkpoint_of(wildcards):
    """The checkpoint a sample set is drawn from."""
    return TEACHER if wildcards.set.startswith("teacher") else TUNED
