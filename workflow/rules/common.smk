# The run spec, the run layout and per-rule settings shared by every rule.
import os
import re
import shlex
import sys
from pathlib import Path

from ect.config import merge, read_config, read_yaml
from ect.download import RECORD_FILE
from ect.launch import FORWARDED_SIGNALS
from ect.layout import SAMPLE_SETS, RunLayout
from ect.spec import RULES, build_spec, step_values
from ect.typed import ConfigError

# The same files, in the same order, are handed to every `ect` step that reads a config, so a step
# sees exactly what Snakemake checked. `--config key=value` has no file to hand over: use an overlay.
CONFIG_FILES = [os.path.relpath(p) for p in workflow.overwrite_configfiles] or ["config/config.yaml"]
try:
    given = {}
    for path in CONFIG_FILES:
        given = merge(given, read_yaml(path))
    if config != given:
        raise ConfigError(
            "--config key=value is not passed on to the steps: put the values in an overlay "
            "file and add it with --configfile"
        )
    SPEC = build_spec(read_config(*CONFIG_FILES), " + ".join(CONFIG_FILES))  # every value checked (ect/spec.py)
    L = RunLayout(SPEC)  # every path of the run (ect/layout.py); a reused run's preset is read and checked
except ConfigError as exc:  # one line, before any job is planned (a traceback would hide it)
    print(f"invalid config: {exc}", file=sys.stderr)
    sys.exit(2)


def config_files(wildcards, input):
    """CONFIG_FILES, as a rule's `config` param. A param function that takes `input` counts as derived
    from the input files, and Snakemake's params rerun trigger skips those: so a changed list of files
    (an overlay that only sets resources, say) reruns no step. The values a step reads are its
    `settings` param (ect/spec.py: STEP_READS), and a change to those does rerun it (tested)."""
    return CONFIG_FILES


def settings(step):
    """The values a step reads, as its `settings` param (their keys are its DVC params); a function of the
    job's wildcards (a scaling study's size and run select their own overrides)."""
    return lambda wildcards: step_values(SPEC, step, with_size(dict(wildcards)))


def with_size(wildcards):
    """A run's wildcards with its size, which a run of a scaling study implies."""
    model = wildcards.get("model")
    return {**wildcards, "size": SPEC.scaling.models[model].size} if model and SPEC.scaling else wildcards


def per_job(path):
    """A path with the job's wildcards filled in, as a param (Snakemake fills in only input, output, log)."""
    return lambda wildcards: path.format(**wildcards)


def size_args(wildcards):
    """` --size S` for a scaling study's per-size jobs (its teachers), else nothing."""
    return optional_args(["--size", wildcards.size] if L.scaling else [])


def model_args(wildcards):
    """` --model M` for a scaling study's per-run jobs (tuning, its points), else nothing."""
    return optional_args(["--model", wildcards.model] if L.scaling else [])


def resources_of(rule_name, spec=None):
    """A rule's Snakemake resources (in ``spec``, by default the run's): its settings without threads, and no
    gpu key when it asks for none."""
    res = (spec or SPEC).resources_of(rule_name)
    res.pop("threads")
    if "partition" in res:  # the SLURM plugin's name; it passes the cluster's default partition otherwise
        res["slurm_partition"] = res.pop("partition")
    if not res.get("gpu"):
        res.pop("gpu", None)
        res.pop("gpu_model", None)
    if res.get("nodes", 1) > 1:
        # One task a node, started by the rule's own srun (the plugin's `mpi` mode runs the rule in the batch
        # script, not inside a one-task step); GPUs per node as a GRES (`gpu` would be the job's total), and
        # no --ntasks-per-gpu (the plugin derives it from `tasks` unless told 0).
        gpus, model = res.pop("gpu", 0), res.pop("gpu_model", None)
        res.update(tasks=res["nodes"], mpi="srun", tasks_per_gpu=0)
        if gpus:
            res["gres"] = f"gpu:{model}:{gpus}" if model else f"gpu:{gpus}"
    return res


def gpus_of(rule_name):
    return resources_of(rule_name).get("gpu", 0)


def threads_of(rule_name, spec=None):
    return (spec or SPEC).resources_of(rule_name)["threads"]


def dataset_args(wildcards, input):
    """` --dataset D` for a class-conditional run's sampling steps (their labels follow the dataset's)."""
    return optional_args(["--dataset", input.labels_source[0]] if input.labels_source else [])


