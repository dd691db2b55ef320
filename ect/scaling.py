"""Power laws of FID against training compute: fid = coefficient * compute ** (-exponent).

The fit is least squares in log-log space (log fid = log coefficient - exponent * log compute). Its
uncertainty is a bootstrap over points and FID sets: each replicate resamples the points with
replacement and, for each, one of its independent FID sets. The held-out check fits without the
largest-compute point and predicts it. ``frontier`` keeps, across model sizes, the points no cheaper
point beats: the compute-efficient frontier a scaling law describes.

Points are CSV rows with columns ``compute`` and ``fid`` and optionally ``size``, ``steps`` and ``set``
(rows of one point share compute, size and steps and differ in set; `kimg` names the budget).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from ect.errors import BadInput
from ect.fileio import is_number, read_json

REQUIRED = ("compute", "fid")
OPTIONAL = ("size", "steps", "set", "kimg")
MAX_ROWS = 1_000_000


class ScalingError(BadInput):
    pass


def read_points(path) -> list[dict]:
    """The rows of a points CSV, checked: numbers positive and finite, the required columns present."""
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
                    raise ScalingError(f"{path} has more than {MAX_ROWS} rows")
                rows.append(_row(row, path, line))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ScalingError(f"cannot read points {path}: {exc}") from exc
    return rows


def _row(row: dict, path, line: int) -> dict:
    out = {}
    for column in REQUIRED:
        try:
            value = float(row[column])
        except (TypeError, ValueError):
            raise ScalingError(f"{path}:{line}: {column} {str(row[column])[:40]!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise ScalingError(f"{path}:{line}: {column} must be positive and finite, not {value}")
        out[column] = value
    for column in OPTIONAL:
        if row.get(column) not in (None, ""):
            out[column] = row[column]
    return out


def points_of(rows: list[dict]) -> list[dict]:
    """Rows grouped into points: (size, steps, compute) -> the FIDs of its sets."""
    grouped: dict[tuple, list[float]] = {}
    for row in rows:
        grouped.setdefault((row.get("size", ""), row.get("steps", ""), row["compute"]), []).append(row["fid"])
    return [{"size": size, "steps": steps, "compute": compute, "fids": fids}
            for (size, steps, compute), fids in sorted(grouped.items(), key=lambda kv: kv[0][2])]


def frontier(points: list[dict]) -> list[dict]:
    """The points that no point of at most their compute beats (on mean FID): the compute frontier."""
    best, out = math.inf, []
    for point in sorted(points, key=lambda p: (p["compute"], np.mean(p["fids"]))):
        fid = float(np.mean(point["fids"]))
        if fid < best:
            out.append(point)
            best = fid
    return out


def _least_squares(log_compute: np.ndarray, log_fid: np.ndarray) -> tuple[float, float]:
    """(log coefficient, exponent) of log fid = a - b log compute."""
    design = np.stack([np.ones_like(log_compute), -log_compute], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, log_fid, rcond=None)
    return float(a), float(b)


def fit(points: list[dict], bootstrap: int = 2000, seed: int = 0) -> dict:
    """The power law through ``points`` (each with its FID sets), its 95 % interval, r², held-out error."""
    if len(points) < 3:
        raise ScalingError(f"a power law needs at least 3 points of different compute, got {len(points)}")
    if len({p["compute"] for p in points}) < 2:
        raise ScalingError("every point has the same compute: nothing to fit")
    log_c = np.log([p["compute"] for p in points])
    log_f = np.log([float(np.mean(p["fids"])) for p in points])
    a, b = _least_squares(log_c, log_f)
    residual = log_f - (a - b * log_c)
    total = ((log_f - log_f.mean()) ** 2).sum()
    r2 = 1 - float((residual**2).sum() / total) if total > 0 else 1.0

    rng = np.random.default_rng(seed)
    exponents = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(points), len(points))
        if len(set(log_c[pick])) < 2:
            continue  # a replicate with one compute level has no slope
        sample_f = np.log([points[i]["fids"][rng.integers(0, len(points[i]["fids"]))] for i in pick])
        exponents.append(_least_squares(log_c[pick], sample_f)[1])
    lo, hi = np.percentile(exponents, [2.5, 97.5]) if exponents else (math.nan, math.nan)

    largest = int(np.argmax(log_c))
    keep = np.arange(len(points)) != largest
    held_a, held_b = _least_squares(log_c[keep], log_f[keep])
    predicted = math.exp(held_a - held_b * log_c[largest])
    actual = float(np.mean(points[largest]["fids"]))
    return {"coefficient": math.exp(a), "exponent": b, "exponent_ci95": [float(lo), float(hi)], "r2": r2,
            "n_points": len(points), "bootstrap": len(exponents),
            "holdout": {"compute": points[largest]["compute"], "fid": actual, "predicted": predicted,
                        "rel_error": (predicted - actual) / actual},
            "points": [{"compute": p["compute"], "fid": float(np.mean(p["fids"])), "fid_sets": p["fids"],
                        **({"size": p["size"]} if p["size"] != "" else {})} for p in points]}


FIT = {"coefficient": is_number, "exponent": is_number, "r2": is_number, "n_points": lambda v: type(v) is int,
       "frontier": lambda v: type(v) is bool, "holdout": lambda v: type(v) is dict,
       "exponent_ci95": lambda v: type(v) is list and len(v) == 2 and all(type(x) in (int, float) for x in v),
       "points": lambda v: type(v) is list and all(type(p) is dict and is_number(p.get("compute"))
                                                   and is_number(p.get("fid")) for p in v)}


def read_fit(path) -> dict:
    """A fit `ect scaling-fit` wrote, checked."""
    return read_json(path, "scaling fit", FIT)


def fit_file(path, steps: str | None = None, size: str | None = None, use_frontier: bool = False) -> dict:
    """`ect scaling-fit`: the points of a CSV, filtered by steps and size, (the frontier,) the fit."""
    rows = read_points(path)
    if steps is not None:
        rows = [r for r in rows if r.get("steps") == str(steps)]
    if size is not None:
        rows = [r for r in rows if r.get("size") == size]
    points = points_of(rows)
    if use_frontier:
        points = frontier(points)
    result = fit(points)
    return {**result, "source": str(Path(path)), "steps": steps, "size": size, "frontier": use_frontier}
