"""The HTML report of one run: FID against the paper, sample grids, curves, protocol, provenance.

``build_report`` reads a run's files (their paths come from the run layout, ``ect/layout.py``),
renders ``templates/report.html.j2`` with Jinja2 and writes the page with its images into one
directory, replaced as a whole: a killed report leaves the old one. The report replaces only a
directory it wrote itself (it carries a marker file), never one that holds anything else.
Everything is local (PNG images, inline CSS), so the page reads offline.
"""
from __future__ import annotations

import os
import platform
import posixpath
import re
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from ect.checkpoint import read_checkpoint
from ect.claims import BUDGET, claim_record, spread
from ect.errors import BadInput
from ect.fid import read_curve, read_emas, read_fid_result, read_reference_check, read_snapshot_fid
from ect.fileio import read_json, remove_stale_temporaries, sha256_file, write_json_atomic
from ect.layout import SAMPLE_SETS, RunLayout
from ect.report import plots
from ect.scaling import METRICS, read_fit, read_points
from ect.train import read_train_log
from ect.typed import plain

PAGE = "index.html"
PACKAGES = ["ect-pipeline", "torch", "torchvision", "numpy", "scipy", "clean-fid", "snakemake", "dvc", "jinja2",
            "matplotlib", "scikit-learn"]


