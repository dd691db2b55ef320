"""Verdicts against the paper: each published number, compared at the budget it was published at, with the
statistic and the spread it is compared with; and a compute-budget claim judged from the tuning snapshots.

The rules (docs/method.md, "How a number is judged"):
- within ±5 % of the paper's FID: ``reproduced``; worse by more: ``short`` (by N %); better by more than
  5 %: ``inconsistent`` ("better than the paper: check the protocol"), never counted as held;
- a budget claim ("FID F within H GPU-hours on device D") is ``reproduced`` when a snapshot trained for at
  most 1.05 H device-hours on D reaches at most 1.05 F with the full protocol, ``short`` otherwise, and
  ``unjudged`` when the run was not on D (its measured hours are still shown).
Pure functions of numbers and plain data; the files are read by the report and the scoring steps.
"""
from __future__ import annotations

import math

from ect.fileio import is_number
from ect.spec import TOLERANCE

VERDICTS = ("reproduced", "short", "inconsistent", "unjudged")
STATISTIC_WORDS = {"mean": "mean over sets", "min": "minimum over sets (as EDM reports)"}


def verdict(ours: float, paper: float) -> dict:
    """How a FID of ours compares with the paper's (lower is better)."""
    relative = (ours - paper) / paper
    if abs(relative) <= TOLERANCE:
        return {"verdict": "reproduced", "relative": relative, "text": f"reproduced ({relative:+.1%})"}
    if relative > 0:
        return {"verdict": "short", "relative": relative, "text": f"short by {relative:.0%}"}
    return {"verdict": "inconsistent", "relative": relative,
            "text": f"better than the paper by {-relative:.0%}: check the protocol"}


def statistic(fids: list[float], which: str) -> float:
    """The statistic of a number's FID sets the paper's number is compared with."""
    return min(fids) if which == "min" else sum(fids) / len(fids)


def spread(fids: list[float]) -> list[float] | None:
    """[min, max] over sets, or None for a single set."""
    return [min(fids), max(fids)] if len(fids) > 1 else None


def claim_record(claim: str, paper: float, fids: list[float], which: str, source: str, secondary: bool = False,
                 **extra) -> dict:
    """One entry of claims.json: the claim, the two numbers, the statistic and spread, the verdict."""
    ours = statistic(fids, which)
    judged = verdict(ours, paper)
    return {"claim": claim, "paper": paper, "ours": ours, "statistic": STATISTIC_WORDS[which],
            "spread": spread(fids), "verdict": judged["verdict"], "text": judged["text"], "source": source,
            "secondary": secondary, "sets": len(fids), **extra}


# ---------------------------------------------------------------------------------------------
# A compute-budget claim, from the FID curve (one set a snapshot) and the snapshots near the crossing.

def by_hours(points: list[dict]) -> list[dict]:
    """Curve points with measured device-hours, in training order."""
    timed = [p for p in points if isinstance(p.get("device_hours"), (int, float)) and math.isfinite(p["device_hours"])]
    return sorted(timed, key=lambda p: p["device_hours"])


def budget_candidates(points: list[dict], key: str, target: float, hours: float) -> list[str]:
    """The snapshots to score with the full protocol: the first whose curve FID is within the tolerance of
    the target and the one before it (the crossing), and the best within the budget (with its tolerance)."""
    timed = by_hours(points)
    picked = []
    crossing = next((i for i, p in enumerate(timed) if p[key] <= target * (1 + TOLERANCE)), None)
    if crossing is not None:
        picked += [p["snapshot"] for p in timed[max(crossing - 1, 0):crossing + 1]]
    within = [p for p in timed if p["device_hours"] <= hours * (1 + TOLERANCE)]
    if within:
        picked.append(min(within, key=lambda p: p[key])["snapshot"])
    return list(dict.fromkeys(picked))


def judge_budget(points: list[dict], full: dict[str, list[float]], key: str, budget: dict, device: str | None) -> dict:
    """The budget claim's record: time-to-FID, the best FID within the budget (full protocol where scored, the
    curve's one set elsewhere), and the verdict on the named device only."""
    which, target, hours = budget["statistic"], budget["fid"], budget["gpu_hours"]
    rows = []
    for p in by_hours(points):
        sets = full.get(p["snapshot"])
        rows.append({"snapshot": p["snapshot"], "kimg": p.get("kimg"), "device_hours": p["device_hours"],
                     "curve_fid": p[key], "fid_sets": sets, "fid": statistic(sets, which) if sets else p[key],
                     "protocol": f"{len(sets)} sets" if sets else "curve (one set)"})
    reached = next((r for r in rows if r["fid"] <= target), None)
    within = [r for r in rows if r["device_hours"] <= hours * (1 + TOLERANCE)]
    scored = [r for r in within if r["fid_sets"]]  # the full protocol decides; the curve's one set only without it
    best = min(scored or within, key=lambda r: r["fid"]) if within else None
    on_device = bool(device) and budget["device"].lower() in device.lower()
    if not on_device:
        kind, text = "unjudged", f"measured on {device or 'an unknown device'}, not on an {budget['device']}"
    elif best is not None and best["fid_sets"] and best["fid"] <= target * (1 + TOLERANCE):
        kind, text = "reproduced", f"FID {best['fid']:.2f} after {best['device_hours']:.2f} device-hours"
    else:
        kind = "short"
        text = (f"best within the budget {best['fid']:.2f} ({best['fid'] / target - 1:+.0%})" if best else
                f"no snapshot within {hours * (1 + TOLERANCE):g} device-hours")
    return {"target": target, "gpu_hours": hours, "device": budget["device"], "measured_device": device,
            "statistic": STATISTIC_WORDS[which], "tolerance": TOLERANCE, "points": rows,
            "time_to_fid_hours": reached["device_hours"] if reached else None,
            "time_to_fid_protocol": reached["protocol"] if reached else None,
            "best_within_budget": best, "verdict": kind, "text": text}


# What `ect fid-budget` writes, as its readers check it.
BUDGET = {"verdict": lambda v: v in VERDICTS, "text": lambda v: type(v) is str, "statistic": lambda v: type(v) is str,
          "target": is_number, "gpu_hours": is_number, "device": lambda v: type(v) is str,
          "points": lambda v: type(v) is list and all(type(p) is dict and is_number(p.get("device_hours"))
                                                     and is_number(p.get("fid")) for p in v),
          "best_within_budget": lambda v: v is None or (type(v) is dict and is_number(v.get("fid"))
                                                        and is_number(v.get("device_hours"))),
          "time_to_fid_hours": lambda v: v is None or is_number(v)}
