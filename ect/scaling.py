"""Scaling laws of a metric (FID, and FD_DINOv2 beside it) against training compute, or against model size
at a fixed budget.

Two forms are fitted: the pure power law ``metric = coefficient * x ** (-exponent)`` (least squares in
log-log space), and the law with a floor ``metric = coefficient * x ** (-exponent) + floor``
(``saturating``: nonlinear least squares in log space, the floor at least 0 and below every point).
``preferred`` is the form with the smaller held-out error (each fitted without the largest-x point,
predicting it), and ``supports`` says in words what the data support: a power law, a power law with a
floor, or neither at this range.

Intervals measure noise, not misfit: a point's value is the mean over its runs (training seeds) of each
run's mean over its FID sets; a bootstrap replicate redraws the runs within each point and the sets
within each run, keeps the points where they are (the design), and, for the compute frontier across
sizes, selects the frontier again. A law measured without noise gets a zero-width interval; with
set-to-set noise, an interval as wide as that noise makes the slope uncertain. Resampling the points as
well would count the same noise twice (their scatter around the law is that noise) and add the misfit
of a wrong form to it: the misfit is reported apart, as the held-out error, r² and ``preferred``.
``spreads`` gives the set-to-set and run-to-run spreads beside the interval.

Rows are CSV, one per FID set, with columns ``compute`` and ``fid`` (the metric's value) and optionally
``size``, ``steps``, ``set``, ``kimg``, ``run`` (the training run), ``design`` (``prefix``: a snapshot of
a longer run; ``batch``: a run of its own, compute grown by its batch), ``params``,
``flops_per_iteration`` and ``metric`` (``fid`` or ``fd_dinov2``). Rows of one size, step count, design
and budget form a point. The bootstrap is vectorised over points: 100k rows fit in seconds
(``benchmarks/scaling_fit.py``).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from ect.errors import BadInput
from ect.fileio import check_fields, is_number, read_json

REQUIRED = ("compute", "fid")
OPTIONAL = ("size", "steps", "set", "kimg", "run", "design", "params", "flops_per_iteration", "metric")
NUMERIC = ("params", "flops_per_iteration", "kimg")
METRICS = ("fid", "fd_dinov2")  # the first is the headline; every other is fitted under its own key
DESIGNS = ("prefix", "batch")  # a snapshot of a longer run, or a run of its own with a grown batch
MAX_ROWS = 1_000_000
BOOTSTRAP, BOOTSTRAP_SATURATING = 1000, 200
GOOD_HOLDOUT, GOOD_R2 = 0.10, 0.9  # what "the data support a law" means here (docs/scaling.md)


class ScalingError(BadInput):
    pass


class TooFewPoints(ScalingError):
    """A frontier too short for a law (noise can leave two of many points on it): a fact about the data, written
    into the fit's file and shown in the report rather than failing the study."""


# ---------------------------------------------------------------------------------------------
# Points: rows grouped by (size, steps, compute), runs within a point, sets within a run.

