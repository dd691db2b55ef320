"""The HTML report of one run: FID against the paper, sample grids, curves, protocol, provenance.

``build_report`` reads a run's files (their paths come from the run layout, ``ect/layout.py``),
renders ``templates/report.html.j2`` with Jinja2 and writes the page with its images into one
directory, replaced as a whole: a killed report leaves the old one. The report replaces only a
directory it wrote itself (it carries a marker file), never one that holds anything else.
Everything is local (PNG images, inline CSS), so the page reads offline.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from ect.checkpoint import read_checkpoint
from ect.fileio import remove_stale_temporaries, sha256_file
from ect.layout import SAMPLE_SETS, RunLayout
from ect.report import plots
from ect.scaling import read_points
from ect.typed import plain

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


def _runtime(job: str, run: dict | None) -> list[dict]:
    """A step's own record of its time and device (in its output's meta), as a row of the runtime table."""
    if not isinstance(run, dict) or not isinstance(run.get("elapsed_s"), (int, float)):
        return []
    return [{"job": job, "seconds": float(run["elapsed_s"]), "device": str(run.get("device", "?"))[:80]}]


def collect(spec, config_files: list[str]) -> dict:
    """Everything the template shows, from the run's files."""
    layout = RunLayout(spec)
    paper = spec.report.paper
    rows = []
    for name, sample_set in SAMPLE_SETS.items():
        r = _json(Path(layout.fid(name)))
        paper_value = getattr(paper, sample_set.paper_key) if paper and sample_set.paper_key else None
        rows.append({"set": name, "label": sample_set.label, "nfe": r["nfe"], "fid_min": r["fid_min"],
                     "fid_mean": r["fid_mean"], "fid_sets": r["fid_sets"], "paper": paper_value,
                     "verdict": verdict(r["fid_min"], paper_value) if paper_value is not None else None,
                     "other_modes": {m: v["fid_min"] for m, v in r.get("modes", {}).items() if m != r["mode"]}})
    any_fid = _json(Path(layout.fid(next(iter(SAMPLE_SETS)))))
    curve = _json(Path(layout.curve))
    checkpoints = {name: {"path": layout.checkpoint(name), "sha256": sha256_file(layout.checkpoint(name))}
                   for name in ("teacher", "tuned")}
    tuned_meta = read_checkpoint(layout.tuned)["meta"]
    teacher_meta = read_checkpoint(layout.teacher)["meta"]
    cost = {"device": tuned_meta.get("device"), "device_hours": tuned_meta.get("device_hours"),
            "flops": tuned_meta.get("flops"), "kimg": tuned_meta.get("kimg")}
    return {
        **page_header(spec),
        "claims": claims(rows, paper, cost),
        "cost": cost,
        "paper": paper,
        "fid_rows": rows,
        "protocol": {
            "mode": any_fid["mode"],
            "modes": spec.fid.modes,
            "feature_net": spec.fid.feature_net.url or "trained by the feature_net rule (fixed seed)",
            "feature_net_sha256": any_fid["feature_net_sha256"],
            "feature_net_check": next((d["how"] for d in downloads_checked(layout) if d["path"] == layout.feature_net),
                                      "trained by the feature_net rule"),
            "feature_net_kind": spec.fid.feature_net.kind,
            "reference": any_fid["reference"],
            "sets": any_fid["sets"],
            "samples_per_set": any_fid["samples_per_set"],
            "seeds": any_fid["seeds"],
            "t_mid": spec.sample.t_mid,
            "heun_steps": spec.sample.heun_steps,
            "ema_beta": spec.tune.ema_beta,
            "ema_halflife_kimg": spec.tune.ema_halflife_kimg,
            "curve_samples": curve["samples"],
        },
        "curve_points": curve["points"],
        "class_labels": spec.sample.class_labels,
        "provenance": {
            **provenance(spec, config_files, layout, runtimes(spec, layout, teacher_meta, tuned_meta, curve)),
            "dataset": {"path": layout.dataset, "content_sha256": any_fid["reference"].get("dataset_sha256"),
                        "file_sha256": sha256_file(layout.dataset)},
            "checkpoints": checkpoints,
            "teacher_source": spec.teacher,
        },
    }


def runtimes(spec, layout: RunLayout, teacher_meta: dict, tuned_meta: dict, curve: dict) -> list[dict]:
    """Each step's time and device, as the step recorded them in its outputs (checkpoints' meta, the FID
    results, the curve): what the report declares as inputs, so nothing else is read for it."""
    def training(meta):
        return {"elapsed_s": meta.get("elapsed_s"), "device": (meta.get("device") or {}).get("name")}

    rows = _runtime("pretrain", training(teacher_meta)) if spec.teacher.source == "pretrain" else []
    rows += _runtime("tune", training(tuned_meta))
    for name in SAMPLE_SETS:
        runs = _json(Path(layout.fid(name))).get("runs") or {}
        rows += _runtime(f"sample {name}", runs.get("sample")) + _runtime(f"fid {name}", runs.get("fid"))
    return rows + _runtime("fid curve", curve.get("run"))


def downloads_checked(layout: RunLayout) -> list[dict]:
    """Each download of the run and how its checksum was verified (pinned in the preset, or recorded on first
    use), from the record `ect fetch` writes beside it (a declared input of the report)."""
    out = []
    for rule, (path, entry) in layout.downloads.items():
        record = Path(layout.fetch_record(path))
        fetched = _json(record) if record.exists() else {}
        how = fetched.get("verified") or "not fetched by this run"
        out.append({"what": rule.removeprefix("fetch_").replace("_", " "), "url": entry.url, "path": path,
                    "sha256": str(fetched.get("sha256", ""))[:64], "how": str(how)[:200]})
    return out