class ReportError(BadInput):
    pass


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
        r = read_fid_result(layout.fid(name))
        rows.append({"set": name, "label": sample_set.label, "nfe": r["nfe"], "fid_min": r["fid_min"],
                     "fid_mean": r["fid_mean"], "fid_sets": r["fid_sets"],
                     "other_modes": {m: v["fid_min"] for m, v in r.get("modes", {}).items() if m != r["mode"]},
                     "dinov2": r.get("modes", {}).get("fd_dinov2")})
    any_fid = read_fid_result(layout.fid(next(iter(SAMPLE_SETS))))
    curve = read_curve(layout.curve)
    checkpoints = {name: {"path": layout.checkpoint(name), "sha256": sha256_file(layout.checkpoint(name))}
                   for name in ("teacher", "tuned")}
    tuned_meta = read_checkpoint(layout.tuned)["meta"]
    teacher_meta = read_checkpoint(layout.teacher)["meta"]
    cost = {"device": tuned_meta.get("device"), "device_hours": tuned_meta.get("device_hours"),
            "flops": tuned_meta.get("flops"), "kimg": tuned_meta.get("kimg")}
    return {
        **page_header(spec),
        "claims": paper_claims(spec, layout),
        "budget": read_json(layout.budget_fid, "budget judgement", BUDGET) if layout.judges_budget else None,
        "reference_check": read_reference_check(layout.reference_check) if layout.reference_check else None,
        "emas": ema_table(read_emas(layout.emas_fid)) if layout.emas_fid else None,
        "cost": cost,
        "cost_context": cost_context(spec, tuned_meta),
        "paper": paper,
        "fid_rows": rows,
        "protocol": {
            "mode": any_fid["mode"],
            "modes": spec.fid.modes,
            "dinov2": spec.fid.dinov2 is not None,
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


def ema_table(scored: dict) -> dict:
    """Every EMA's mean of each metric at each step count, the lowest of each, and the output EMA."""
    keys = sorted({k for p in scored["points"] for k in p if k.startswith(("fid_", "fd_dinov2_"))})
    rows = [{"ema_std": p["ema_std"], "output": p["ema_std"] == scored["output_ema_std"],
             "mean": {k: sum(p[k]) / len(p[k]) for k in keys if k in p}} for p in scored["points"]]
    lowest = {k: min(r["mean"][k] for r in rows if k in r["mean"]) for k in keys}
    return {"keys": keys, "rows": sorted(rows, key=lambda r: r["ema_std"]), "lowest": lowest,
            "output_ema_std": scored["output_ema_std"], "sets": scored["sets"], "samples": scored["samples"]}


def runtimes(spec, layout: RunLayout, teacher_meta: dict, tuned_meta: dict, curve: dict) -> list[dict]:
    """Each step's time and device, as the step recorded them in its outputs (checkpoints' meta, the FID
    results, the curve): what the report declares as inputs, so nothing else is read for it."""
    def training(meta):
        return {"elapsed_s": meta.get("elapsed_s"), "device": (meta.get("device") or {}).get("name")}

    rows = _runtime("pretrain", training(teacher_meta)) if spec.teacher.source == "pretrain" else []
    rows += _runtime("tune", training(tuned_meta))
    for name in SAMPLE_SETS:
        runs = read_fid_result(layout.fid(name)).get("runs")
        runs = runs if type(runs) is dict else {}
        rows += _runtime(f"sample {name}", runs.get("sample")) + _runtime(f"fid {name}", runs.get("fid"))
    return rows + _runtime("fid curve", curve.get("run"))


def downloads_checked(layout: RunLayout) -> list[dict]:
    """Each download of the run and how its checksum was verified (pinned in the preset, or recorded on first
    use), from the record `ect fetch` writes beside it (a declared input of the report)."""
    out = []
    for rule, (path, entry) in layout.downloads.items():
        record = Path(layout.fetch_record(path))
        fetched = read_json(record, "download record") if record.exists() else {}
        fetched = fetched if type(fetched) is dict else {}
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
    every_fit = [{**read_fit(layout.scaling_fit(name)), "name": name, "kind": _fit_kind(name, spec)}
                 for name in layout.scaling_fits(spec.fid.curve_steps)]
    fits = [f for f in every_fit if f.get("fitted") is not False]
    not_fitted = [{"kind": f["kind"], "steps": f["steps"], "metric": metric, "reason": reason}
                  for f in every_fit for metric, reason in
                  ({**({"fid": f["reason"]} if f.get("fitted") is False else {}), **f.get("not_fitted", {})}).items()]
    teachers = []
    for size, arch in spec.scaling.sizes.items():
        meta = read_checkpoint(RunLayout(spec, size).teacher)["meta"]
        teachers.append({"size": size, "arch": arch or "the teacher's", "flops": meta.get("flops")})
    statement = spec.report.paper.statement if spec.report.paper else None
    points = scaling_points(layout, spec)
    return {**page_header(spec), "claims": scaling_claims(spec, points), "steps": steps, "fits": fits,
            "not_fitted": not_fitted,
            "metrics": [m for m in METRICS if m == METRICS[0] or any(m in f for f in fits)],
            "frontier": [f for f in fits if f["frontier"]], "points": points,
            "teachers": teachers, "sets": spec.scaling.sets, "samples": spec.scaling.samples,
            "statement": statement or "(no statement in the preset)",
            "reference_check": read_reference_check(layout.reference_check) if layout.reference_check else None,
            "provenance": provenance(spec, config_files, layout, [])}


def _fit_kind(name: str, spec) -> str:
    """What a fit of the study is, in words (its name: ect/layout.py, RunLayout.scaling_fits)."""
    head = name.rsplit("-", 1)[0] if "-" in name else ""
    if not head:
        return "frontier across sizes (FLOPs)"
    if head == "size":
        return "across sizes at one budget (parameters)"
    if head.endswith("-batch"):
        return f"size {head.removesuffix('-batch')}, batch-grown runs (FLOPs)"
    return f"size {head}, prefix budgets (FLOPs)"


def scaling_claims(spec, points: list[dict]) -> list[dict]:
    """A scaling study's published numbers, each about one of its runs (report.paper.claims[].model): judged
    from that run's point at its final budget, scored on scaling.sets sets."""
    records = []
    for claim in spec.report.paper.claims if spec.report.paper else ():
        key = f"fid_{SAMPLE_SETS[claim.set].steps}"
        final = max((p for p in points if p["run"] == claim.model and key in p["sets"]), key=lambda p: p["kimg"],
                    default=None)
        if final is None:
            raise ReportError(f"no point of run {claim.model} in {RunLayout(spec).scaling_points}: rerun the study")
        label = f"{SAMPLE_SETS[claim.set].label}, run {claim.model}, FID {claim.fid:g} at {final['kimg']:g} kimg"
        records.append(claim_record(label, claim.fid, final["sets"][key], claim.statistic, claim.source,
                                    claim.secondary, set=claim.set, kimg=final["kimg"], model=claim.model))
    return records


def scaling_points(layout: RunLayout, spec) -> list[dict]:
    """The points table: a row per run and budget, each metric's mean and sets at each step count."""
    grouped: dict[tuple, dict] = {}
    for row in read_points(layout.scaling_points):
        point = grouped.setdefault((row.get("run", ""), float(row["kimg"])), {
            "run": row.get("run", ""), "size": row.get("size", ""), "design": row.get("design", "prefix"),
            "kimg": float(row["kimg"]), "compute": row["compute"], "params": row.get("params"), "sets": {}})
        point["sets"].setdefault(f"{row.get('metric', 'fid')}_{row['steps']}", []).append(row["fid"])
    points = [{**p, "mean": {k: sum(v) / len(v) for k, v in p["sets"].items()}} for p in grouped.values()]
    order = list(spec.scaling.models)
    return sorted(points, key=lambda p: (order.index(p["run"]) if p["run"] in order else len(order), p["kimg"]))


FLOP_CONVENTION = ("2 FLOPs a multiply-add, counted by torch's FLOP counter on matrix products and convolutions: "
                   "ECT's student forward and backward and its target forward pass")
PRETRAINED_IN_NAME = re.compile(r"^edm2-img\d+-[a-z]+-(\d{7})-[\d.]+\.pkl$")  # EDM2's files name their length


def cost_context(spec, tuned_meta: dict) -> dict:
    """How tuning compares with the teacher's own training: images seen (the teacher's from the preset, from an
    EDM2 file's name, or from pretraining here), and the FLOP convention of every FLOP count."""
    tuning = tuned_meta.get("kimg")
    if spec.teacher.source == "pretrain":
        pretraining, how = spec.pretrain.kimg, "trained here (pretrain.kimg)"
    elif spec.teacher.pretraining_kimg:
        pretraining, how = spec.teacher.pretraining_kimg, "the preset (teacher.pretraining_kimg)"
    else:
        match = PRETRAINED_IN_NAME.match(posixpath.basename(spec.teacher.url))
        pretraining, how = (float(match.group(1)), "the file's name") if match else (None, "not known")
    ratio = tuning / pretraining if tuning and pretraining else None
    return {"flops": FLOP_CONVENTION, "tuning_kimg": tuning, "pretraining_kimg": pretraining,
            "pretraining_from": how, "ratio": ratio}


def paper_claims(spec, layout: RunLayout) -> list[dict]:
    """Every published number with the statistic, spread and verdict it is judged by (claims.json): numbers of
    the final model from its FID sets, numbers at an earlier budget from that snapshot's full-protocol sets, a
    compute-budget claim from the budget judgement (ect/claims.py)."""
    paper = spec.report.paper
    if paper is None or spec.scaling:
        return []
    records = []
    for claim in paper.claims:
        label = SAMPLE_SETS[claim.set].label
        if claim.kimg is None or claim.kimg == spec.tune.kimg:
            fids, at = read_fid_result(layout.fid(claim.set))["fid_sets"], f"{spec.tune.kimg:g} kimg (the final model)"
        else:
            key = f"fid_{SAMPLE_SETS[claim.set].steps}step"
            fids, at = read_snapshot_fid(layout.snapshot_fid(f"{claim.kimg:g}"), key)[key], f"{claim.kimg:g} kimg (a snapshot)"
        records.append(claim_record(f"{label}, FID {claim.fid:g} at {at}", claim.fid, _fids(fids, layout), claim.statistic,
                                    claim.source, claim.secondary, set=claim.set,
                                    kimg=claim.kimg or spec.tune.kimg))
    if paper.budget:
        records.append(budget_record(spec, read_json(layout.budget_fid, "budget judgement", BUDGET)))
    return records


def _fids(values, layout: RunLayout) -> list[float]:
    if not (isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values)):
        raise ReportError(f"a FID result of run {layout.run} has no FID sets: rerun its scoring step")
    return [float(v) for v in values]


def budget_record(spec, judged: dict) -> dict:
    """The compute-budget claim as an entry of claims.json, from `ect fid-budget`'s judgement."""
    budget = spec.report.paper.budget
    best = judged.get("best_within_budget") or {}
    sets = best.get("fid_sets") or ([best["fid"]] if "fid" in best else [])
    return {"claim": f"{SAMPLE_SETS[budget.set].label}, FID {budget.fid:g} within {budget.gpu_hours:g} "
                     f"{budget.device} GPU-hour(s)",
            "paper": budget.fid, "ours": best.get("fid"), "statistic": judged["statistic"],
            "spread": spread(sets) if sets else None, "verdict": judged["verdict"], "text": judged["text"],
            "source": budget.source, "secondary": False, "set": budget.set,
            "time_to_fid_hours": judged.get("time_to_fid_hours"), "measured_device": judged.get("measured_device"),
            "best_device_hours": best.get("device_hours")}


MARKER = ".ect-report"  # in every directory the report writes: the only kind it may replace


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that the report did not write (say, a run's results)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ReportError(f"{out_dir} exists and is not a directory: refusing to replace it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise ReportError(f"{out_dir} holds files that 'ect report' did not write (no {MARKER} marker): refusing "
                          "to replace it; give the report a directory of its own, e.g. reports/<run>")


def build_report(spec, config_files: list[str], out_dir, claims_out=None) -> Path:
    """Render the report into ``out_dir`` (its page is ``index.html``), replacing the directory as a whole, and
    write every verdict to ``claims_out`` (claims.json, a DVC metric)."""
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
        render(ctx, layout, tmp)
        (tmp / MARKER).write_text("written by 'ect report': this directory is replaced as a whole on every run\n")
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if claims_out is not None:
            write_json_atomic(claims_out, ctx["claims"])
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


def render(ctx: dict, layout: RunLayout, out: Path) -> None:
    """The page and its images into ``out``: a scaling study's, or a run's."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("ect.report", "templates"), autoescape=True, undefined=StrictUndefined)
    if layout.scaling:
        plots.scaling(ctx["points"], ctx["fits"], out / "scaling.png")
        (out / PAGE).write_text(env.get_template("scaling.html.j2").render(**ctx, figure="scaling.png"))
        return
    grids = {}
    for name in SAMPLE_SETS:
        src = Path(layout.grid(name))
        if not src.exists():
            raise ReportError(f"missing sample grid {src}")
        shutil.copyfile(src, out / f"samples-{name}.png")
        grids[name] = f"samples-{name}.png"
    logs = {"pretrain": layout.pretrain_log, "tune": layout.train_log}
    plots.training_curves({name: read_train_log(path) if Path(path).exists() else [] for name, path in logs.items()},
                          out / "training.png")
    plots.fid_curve(ctx["curve_points"], (ctx["cost"]["device"] or {}).get("type"), out / "fid-curve.png")
    (out / PAGE).write_text(env.get_template("report.html.j2").render(
        **ctx, grids=grids, set_labels={name: s.label for name, s in SAMPLE_SETS.items()},
        figures={"training": "training.png", "fid_curve": "fid-curve.png"}))