def read_points(path) -> list[dict]:
    """The rows of a points CSV, checked: numbers positive and finite, the required columns present, at most
    MAX_ROWS rows."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a byte-order mark (a spreadsheet's) is not data
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED if c not in columns]
            if missing:
                raise ScalingError(f"{path} has no column {', '.join(missing)} (columns: {', '.join(columns) or 'none'})")
            rows = []
            for line, row in enumerate(reader, start=2):
                if len(rows) >= MAX_ROWS:
                    raise ScalingError(f"{path} has more than {MAX_ROWS:,} rows")
                rows.append(_row(row, path, line))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ScalingError(f"cannot read points {path}: {exc}") from None
    return rows


def _row(row: dict, path, line: int) -> dict:
    out = {}
    for column in REQUIRED + NUMERIC:
        if column in NUMERIC and row.get(column) in (None, ""):
            continue
        try:
            value = float(row[column])
        except (TypeError, ValueError):
            raise ScalingError(f"{path}:{line}: {column} {str(row[column])[:40]!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise ScalingError(f"{path}:{line}: {column} must be positive and finite, not {value}")
        out[column] = value
    for column in OPTIONAL:
        if column not in NUMERIC and row.get(column) not in (None, ""):
            out[column] = str(row[column])[:80]
    for column, allowed in (("metric", METRICS), ("design", DESIGNS)):
        if column in out and out[column] not in allowed:
            raise ScalingError(f"{path}:{line}: {column} {out[column]!r} is not one of {', '.join(allowed)}")
    return out


def points_of(rows: list[dict]) -> list[dict]:
    """Rows grouped into points, one per (size, steps, design, budget): {run: [the metric of each set]}, with
    the point's compute (the mean over its runs' rows), parameters and FLOPs per iteration when given."""
    grouped: dict[tuple, dict] = {}
    for row in rows:
        design = row.get("design", "prefix")
        key = (row.get("size", ""), row.get("steps", ""), design, row.get("kimg", row["compute"]))
        point = grouped.setdefault(key, {"size": key[0], "steps": key[1], "design": design, "runs": {},
                                         "computes": [], **{k: row[k] for k in NUMERIC if k in row}})
        point["runs"].setdefault(row.get("run", "0"), []).append(row["fid"])
        point["computes"].append(row["compute"])
    points = [{**{k: v for k, v in p.items() if k != "computes"}, "compute": float(np.mean(p["computes"]))}
              for p in grouped.values()]
    return sorted(points, key=lambda p: p["compute"])


def point_value(point: dict) -> float:
    """A point's metric: the mean over its runs of each run's mean over sets."""
    return float(np.mean([np.mean(sets) for sets in point["runs"].values()]))


def frontier_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The points that no point of at most their x beats (lower y): the compute frontier."""
    order = np.lexsort((y, x))
    best = np.minimum.accumulate(y[order])
    keep_sorted = np.concatenate([[True], y[order][1:] < best[:-1]])
    mask = np.zeros(len(x), bool)
    mask[order[keep_sorted]] = True
    return mask


def frontier(points: list[dict]) -> list[dict]:
    x = np.array([p["compute"] for p in points])
    y = np.array([point_value(p) for p in points])
    return [p for p, keep in zip(points, frontier_mask(x, y), strict=True) if keep]


# ---------------------------------------------------------------------------------------------
# The two forms.

def _pure(log_x: np.ndarray, log_y: np.ndarray) -> tuple[float, float]:
    """(log coefficient, exponent) of log y = a - b log x, closed form."""
    xm, ym = log_x.mean(), log_y.mean()
    var = ((log_x - xm) ** 2).sum()
    if var <= 0:
        raise ScalingError("every point has the same x: nothing to fit")
    b = -((log_x - xm) * (log_y - ym)).sum() / var
    return float(ym + b * xm), float(b)


def _saturating(x: np.ndarray, y: np.ndarray, start: tuple | None = None) -> tuple[float, float, float] | None:
    """(coefficient, exponent, floor) of y = A x^-b + F by least squares in log space, x scaled to its median
    for conditioning; ``start`` an (exponent, floor) to start from (else several); None when it fails."""
    from scipy.optimize import least_squares

    scale = float(np.median(x))
    u, log_y, floor_max = x / scale, np.log(y), float(y.min())

    log_u = np.log(u)

    def residuals(theta):
        log_a, b, floor = theta
        return np.log(np.exp(log_a - b * log_u) + floor) - log_y

    def jacobian(theta):  # analytic: three columns, no finite differences
        log_a, b, floor = theta
        power = np.exp(log_a - b * log_u)
        total = power + floor
        return np.stack([power / total, -power * log_u / total, 1 / total], axis=1)

    guesses = [start] if start is not None else [(0.5, f * floor_max) for f in (0.0, 0.3, 0.6, 0.9)]
    starts = [(math.log(max(float(y.max()) - min(floor, floor_max), 1e-12)), b, floor) for b, floor in guesses]
    best = None
    for log_a, b, floor in starts:
        theta0 = (log_a, min(max(b, 1e-3), 9.0), min(max(floor, 0.0), floor_max * 0.999))
        try:
            result = least_squares(residuals, theta0, jac=jacobian, bounds=([-50, 1e-4, 0], [50, 10, floor_max * 0.9999]))
        except (ValueError, FloatingPointError):
            continue
        if result.success and (best is None or result.cost < best.cost):
            best = result
    if best is None:
        return None
    log_a, b, floor = best.x
    return math.exp(log_a) * scale**b, float(b), float(floor)