def dinov2_args(wildcards, input):
    """` --dinov2 W` for the scoring steps of a run that scores FD_DINOv2 (fid.dinov2)."""
    return optional_args(["--dinov2", input.dinov2[0]] if input.dinov2 else [])


def optional_args(args):
    """Arguments that may be absent, shell-quoted, each after a space: `{params.x}` right after the word before
    it gives one space between words whether there are any or not (DVC's lock file folds long commands and
    would lose one of two spaces, calling the command changed)."""
    return "".join(f" {shlex.quote(str(arg))}" for arg in args)


def checksum_args(entry):
    """` --md5 X --sha256 Y` for whichever checksums a config entry pins (see optional_args).

    Steps whose outputs under resources/ several presets share (downloads, reference statistics) take
    these values rather than the config files, so changing preset does not rerun them."""
    pinned = [(key, getattr(entry, key, None)) for key in ("md5", "sha256")]
    return optional_args(arg for key, value in pinned if value for arg in (f"--{key}", value))


def fetch_args(entry):
    """A download's checks: its pinned checksums, or else trust on first use against RECORD_FILE; its size."""
    pinned = checksum_args(entry)
    return (pinned or optional_args(["--record", RECORD_FILE])) + optional_args(
        ["--size", entry.size] if entry.size else []
    )


def checkpoint_of(wildcards):
    """The checkpoint a sample set is drawn from."""
    return L.checkpoint(SAMPLE_SETS[wildcards.set].checkpoint)


def gpu_hours():
    """Requested GPU-hours of each GPU rule = jobs x GPUs (on all its nodes) x runtime limit (an upper bound, for
    planning)."""
    jobs = {}
    for rule_name, _ in L.jobs():  # every job of the run (ect/layout.py), counted by the rule whose resources it takes
        jobs[rule_name] = jobs.get(rule_name, 0) + 1
    rows = []
    for rule_name, n in jobs.items():
        res = SPEC.resources_of(rule_name)
        if res.get("gpu"):
            nodes = res.get("nodes", 1)
            gpus = res["gpu"] * nodes
            rows.append((rule_name, n, nodes, gpus, res["runtime"], n * gpus * res["runtime"] / 60))
    return rows


def _is_dry_run(argv):
    # Snakemake sets workflow.dryrun only after the Snakefile is read: look at the command line.
    return any(
        a in ("--dry-run", "--dryrun") or (a.startswith("-") and not a.startswith("--") and "n" in a) for a in argv
    )


if _is_dry_run(sys.argv[1:]):
    _rows = gpu_hours()
    if _rows:
        print(f"Requested GPU-hours for run '{L.run}' (jobs x GPUs x runtime limit):")
        for name, n, nodes, gpus, minutes, hours in _rows:
            spread = f" ({nodes} nodes)" if nodes > 1 else ""
            print(f"  {name:<14} {n} job(s) x {gpus} GPU{spread} x {minutes} min = {hours:8.1f} GPU-h")
        print(f"  {'total':<14} {sum(r[-1] for r in _rows):.1f} GPU-h")


def record_in_dvc():
    """After a successful run, record the outputs of every job of the run's DAG in DVC (`dvc commit`), so
    that `dvc status` is clean and `dvc repro` reruns nothing. Only for a preset run as committed: with
    overlays the outputs were made from values the DVC pipeline (generated from the presets) does not
    have, and recording them would call stale outputs up to date."""
    import subprocess

    import yaml

    if workflow.exec_mode.name != "DEFAULT":  # a job step inside a SLURM job: the main process records
        return
    if len(CONFIG_FILES) != 1 or not os.path.isdir(".dvc"):
        print("not recorded in DVC: the DVC pipelines are the presets as committed, without overlays")
        return
    preset = os.path.splitext(os.path.basename(CONFIG_FILES[0]))[0]
    stage_of_output = {}  # every output of every generated DVC file -> its stage address
    for dvcfile in ["dvc.yaml", *sorted(str(p) for p in Path("pipelines").glob("*/dvc.yaml"))]:
        if os.path.exists(dvcfile):
            for name, stage in yaml.safe_load(Path(dvcfile).read_text())["stages"].items():
                for out in stage.get("outs", []) + stage.get("metrics", []):
                    stage_of_output[out] = f"{dvcfile}:{name}"
    outputs = [str(o) for job in workflow.dag.jobs for o in job.output]
    stages = sorted({stage_of_output[o] for o in outputs if o in stage_of_output})
    if not stages:
        return
    # `dvc commit` rewrites the files it records (copies from its cache): their modification times must
    # stay what they were, or Snakemake would see inputs newer than outputs and rerun everything.
    mtimes = {}
    for path in map(Path, outputs):
        for f in [path, *(path.rglob("*") if path.is_dir() else [])]:
            if f.exists():
                mtimes[f] = f.stat().st_mtime_ns
    proc = subprocess.run(["dvc", "commit", "--force", "--quiet", *stages], capture_output=True, text=True)
    for f, mtime in mtimes.items():
        if f.exists():
            os.utime(f, ns=(mtime, mtime))
    if proc.returncode:
        print(f"warning: could not record the outputs in DVC (`dvc commit` failed):\n{proc.stderr[-2000:]}")
    else:
        print(f"recorded {len(stages)} stage(s) of preset '{preset}' in DVC (dvc.lock): `dvc status` is clean")


