"""`ect scaling-fit`: a known power law is recovered, with an honest interval; bad input is refused."""
import csv
import json
import math

import numpy as np
import pytest

from ect.scaling import ScalingError, fit, fit_file, frontier, points_of
from tests.helpers import run_ect


def write_points(path, rows, columns=("compute", "fid", "size", "steps", "set")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def synthetic_rows(coefficient=5e4, exponent=0.35, noise=0.03, sizes=("s", "m"), budgets=6, sets=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for k, size in enumerate(sizes):
        for compute in np.geomspace(1e12, 1e15, budgets) * (k + 1):
            for s in range(sets):
                fid = coefficient * compute ** -exponent * math.exp(rng.normal(0, noise))
                rows.append({"compute": compute, "fid": fid, "size": size, "steps": 2, "set": s})
    return rows


def test_a_known_law_is_recovered_with_an_interval_that_covers_it():
    result = fit(points_of(synthetic_rows()))
    assert result["exponent"] == pytest.approx(0.35, abs=0.01)
    assert result["coefficient"] == pytest.approx(5e4, rel=0.3)
    lo, hi = result["exponent_ci95"]
    assert lo < 0.35 < hi and hi - lo < 0.05
    assert result["r2"] > 0.97 and result["n_points"] == 12
    held = result["holdout"]
    assert held["compute"] == max(p["compute"] for p in result["points"])
    assert held["rel_error"] == pytest.approx((held["predicted"] - held["fid"]) / held["fid"])
    assert abs(held["rel_error"]) < 0.1


def test_a_noiseless_law_is_exact_in_float64():
    rows = [{"compute": c, "fid": 7.0 * c ** -0.5} for c in (1e3, 1e4, 1e5, 1e6)]
    result = fit(points_of(rows))
    assert result["exponent"] == pytest.approx(0.5, rel=1e-12)
    assert result["coefficient"] == pytest.approx(7.0, rel=1e-10)
    assert result["r2"] == pytest.approx(1.0) and abs(result["holdout"]["rel_error"]) < 1e-10


def test_the_frontier_keeps_only_points_no_cheaper_point_beats():
    points = points_of([{"compute": c, "fid": f, "size": s} for c, f, s in
                        [(1, 10, "a"), (2, 12, "b"), (3, 8, "a"), (4, 9, "b"), (5, 5, "b")]])
    assert [(p["compute"], p["size"]) for p in frontier(points)] == [(1, "a"), (3, "a"), (5, "b")]


def test_the_cli_writes_the_fit_and_filters_by_steps_and_size(tmp_path):
    rows = synthetic_rows() + [{**r, "steps": 1, "fid": r["fid"] * 2} for r in synthetic_rows(seed=1)]
    points = write_points(tmp_path / "points.csv", rows)
    run_ect("scaling-fit", points, "--out", tmp_path / "fit.json", "--steps", "2", "--size", "m")
    result = json.loads((tmp_path / "fit.json").read_text())
    assert set(result) >= {"coefficient", "exponent", "exponent_ci95", "r2", "n_points", "holdout"}
    assert set(result["holdout"]) == {"compute", "fid", "predicted", "rel_error"}
    assert result["n_points"] == 6 and result["exponent"] == pytest.approx(0.35, abs=0.02)
    frontier_fit = fit_file(points, steps="2", use_frontier=True)
    assert frontier_fit["frontier"] and frontier_fit["n_points"] <= 12


@pytest.mark.parametrize("rows, columns, expected", [
    ([{"compute": 1, "fid": 2}, {"compute": 2, "fid": 1}], ("compute", "fid"), "at least 3 points"),
    ([{"compute": 1, "fid": 2}] * 3, ("compute", "fid"), "at least 3 points"),
    ([{"compute": c, "fid": 1} for c in (1, 2, 3)], ("compute",), "no column fid"),
    ([{"compute": c, "fid": f} for c, f in ((1, 2), (2, 0), (3, 1))], ("compute", "fid"), "positive and finite"),
    ([{"compute": c, "fid": f} for c, f in ((1, 2), (-2, 1), (3, 1))], ("compute", "fid"), "positive and finite"),
    ([{"compute": c, "fid": f} for c, f in ((1, 2), (2, "nan"), (3, 1))], ("compute", "fid"), "positive and finite"),
    ([{"compute": c, "fid": f} for c, f in ((1, 2), (2, "inf"), (3, 1))], ("compute", "fid"), "positive and finite"),
    ([{"compute": c, "fid": f} for c, f in ((1, 2), (2, "x"), (3, 1))], ("compute", "fid"), "is not a number"),
])
def test_bad_points_are_one_line_errors_with_no_output(tmp_path, rows, columns, expected):
    points = write_points(tmp_path / "p.csv", rows, columns)
    proc = run_ect("scaling-fit", points, "--out", tmp_path / "fit.json", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "fit.json").exists()
    with pytest.raises(ScalingError, match=expected):
        fit_file(points)