def _predict(form: str, params: tuple, x: float) -> float:
    if form == "pure":
        return math.exp(params[0] - params[1] * math.log(x))
    coefficient, exponent, floor = params
    return coefficient * x ** (-exponent) + floor


def _holdout(form: str, x: np.ndarray, y: np.ndarray) -> dict | None:
    """Fit without the largest-x point, predict it."""
    largest = int(np.argmax(x))
    keep = np.arange(len(x)) != largest
    if form == "pure":
        params = _pure(np.log(x[keep]), np.log(y[keep]))
    else:
        if keep.sum() < 3:
            return None
        params = _saturating(x[keep], y[keep])
        if params is None:
            return None
    predicted = _predict(form, params, float(x[largest]))
    return {"x": float(x[largest]), "fid": float(y[largest]), "predicted": predicted,
            "rel_error": (predicted - float(y[largest])) / float(y[largest])}


# ---------------------------------------------------------------------------------------------
# The bootstrap: runs within points, sets within runs, points; the frontier redone each time.

class Resampler:
    """A point's runs and sets as padded arrays, to draw bootstrap replicates of every point at once."""

    def __init__(self, points: list[dict]):
        runs = [list(p["runs"].values()) for p in points]
        self.n_runs = np.array([len(r) for r in runs])
        max_runs, max_sets = self.n_runs.max(), max(len(s) for r in runs for s in r)
        self.values = np.full((len(points), max_runs, max_sets), np.nan)
        self.n_sets = np.ones((len(points), max_runs), int)
        for i, point_runs in enumerate(runs):
            for j, sets in enumerate(point_runs):
                self.values[i, j, :len(sets)], self.n_sets[i, j] = sets, len(sets)

    def replicate(self, rng: np.random.Generator) -> np.ndarray:
        """Each point's value with its runs and their sets drawn with replacement."""
        points, max_runs = self.values.shape[:2]
        run_pick = (rng.random((points, max_runs)) * self.n_runs[:, None]).astype(int)
        sets = np.take_along_axis(self.n_sets, run_pick, axis=1)
        set_pick = (rng.random((points, max_runs, self.values.shape[2])) * sets[..., None]).astype(int)
        drawn = self.values[np.arange(points)[:, None, None], run_pick[..., None], set_pick]
        in_set = np.arange(self.values.shape[2])[None, None, :] < sets[..., None]
        run_means = np.where(in_set, drawn, 0.0).sum(axis=2) / sets
        in_run = np.arange(max_runs)[None, :] < self.n_runs[:, None]
        return np.where(in_run, run_means, 0.0).sum(axis=1) / self.n_runs