def report_inputs(wildcards):
    """Every file the report reads (a test keeps it so): a run's FIDs, grids, curves, logs and checkpoints, or a
    study's points, fits and teachers; and how each download was fetched."""
    downloads = [L.fetch_record(path) for path, _ in L.downloads.values()]
    if L.scaling:
        teachers = [RunLayout(SPEC, size).teacher for size in L.scaling.sizes]
        return {
            "points": L.scaling_points,
            "fits": [L.scaling_fit(name) for name in FITS],
            "teachers": teachers,
            "downloads": downloads,
            "reference_check": [L.reference_check] if L.reference_check else [],
        }
    return {
        "downloads": downloads,
        "fid": [L.fid(s) for s in SAMPLE_SETS],
        "grids": [L.grid(s) for s in SAMPLE_SETS],
        "curve": L.curve,
        "logs": ([L.pretrain_log] if SPEC.teacher.source == "pretrain" else []) + [L.train_log],
        "checkpoints": [L.teacher, L.tuned],
        "data": L.dataset,
        "claims": [L.snapshot_fid(f"{kimg:g}") for kimg in L.claim_kimgs] + ([L.budget_fid] if L.judges_budget else []),
        "reference_check": [L.reference_check] if L.reference_check else [],
        "emas": [L.emas_fid] if L.emas_fid else [],
    }


def tune_launcher(spec):
    """Over several nodes: srun starts one launcher a node (ect/launch.py: torchrun, c10d rendezvous on the first
    node). On one node: one process per GPU (torchrun); a single process without torchrun otherwise."""
    res = spec.resources_of("tune")
    gpus, nodes = res.get("gpu", 0), res.get("nodes", 1)
    if nodes > 1:
        per_node = [f"--gres=gpu:{gpus}"] if gpus else []
        return [
            "srun",
            f"--nodes={nodes}",
            "--ntasks-per-node=1",
            f"--cpus-per-task={res['threads']}",
            *per_node,
            "--kill-on-bad-exit=1",
            "python",
            "-m",
            "ect.launch",
            f"--nproc-per-node={max(1, gpus)}",
            "--",
        ]
    if gpus > 1:
        return [
            "torchrun",
            "--standalone",
            f"--nproc_per_node={gpus}",
            f"--signals-to-handle={FORWARDED_SIGNALS}",
            "-m",
            "ect.cli",
        ]
    return ["ect"]


def tune_outputs(layout, spec):
    """A tuning run's outputs: the output EMA, its snapshots and log, and every EMA when it tracks several."""
    return dict(
        tuned=layout.tuned,
        snapshots=directory(layout.snapshots),
        train_log=layout.train_log,
        **({"emas": directory(layout.emas)} if spec.tune.pf_ema_stds else {}),
    )


def emas_args(wildcards, output):
    """` --emas DIR` for a run that tracks power-function EMAs: every EMA is published for scoring."""
    return optional_args(["--emas", output.emas] if "emas" in output.keys() else [])


def size_constraint():
    """The sizes whose teacher this preset makes (not those another preset's run provides)."""
    sizes = [s for s in SPEC.scaling.sizes if s not in L.reused] if SPEC.scaling else []
    return {"size": "|".join(map(re.escape, sizes)) or "-"} if SPEC.scaling else {}