def provenance(spec, config_files: list[str], layout: RunLayout, runtimes: list[dict]) -> dict:
    """What every report records: code, the run's settings (defaults filled in), downloads, package versions,
    each step's runtime as the step recorded it."""
    settings = {k: v for k, v in plain(spec).items() if v is not None}
    return {"git_commit": _git_commit(Path.cwd()), "config_files": config_files,
            "config_yaml": yaml.safe_dump(settings, sort_keys=False), "downloads": downloads_checked(layout),
            "versions": _versions(), "runtimes": runtimes}


def page_header(spec) -> dict:
    return {"run": spec.run, "title": spec.report.title or f"ECT run {spec.run}",
            "description": spec.description or "",
            "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def collect_scaling(spec, config_files: list[str]) -> dict:
    """Everything a scaling study's report shows, from its points and fits."""
    layout = RunLayout(spec)
    steps = [str(n) for n in spec.fid.curve_steps]
    fits = [_json(Path(layout.scaling_fit(name))) for name in layout.scaling_fit_names(spec.fid.curve_steps)]
    grouped: dict[tuple, dict] = {}
    for row in read_points(layout.scaling_points):
        point = grouped.setdefault((row["size"], float(row["kimg"])), {"size": row["size"], "kimg": float(row["kimg"]),
                                                                       "compute": row["compute"], "sets": {}})
        point["sets"].setdefault(row["steps"], []).append(row["fid"])
    points = [{**p, "fid": {s: sum(v) / len(v) for s, v in p["sets"].items()}} for p in grouped.values()]
    teachers = []
    for size, arch in spec.scaling.sizes.items():
        meta = read_checkpoint(RunLayout(spec, size).teacher)["meta"]
        teachers.append({"size": size, "arch": arch or "the teacher's", "flops": meta.get("flops")})
    statement = spec.report.paper.statement if spec.report.paper else None
    return {**page_header(spec), "steps": steps, "fits": fits, "frontier": [f for f in fits if f["frontier"]],
            "points": sorted(points, key=lambda p: (list(spec.scaling.sizes).index(p["size"]), p["kimg"])),
            "teachers": teachers, "sets": spec.scaling.sets, "samples": spec.scaling.samples,
            "statement": statement or "(no statement in the preset)",
            "provenance": provenance(spec, config_files, layout, [])}


def verdict(ours: float, paper: float) -> dict:
    """How a FID of ours compares with the paper's: within 5 % is reproduced; lower is better."""
    rel = (ours - paper) / paper
    if abs(rel) <= 0.05:
        text, kind = f"reproduced ({rel:+.1%})", "held"
    elif rel < 0:
        text, kind = f"better ({-rel:.0%} lower)", "held"
    else:
        text, kind = f"short by {rel:.0%}", "missed"
    return {"relative": rel, "text": text, "kind": kind}


def claims(rows: list[dict], paper: dict | None, cost: dict) -> list[dict]:
    """The report's top line: each paper number with its verdict, and the compute budget a claim names."""
    if not paper:
        return []
    out = [{"claim": f"{row['label']}: FID {row['paper']}", "ours": f"{row['fid_min']:.2f}", **row["verdict"]}
           for row in rows if row["verdict"]]
    budget = paper.budget
    if budget:
        device = (cost.get("device") or {}).get("name", "an unknown device")
        hours = cost.get("device_hours")
        ours = "not measured" if hours is None else f"{hours:.2f} device-hours on {device}"
        if hours is None or budget.device not in device:
            kind, text = "unjudged", f"measured on {device}, not on an {budget.device}: not comparable"
        else:
            held = hours <= budget.gpu_hours * 1.05
            kind, text = ("held", "within the budget") if held else ("missed", f"{hours / budget.gpu_hours:.1f}x the budget")
        out.append({"claim": f"within {budget.gpu_hours:g} {budget.device} GPU-hour(s)", "ours": ours,
                    "text": text, "kind": kind})
    return out


MARKER = ".ect-report"  # in every directory the report writes: the only kind it may replace


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that the report did not write (say, a run's results)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ReportError(f"{out_dir} exists and is not a directory: refusing to replace it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise ReportError(f"{out_dir} holds files that 'ect report' did not write (no {MARKER} marker): refusing "
                          "to replace it; give the report a directory of its own, e.g. reports/<run>")


def build_report(spec, config_files: list[str], out_dir) -> Path:
    """Render the report into ``out_dir`` (its page is ``index.html``), replacing the directory as a whole."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    layout = RunLayout(spec)
    ctx = (collect_scaling if layout.scaling else collect)(spec, config_files)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # permissions from the umask, like every output
    try:
        env = Environment(loader=PackageLoader("ect.report", "templates"), autoescape=True, undefined=StrictUndefined)
        if layout.scaling:
            plots.scaling(ctx["points"], ctx["fits"], tmp / "scaling.png")
            html = env.get_template("scaling.html.j2").render(**ctx, figure="scaling.png")
        else:
            grids = {}
            for name in SAMPLE_SETS:
                src = Path(layout.grid(name))
                if not src.exists():
                    raise ReportError(f"missing sample grid {src}")
                shutil.copyfile(src, tmp / f"samples-{name}.png")
                grids[name] = f"samples-{name}.png"
            plots.training_curves({"pretrain": _jsonl(Path(layout.pretrain_log)),
                                   "tune": _jsonl(Path(layout.train_log))}, tmp / "training.png")
            plots.fid_curve(ctx["curve_points"], (ctx["cost"]["device"] or {}).get("type"), tmp / "fid-curve.png")
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