def bootstrap(points: list[dict], x: np.ndarray, use_frontier: bool, seed: int = 0, start=None) -> dict:
    """95 % intervals of the exponent of both forms: each replicate redraws every point's runs and their sets
    (the noise), keeps the points' x (the design), and selects the frontier again when the fit is of the
    frontier (``start``: the saturating fit's exponent and floor, to start each refit from)."""
    rng, draws = np.random.default_rng(seed), Resampler(points)
    pure, saturating = [], []
    saturating_replicates = max(50, min(BOOTSTRAP_SATURATING, 2_000_000 // len(points)))  # nonlinear: fewer for many
    for i in range(BOOTSTRAP):
        bx, by = x, draws.replicate(rng)
        if use_frontier:
            keep = frontier_mask(bx, by)
            bx, by = bx[keep], by[keep]
        if len(np.unique(bx)) < 2:
            continue  # a replicate with one x has no slope
        pure.append(_pure(np.log(bx), np.log(by))[1])
        if start is not None and i < saturating_replicates and len(np.unique(bx)) >= 3:
            fitted = _saturating(bx, by, start)
            if fitted is not None:
                saturating.append(fitted[1])
    return {"pure": _interval(pure), "saturating": _interval(saturating), "replicates": len(pure)}


def _interval(values: list[float]) -> list[float] | None:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else None


# ---------------------------------------------------------------------------------------------
# A fit, in both forms, with its spreads and what it supports.

def fit(points: list[dict], use_frontier: bool = False, x_key: str = "compute", seed: int = 0) -> dict:
    """Both forms through ``points`` (the frontier of them, with ``use_frontier``) against ``x_key``."""
    if any(x_key not in p for p in points):
        raise ScalingError(f"a point has no {x_key}: the points table lacks that column")
    selected = frontier(points) if use_frontier else points
    if len(points) < 3:
        raise ScalingError(f"a power law needs at least 3 points of different {x_key}, got {len(points)}")
    if len(selected) < 3:  # enough points, but a noisy frontier keeps fewer
        raise TooFewPoints(f"the frontier keeps {len(selected)} of {len(points)} points (a power law needs 3): "
                           "the metric does not fall steadily with compute")
    x = np.array([p[x_key] for p in selected], dtype=np.float64)
    y = np.array([point_value(p) for p in selected])
    try:
        with np.errstate(over="raise"):
            result = _forms(selected, x, y)
            sat = result["saturating"]
            start = (sat["exponent"], sat["floor"]) if sat["exponent"] is not None else None
            result["exponent_ci95"], sat["exponent_ci95"], replicates = _intervals(points, use_frontier, x_key, seed,
                                                                                   start)
    except (FloatingPointError, OverflowError) as exc:
        raise ScalingError(f"the fit overflows ({exc}): the points span too many orders of magnitude") from None
    if not all(math.isfinite(v) for v in (result["coefficient"], result["exponent"], result["r2"])):
        raise ScalingError("the fit is not finite: the points span too many orders of magnitude")
    return {**result, "bootstrap": replicates, "spreads": spreads(selected), "x": x_key, "frontier": use_frontier}


def _intervals(points: list[dict], use_frontier: bool, x_key: str, seed: int, start):
    x = np.array([p[x_key] for p in points], dtype=np.float64)
    intervals = bootstrap(points, x, use_frontier, seed, start)
    return intervals["pure"], intervals["saturating"], intervals["replicates"]


def _forms(points: list[dict], x: np.ndarray, y: np.ndarray) -> dict:
    log_x, log_y = np.log(x), np.log(y)
    a, b = _pure(log_x, log_y)
    residual = log_y - (a - b * log_x)
    total = ((log_y - log_y.mean()) ** 2).sum()
    r2 = 1 - float((residual**2).sum() / total) if total > 0 else 1.0
    saturating = _saturating(x, y)
    held = {"pure": _holdout("pure", x, y), "saturating": _holdout("saturating", x, y) if saturating else None}
    errors = {form: abs(h["rel_error"]) for form, h in held.items() if h is not None}
    preferred = min(errors, key=errors.get)
    sat = ({"coefficient": saturating[0], "exponent": saturating[1], "floor": saturating[2],
            "holdout": held["saturating"]} if saturating else
           {"coefficient": None, "exponent": None, "floor": None, "holdout": None})
    return {"coefficient": math.exp(a), "exponent": b, "r2": r2, "n_points": len(points),
            "holdout": held["pure"], "saturating": sat, "preferred": preferred,
            "supports": supports(preferred, errors[preferred], r2),
            "points": [{"x": float(xi), "compute": p["compute"], "fid": float(yi),
                        "fid_sets": [v for sets in p["runs"].values() for v in sets], "runs": len(p["runs"]),
                        "design": p["design"], **({"size": p["size"]} if p["size"] != "" else {}),
                        **({k: p[k] for k in ("params", "flops_per_iteration", "kimg") if k in p})}
                       for p, xi, yi in zip(points, x, y, strict=True)]}


def supports(preferred: str, held_out_error: float, r2: float) -> str:
    """What the data support, in words."""
    if held_out_error <= GOOD_HOLDOUT and (preferred == "saturating" or r2 >= GOOD_R2):
        return "a power law with a floor" if preferred == "saturating" else "a power law"
    return "neither a power law nor one with a floor at this range"


def spreads(points: list[dict]) -> dict:
    """How much a point's metric moves from set to set (within a run) and from run to run (training seeds), as
    median relative standard deviations; null where there is nothing to compare."""
    set_spread = [np.std(sets, ddof=1) / np.mean(sets) for p in points for sets in p["runs"].values()
                  if len(sets) > 1]
    run_spread = [np.std(means, ddof=1) / np.mean(means) for p in points
                  if len(means := [np.mean(s) for s in p["runs"].values()]) > 1]
    return {"set_to_set": float(np.median(set_spread)) if set_spread else None,
            "run_to_run": float(np.median(run_spread)) if run_spread else None,
            "points_with_several_runs": len(run_spread)}


def fit_file(path, steps: str | None = None, size: str | None = None, use_frontier: bool = False,
             axis: str = "compute", design: str | None = None, budget_kimg: float | None = None) -> dict:
    """`ect scaling-fit`: the points of a CSV, filtered; a fit of FID against compute (of a size, or the frontier
    across sizes), or against model size at a fixed budget (``axis`` "size": parameters, and FLOPs per
    iteration). Every other metric of the rows (FD_DINOv2) is fitted alike, under its own key."""
    rows = read_points(path)
    if steps is not None:
        rows = [r for r in rows if r.get("steps") == str(steps)]
    if size is not None:
        rows = [r for r in rows if r.get("size") == size]
    if design is not None:
        rows = [r for r in rows if r.get("design", "prefix") == design]
    if axis == "size":
        budget_kimg = _budget_of(rows, budget_kimg, path)
    result, not_fitted = None, {}
    for metric in METRICS:
        chosen = [r for r in rows if r.get("metric", "fid") == metric]
        if not chosen and metric != "fid":
            continue
        try:
            fitted = (_fit_sizes(chosen, budget_kimg, path) if axis == "size" else
                      fit(points_of(chosen), use_frontier=use_frontier))
        except TooFewPoints as exc:
            not_fitted[metric] = str(exc)
            continue
        result = fitted if result is None else {**result, metric: fitted}
    if result is None:  # FID itself: the file says why there is no law
        result = {"fitted": False, "reason": not_fitted.pop(METRICS[0])}
    return {**result, "not_fitted": not_fitted, "source": str(Path(path)), "steps": steps, "size": size,
            "design": design, "axis": axis, "budget_kimg": budget_kimg}


def _budget_of(rows: list[dict], budget_kimg: float | None, path) -> float:
    """The fixed budget the size axis compares at: the given one, or the largest every size reaches by prefix."""
    if budget_kimg is not None:
        return budget_kimg
    by_size: dict[str, set] = {}
    for r in rows:
        if r.get("design", "prefix") == "prefix":
            by_size.setdefault(r.get("size", ""), set()).add(r.get("kimg"))
    shared = set.intersection(*by_size.values()) - {None} if by_size else set()
    if not shared:
        raise ScalingError(f"{path}: no budget (kimg) that every size reaches: nothing to compare sizes at")
    return max(shared)


def _fit_sizes(rows: list[dict], budget_kimg: float, path) -> dict:
    """The metric against parameters at ``budget_kimg`` (prefix points), and against FLOPs per iteration."""
    picked = points_of([r for r in rows if r.get("kimg") == budget_kimg and r.get("design", "prefix") == "prefix"])
    if len({p["size"] for p in picked}) < 3:
        raise ScalingError(f"{path}: a law across model sizes needs at least 3 sizes at {budget_kimg:g} kimg")
    if any("params" not in p or "flops_per_iteration" not in p for p in picked):
        raise ScalingError(f"{path}: the size axis needs the columns params and flops_per_iteration")
    per_iteration = fit(picked, x_key="flops_per_iteration")
    return {**fit(picked, x_key="params"),
            "against_flops_per_iteration": {k: v for k, v in per_iteration.items() if k != "points"}}


FIT = {"coefficient": is_number, "exponent": is_number, "r2": is_number, "n_points": lambda v: type(v) is int,
       "frontier": lambda v: type(v) is bool, "holdout": lambda v: type(v) is dict,
       "saturating": lambda v: type(v) is dict, "preferred": lambda v: v in ("pure", "saturating"),
       "supports": lambda v: type(v) is str, "spreads": lambda v: type(v) is dict,
       "exponent_ci95": lambda v: v is None or type(v) is list and len(v) == 2 and all(is_number(x) for x in v),
       "points": lambda v: type(v) is list and all(type(p) is dict and is_number(p.get("x"))
                                                   and is_number(p.get("fid")) for p in v)}


NOT_FITTED = {"fitted": lambda v: v is False, "reason": lambda v: type(v) is str}


def read_fit(path) -> dict:
    """A fit `ect scaling-fit` wrote, checked: a law, or why there is none (``fitted`` false)."""
    data = read_json(path, "scaling fit")
    fitted = type(data) is not dict or data.get("fitted") is not False
    return check_fields(data, FIT if fitted else NOT_FITTED, "scaling fit", path)
