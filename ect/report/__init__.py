"""The HTML report of one run: FID against the paper, sample grids, curves, protocol, provenance.

``build_report`` reads a run's results directory (the paths the pipeline writes, see
``workflow/rules/``), renders ``templates/report.html.j2`` with Jinja2 and writes the page with
its images into one directory, replaced as a whole: a killed report leaves the old one.
Everything is local (PNG images, inline CSS), so the page reads offline.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from ect.fileio import sha256_file
from ect.report import plots

SET_LABELS = {  # sample set -> (table label, what it shows)
    "ect-1step": "ECT, 1 step",
    "ect-2step": "ECT, 2 steps",
    "teacher-1step": "Teacher as a 1-step model",
    "teacher-heun": "Teacher, EDM Heun sampler",
}
PAPER_KEYS = {"ect-1step": "fid_1step", "ect-2step": "fid_2step"}
PACKAGES = ["ect-pipeline", "torch", "torchvision", "numpy", "scipy", "clean-fid", "snakemake", "dvc", "jinja2",
            "matplotlib", "scikit-learn"]


class ReportError(ValueError):
    pass


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _git_commit(root: Path) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _runtimes(bench_dir: Path) -> list[dict]:
    """Snakemake benchmark files (one TSV per job): wall time and peak memory."""
    rows = []
    for path in sorted(bench_dir.glob("*.tsv")) if bench_dir.exists() else []:
        with open(path) as f:
            rec = next(csv.DictReader(f, delimiter="\t"), None)
        if rec:
            rows.append({"job": path.stem, "seconds": float(rec["s"]), "max_rss_mb": rec.get("max_rss", "-")})
    return rows


def collect(config: dict, config_files: list[str], results: Path, dataset: Path) -> dict:
    """Everything the template shows, from the run's files."""
    fid_dir = results / "fid"
    paper = config["report"]["paper"]
    rows = []
    for name, label in SET_LABELS.items():
        r = _json(fid_dir / f"{name}.json")
        paper_value = paper.get(PAPER_KEYS[name]) if paper and name in PAPER_KEYS else None
        rows.append({"set": name, "label": label, "nfe": r["nfe"], "fid_min": r["fid_min"], "fid_mean": r["fid_mean"],
                     "fid_sets": r["fid_sets"], "paper": paper_value,
                     "other_modes": {m: v["fid_min"] for m, v in r.get("modes", {}).items() if m != r["mode"]}})
    any_fid = _json(fid_dir / "ect-1step.json")
    curve = _json(fid_dir / "curve.json")
    checkpoints = {name: {"path": str(results / f"{name}.pt"), "sha256": sha256_file(results / f"{name}.pt")}
                   for name in ("teacher", "tuned")}
    return {
        "run": config["run"],
        "title": config["report"].get("title", f"ECT run {config['run']}"),
        "description": config.get("description", ""),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "paper": paper,
        "fid_rows": rows,
        "protocol": {
            "mode": any_fid["mode"],
            "modes": config["fid"]["modes"],
            "feature_net": config["fid"]["feature_net"].get("url", "trained by the feature_net rule (fixed seed)"),
            "feature_net_sha256": any_fid["feature_net_sha256"],
            "feature_net_pinned": bool(config["fid"]["feature_net"].get("sha256")),
            "feature_net_kind": config["fid"]["feature_net"]["kind"],
            "reference": any_fid["reference"],
            "sets": any_fid["sets"],
            "samples_per_set": any_fid["samples_per_set"],
            "seeds": any_fid["seeds"],
            "t_mid": config["sample"]["t_mid"],
            "heun_steps": config["sample"]["heun_steps"],
            "ema_beta": config["tune"].get("ema_beta"),
            "ema_halflife_kimg": config["tune"].get("ema_halflife_kimg"),
            "curve_samples": curve["samples"],
        },
        "curve_points": curve["points"],
        "provenance": {
            "git_commit": _git_commit(Path.cwd()),
            "config_files": config_files,
            "config_yaml": yaml.safe_dump(config, sort_keys=False),
            "dataset": {"path": str(dataset), "content_sha256": any_fid["reference"].get("dataset_sha256"),
                        "file_sha256": sha256_file(dataset)},
            "checkpoints": checkpoints,
            "teacher_source": config["teacher"],
            "versions": _versions(),
            "runtimes": _runtimes(results / "benchmarks"),
        },
    }


def build_report(config: dict, config_files: list[str], results, dataset, out_html) -> Path:
    """Render the report into ``out_html``'s directory, replacing it as a whole."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    results, dataset, out_html = Path(results), Path(dataset), Path(out_html)
    ctx = collect(config, config_files, results, dataset)
    out_dir = out_html.parent
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        grids = {}
        for name in SET_LABELS:
            src = results / "samples" / f"{name}.png"
            if not src.exists():
                raise ReportError(f"missing sample grid {src}")
            shutil.copyfile(src, tmp / f"samples-{name}.png")
            grids[name] = f"samples-{name}.png"
        plots.training_curves({"pretrain": _jsonl(results / "pretrain-log.jsonl"),
                               "tune": _jsonl(results / "train-log.jsonl")}, tmp / "training.png")
        plots.fid_curve(ctx["curve_points"], tmp / "fid-curve.png")
        env = Environment(loader=PackageLoader("ect.report", "templates"), autoescape=True, undefined=StrictUndefined)
        html = env.get_template("report.html.j2").render(**ctx, grids=grids, set_labels=SET_LABELS,
                                                          figures={"training": "training.png",
                                                                   "fid_curve": "fid-curve.png"})
        (tmp / out_html.name).write_text(html)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / out_html.name
