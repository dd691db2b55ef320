"""The HTML report of one run: FID against the paper, sample grids, curves, protocol, provenance.

``build_report`` reads a run's files (their paths come from the run layout, ``ect/layout.py``),
renders ``templates/report.html.j2`` with Jinja2 and writes the page with its images into one
directory, replaced as a whole: a killed report leaves the old one. The report replaces only a
directory it wrote itself (it carries a marker file), never one that holds anything else.
Everything is local (PNG images, inline CSS), so the page reads offline.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from ect.download import RECORD_FILE, ChecksumRecord
from ect.fileio import remove_stale_temporaries, sha256_file
from ect.layout import SAMPLE_SETS, RunLayout
from ect.report import plots

PAGE = "index.html"
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


def collect(config: dict, config_files: list[str]) -> dict:
    """Everything the template shows, from the run's files."""
    layout = RunLayout(config)
    paper = config["report"]["paper"]
    rows = []
    for name, sample_set in SAMPLE_SETS.items():
        r = _json(Path(layout.fid(name)))
        paper_value = paper.get(sample_set.paper_key) if paper and sample_set.paper_key else None
        rows.append({"set": name, "label": sample_set.label, "nfe": r["nfe"], "fid_min": r["fid_min"],
                     "fid_mean": r["fid_mean"], "fid_sets": r["fid_sets"], "paper": paper_value,
                     "other_modes": {m: v["fid_min"] for m, v in r.get("modes", {}).items() if m != r["mode"]}})
    any_fid = _json(Path(layout.fid(next(iter(SAMPLE_SETS)))))
    curve = _json(Path(layout.curve))
    checkpoints = {name: {"path": layout.checkpoint(name), "sha256": sha256_file(layout.checkpoint(name))}
                   for name in ("teacher", "tuned")}
    record = ChecksumRecord(RECORD_FILE)
    downloads = []
    for rule, (path, entry) in layout.downloads.items():
        recorded = record.get(entry["url"])
        if entry.get("sha256") or entry.get("md5"):
            how, digest = "pinned in the preset", entry.get("sha256") or f"md5 {entry['md5']}"
        elif recorded:
            how, digest = f"recorded on first use ({recorded.get('recorded', 'date unknown')})", recorded["sha256"]
        else:
            how, digest = f"not verified: no checksum pinned or recorded in {RECORD_FILE}", ""
        downloads.append({"what": rule.removeprefix("fetch_").replace("_", " "), "url": entry["url"], "path": path,
                          "sha256": digest, "how": how})
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
            "feature_net_check": next((d["how"] for d in downloads if d["path"] == layout.feature_net),
                                      "trained by the feature_net rule"),
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
            "dataset": {"path": layout.dataset, "content_sha256": any_fid["reference"].get("dataset_sha256"),
                        "file_sha256": sha256_file(layout.dataset)},
            "checkpoints": checkpoints,
            "downloads": downloads,
            "teacher_source": config["teacher"],
            "versions": _versions(),
            "runtimes": _runtimes(Path(layout.benchmarks)),
        },
    }


MARKER = ".ect-report"  # in every directory the report writes: the only kind it may replace


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that the report did not write (say, a run's results)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ReportError(f"{out_dir} exists and is not a directory: refusing to replace it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise ReportError(f"{out_dir} holds files that 'ect report' did not write (no {MARKER} marker): refusing "
                          "to replace it; give the report a directory of its own, e.g. reports/<run>")


def build_report(config: dict, config_files: list[str], out_dir) -> Path:
    """Render the report into ``out_dir`` (its page is ``index.html``), replacing the directory as a whole."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    layout = RunLayout(config)
    ctx = collect(config, config_files)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # permissions from the umask, like every output
    try:
        grids = {}
        for name in SAMPLE_SETS:
            src = Path(layout.grid(name))
            if not src.exists():
                raise ReportError(f"missing sample grid {src}")
            shutil.copyfile(src, tmp / f"samples-{name}.png")
            grids[name] = f"samples-{name}.png"
        plots.training_curves({"pretrain": _jsonl(Path(layout.pretrain_log)),
                               "tune": _jsonl(Path(layout.train_log))}, tmp / "training.png")
        plots.fid_curve(ctx["curve_points"], tmp / "fid-curve.png")
        env = Environment(loader=PackageLoader("ect.report", "templates"), autoescape=True, undefined=StrictUndefined)
        html = env.get_template("report.html.j2").render(
            **ctx, grids=grids, set_labels={name: s.label for name, s in SAMPLE_SETS.items()},
            figures={"training": "training.png", "fid_curve": "fid-curve.png"})
        (tmp / PAGE).write_text(html)
        (tmp / MARKER).write_text("written by 'ect report': this directory is replaced as a whole on every run\n")
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / PAGE
