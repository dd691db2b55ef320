"""`ect scaling-fit`: known laws (pure and with a floor) are recovered, intervals measure the noise put in, the
size axis and FD_DINOv2 are fitted alike, bad input is refused."""
import csv
import json
import math

import numpy as np
import pytest

from ect.errors import BadInput
from ect.scaling import ScalingError, fit, fit_file, frontier, points_of, read_fit, spreads
from tests.helpers import run_ect

COLUMNS = ("compute", "fid", "size", "steps", "set", "run", "kimg", "design", "params", "flops_per_iteration",
           "metric")


def write_points(path, rows, columns=COLUMNS):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def synthetic_rows(law=lambda c: 5e4 * c ** -0.35, noise=0.03, sizes=("s", "m"), budgets=6, sets=3, runs=1,
                   seed=0, steps=2):
    """A row per FID set: each set the law times log-normal noise of sd ``noise``."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, size in enumerate(sizes):
        for j, compute in enumerate(np.geomspace(1e12, 1e15, budgets) * (k + 1)):
            for run in range(runs):
                for s in range(sets):
                    rows.append({"compute": compute, "fid": law(compute) * math.exp(rng.normal(0, noise)),
                                 "size": size, "steps": steps, "set": s, "run": f"{size}-seed{run}", "kimg": j + 1})
    return rows


def test_a_known_law_is_recovered_with_an_interval_that_covers_it():
    result = fit(points_of(synthetic_rows()))
    assert result["exponent"] == pytest.approx(0.35, abs=0.01)
    assert result["coefficient"] == pytest.approx(5e4, rel=0.3)
    assert np.diff(result["exponent_ci95"]) < 0.05
    assert result["r2"] > 0.97 and result["n_points"] == 12
    held = result["holdout"]
    assert held["x"] == max(p["compute"] for p in result["points"])
    assert held["rel_error"] == pytest.approx((held["predicted"] - held["fid"]) / held["fid"])
    assert abs(held["rel_error"]) < 0.1
    assert result["preferred"] in ("pure", "saturating") and result["supports"].startswith("a power law")


def test_the_95_percent_interval_covers_the_true_exponent_about_95_percent_of_the_time():
    covered = [lo < 0.35 < hi for lo, hi in (fit(points_of(synthetic_rows(seed=seed)))["exponent_ci95"]
                                             for seed in range(40))]
    assert 0.85 <= np.mean(covered) <= 1.0


def test_a_noiseless_law_is_exact_in_float64_with_a_zero_width_interval():
    rows = [{"compute": c, "fid": 7.0 * c ** -0.5} for c in (1e3, 1e4, 1e5, 1e6)]
    result = fit(points_of(rows))
    assert result["exponent"] == pytest.approx(0.5, rel=1e-12)
    assert result["coefficient"] == pytest.approx(7.0, rel=1e-10)
    assert result["r2"] == pytest.approx(1.0) and abs(result["holdout"]["rel_error"]) < 1e-10
    lo, hi = result["exponent_ci95"]
    assert hi - lo < 1e-9 and lo == pytest.approx(0.5, rel=1e-9)


def test_a_law_with_a_floor_is_recovered_by_the_saturating_fit_and_preferred():
    """FID = 2 + 6 C^-0.8: the pure law bends through it (exponent far from 0.8); the floor form finds it."""
    law = lambda c: 2 + 6 * c ** -0.8  # noqa: E731
    rows = [{"compute": c, "fid": law(c) * math.exp(e), "set": s, "kimg": c}
            for c in np.geomspace(0.1, 1000, 10)
            for s, e in enumerate(np.random.default_rng(1).normal(0, 0.005, 3))]
    result = fit(points_of(rows))
    sat = result["saturating"]
    assert sat["exponent"] == pytest.approx(0.8, rel=0.1) and sat["floor"] == pytest.approx(2.0, rel=0.1)
    assert sat["coefficient"] == pytest.approx(6.0, rel=0.1)
    assert abs(result["exponent"] - 0.8) > 0.2  # the pure law is the wrong shape here
    assert result["preferred"] == "saturating" and result["supports"] == "a power law with a floor"
    assert abs(sat["holdout"]["rel_error"]) < abs(result["holdout"]["rel_error"])
    lo, hi = sat["exponent_ci95"]
    assert lo < 0.8 < hi


def test_the_interval_of_a_noise_free_law_reflects_only_the_set_to_set_noise():
    """Points exactly on the law, sets scattered around it by log-normal noise of sd σ: the bootstrap's interval
    matches the slope's standard error that σ gives (σ/√sets per point, propagated by least squares), and
    shrinks in proportion when σ does."""
    log_c = np.log(np.geomspace(1e12, 1e15, 8))
    sets = 5
    standard_error = lambda sigma: sigma / math.sqrt(sets) / math.sqrt(((log_c - log_c.mean()) ** 2).sum())  # noqa
    widths = {}
    for sigma in (0.02, 0.005):
        result = fit(points_of(synthetic_rows(noise=sigma, sizes=("s",), budgets=8, sets=sets, seed=3)))
        lo, hi = result["exponent_ci95"]
        widths[sigma] = hi - lo
        assert 0.5 < widths[sigma] / (2 * 1.96 * standard_error(sigma)) < 2.0, (sigma, widths[sigma])
        assert result["spreads"]["set_to_set"] == pytest.approx(sigma, rel=0.5)
    assert widths[0.02] / widths[0.005] == pytest.approx(4, rel=0.35)


def test_runs_within_a_point_are_resampled_and_their_spread_reported():
    rows = synthetic_rows(noise=0.01, sizes=("s",), runs=3, budgets=5)
    rng = np.random.default_rng(5)
    offsets = {f"s-seed{r}": math.exp(rng.normal(0, 0.05)) for r in range(3)}  # run-to-run: 5 %
    rows = [{**r, "fid": r["fid"] * offsets[r["run"]]} for r in rows]
    result = fit(points_of(rows))
    assert result["n_points"] == 5 and all(p["runs"] == 3 for p in result["points"])
    spread = result["spreads"]
    assert spread["run_to_run"] > 2 * spread["set_to_set"] and spread["points_with_several_runs"] == 5
    one_run = fit(points_of([r for r in rows if r["run"] == "s-seed0"]))
    assert one_run["spreads"]["run_to_run"] is None
    assert np.diff(result["exponent_ci95"]) > np.diff(one_run["exponent_ci95"])  # run noise widens it


def test_the_frontier_keeps_only_points_no_cheaper_point_beats_and_is_redone_per_replicate():
    points = points_of([{"compute": c, "fid": f, "size": s} for c, f, s in
                        [(1, 10, "a"), (2, 12, "b"), (3, 8, "a"), (4, 9, "b"), (5, 5, "b")]])
    assert [(p["compute"], p["size"]) for p in frontier(points)] == [(1, "a"), (3, "a"), (5, "b")]
    rows = synthetic_rows(sizes=("s", "m", "l"), noise=0.05)
    result = fit(points_of(rows), use_frontier=True)
    assert result["frontier"] and result["n_points"] == len(frontier(points_of(rows)))
    assert result["bootstrap"] > 900


def test_spreads_are_relative_standard_deviations():
    points = points_of([{"compute": 1, "fid": f, "run": r} for r, f in (("a", 9), ("a", 11), ("b", 19), ("b", 21))])
    result = spreads(points)
    assert result["set_to_set"] == pytest.approx(np.median([np.std([9, 11], ddof=1) / 10,
                                                            np.std([19, 21], ddof=1) / 20]))
    assert result["run_to_run"] == pytest.approx(np.std([10, 20], ddof=1) / 15)


def size_axis_rows(metric="fid", scale=1.0):
    """Four sizes, two budgets: the metric falls with parameters as 30 P^-0.25 at the larger budget."""
    rows = []
    for size, params in (("xs", 1e5), ("s", 4e5), ("m", 1.6e6), ("l", 6.4e6)):
        for kimg in (10.0, 20.0):
            for s in range(3):
                value = scale * 30 * params ** -0.25 * (20 / kimg) * (1 + 0.01 * (s - 1))
                rows.append({"compute": 6 * params * kimg * 1000, "fid": value, "size": size, "steps": 1, "set": s,
                             "kimg": kimg, "params": params, "flops_per_iteration": 6 * params * 64,
                             "design": "prefix", "metric": metric, "run": size})
    return rows


def test_the_size_axis_fits_against_parameters_and_flops_per_iteration_with_fd_dinov2_alike(tmp_path):
    points = write_points(tmp_path / "p.csv", size_axis_rows() + size_axis_rows("fd_dinov2", 10.0))
    proc = run_ect("scaling-fit", points, "--out", tmp_path / "fit.json", "--axis", "size", "--steps", "1")
    assert "params^-0.25" in proc.stderr
    result = json.loads((tmp_path / "fit.json").read_text())
    assert result["axis"] == "size" and result["budget_kimg"] == 20.0 and result["n_points"] == 4
    assert result["exponent"] == pytest.approx(0.25, rel=1e-3)
    assert result["against_flops_per_iteration"]["exponent"] == pytest.approx(0.25, rel=1e-3)
    assert [p["x"] for p in result["points"]] == [1e5, 4e5, 1.6e6, 6.4e6]
    dino = result["fd_dinov2"]
    assert dino["exponent"] == pytest.approx(0.25, rel=1e-3) and dino["coefficient"] == pytest.approx(
        10 * result["coefficient"], rel=1e-3)
    at_10 = fit_file(points, steps="1", axis="size", budget_kimg=10.0)
    assert at_10["budget_kimg"] == 10.0 and at_10["coefficient"] == pytest.approx(2 * result["coefficient"], rel=1e-3)
    with pytest.raises(ScalingError, match="at least 3 sizes"):
        fit_file(write_points(tmp_path / "two.csv", [r for r in size_axis_rows() if r["size"] in ("s", "m")]),
                 axis="size")
    no_params = write_points(tmp_path / "np.csv", size_axis_rows(), ("compute", "fid", "size", "kimg"))
    with pytest.raises(ScalingError, match="params and flops_per_iteration"):
        fit_file(no_params, axis="size")


def test_batch_grown_points_are_their_own_design():
    rows = synthetic_rows(sizes=("m",), budgets=4)
    grown = [{**r, "design": "batch", "run": f"m-batch{r['kimg']}", "fid": r["fid"] * 0.9} for r in rows]
    points = points_of(rows + grown)
    assert len(points) == 8 and {p["design"] for p in points} == {"prefix", "batch"}
    assert fit(points_of(grown))["coefficient"] == pytest.approx(0.9 * fit(points_of(rows))["coefficient"], rel=1e-6)


def test_the_cli_writes_the_fit_and_filters_by_steps_and_size(tmp_path):
    rows = synthetic_rows() + [{**r, "steps": 1, "fid": r["fid"] * 2} for r in synthetic_rows(seed=1)]
    points = write_points(tmp_path / "points.csv", rows)
    run_ect("scaling-fit", points, "--out", tmp_path / "fit.json", "--steps", "2", "--size", "m")
    result = json.loads((tmp_path / "fit.json").read_text())
    assert set(result) >= {"coefficient", "exponent", "exponent_ci95", "r2", "n_points", "holdout", "saturating",
                           "preferred", "supports", "spreads"}
    assert set(result["saturating"]) == {"coefficient", "exponent", "floor", "exponent_ci95", "holdout"}
    assert set(result["holdout"]) == {"x", "fid", "predicted", "rel_error"}
    assert result["n_points"] == 6 and result["exponent"] == pytest.approx(0.35, abs=0.02)
    frontier_fit = fit_file(points, steps="2", use_frontier=True)
    assert frontier_fit["frontier"] and frontier_fit["n_points"] <= 12


def test_points_spanning_the_float_range_fit_without_overflow(tmp_path):
    rows = [{"compute": c, "fid": f} for c, f in ((1e-300, 1e300), (1.0, 1.0), (1e300, 1e-300))]
    points = write_points(tmp_path / "p.csv", rows, ("compute", "fid"))
    run_ect("scaling-fit", points, "--out", tmp_path / "fit.json")
    result = json.loads((tmp_path / "fit.json").read_text())  # strict JSON: no NaN or Infinity
    assert result["exponent"] == pytest.approx(1.0) and result["saturating"]["exponent_ci95"] is None


@pytest.mark.parametrize("rows, columns, expected", [
    ([{"compute": 1, "fid": 2}, {"compute": 2, "fid": 1}], ("compute", "fid"), "at least 3 points"),
    ([{"compute": 1, "fid": 2}] * 3, ("compute", "fid"), "at least 3 points"),
    ([{"compute": c, "fid": 1} for c in (1, 2, 3)], ("compute",), "no column fid"),
    ([{"compute": c, "fid": f} for c, f in ((1, 2), (2, 0), (3, 1))], ("compute", "fid"), "positive and finite"),
    ([{"compute": c, "fid": f} for c, f in ((1, 2), (-2, 1), (3, 1))], ("compute", "fid"), "positive and finite"),
    ([{"compute": c, "fid": f} for c, f in ((1, 2), (2, "nan"), (3, 1))], ("compute", "fid"), "positive and finite"),
    ([{"compute": c, "fid": f} for c, f in ((1, 2), (2, "inf"), (3, 1))], ("compute", "fid"), "positive and finite"),
    ([{"compute": c, "fid": f} for c, f in ((1, 2), (2, "x"), (3, 1))], ("compute", "fid"), "is not a number"),
    ([{"compute": c, "fid": 1, "metric": "is"} for c in (1, 2, 3)], ("compute", "fid", "metric"), "metric 'is'"),
    ([{"compute": c, "fid": 1, "design": "x"} for c in (1, 2, 3)], ("compute", "fid", "design"), "design 'x'"),
])
def test_bad_points_are_one_line_errors_with_no_output(tmp_path, rows, columns, expected):
    points = write_points(tmp_path / "p.csv", rows, columns)
    proc = run_ect("scaling-fit", points, "--out", tmp_path / "fit.json", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "fit.json").exists()
    with pytest.raises(ScalingError, match=expected):
        fit_file(points)


def test_a_frontier_too_short_for_a_law_is_recorded_and_reported_not_a_failure(tmp_path):
    """Noise can leave two of many points on the frontier (each later point worse): that is a finding about the
    data, so the fit's file says why there is no law and the step succeeds; too few points in the table is
    still bad input (above)."""
    rows = [{"compute": c, "fid": f, "set": 0} for c, f in ((1e12, 50.0), (2e12, 40.0), (4e12, 45.0), (8e12, 48.0))]
    points = write_points(tmp_path / "p.csv", rows, ("compute", "fid", "set"))
    proc = run_ect("scaling-fit", points, "--out", tmp_path / "fit.json", "--frontier")
    assert proc.returncode == 0 and "no law: the frontier keeps 2 of 4 points" in proc.stderr
    result = read_fit(tmp_path / "fit.json")
    assert result["fitted"] is False and result["reason"].startswith("the frontier keeps 2 of 4 points")
    assert fit_file(points)["n_points"] == 4  # all four points (no frontier) still make a law
    (tmp_path / "bad.json").write_text(json.dumps({"fitted": False}))
    with pytest.raises(BadInput, match="'reason' is missing"):
        read_fit(tmp_path / "bad.json")
