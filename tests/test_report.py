"""The verdicts against the paper: each number at its budget with its statistic and spread, and a compute-budget
claim judged from the snapshots (ect/claims.py)."""
import pytest

from ect.claims import budget_candidates, claim_record, judge_budget, verdict


@pytest.mark.parametrize("ours, paper, kind, text", [
    (2.80, 2.73, "reproduced", "reproduced (+2.6%)"),
    (2.60, 2.73, "reproduced", "reproduced (-4.8%)"),
    (2.40, 2.73, "inconsistent", "better than the paper by 12%: check the protocol"),
    (3.10, 2.73, "short", "short by 14%"),
])
def test_within_five_percent_is_reproduced_worse_is_short_much_better_is_inconsistent(ours, paper, kind, text):
    v = verdict(ours, paper)
    assert v["verdict"] == kind and v["text"] == text and v["relative"] == pytest.approx((ours - paper) / paper)


def test_a_claim_names_its_statistic_and_spread():
    mean = claim_record("c", 2.0, [2.0, 2.1, 2.3], "mean", "src")
    assert mean["ours"] == pytest.approx(2.1333333) and mean["statistic"] == "mean over sets"
    assert mean["spread"] == [2.0, 2.3] and mean["verdict"] == "short" and mean["source"] == "src"
    low = claim_record("c", 2.0, [2.0, 2.1, 2.3], "min", "src")
    assert low["ours"] == 2.0 and low["statistic"].startswith("minimum") and low["verdict"] == "reproduced"
    assert claim_record("c", 2.0, [2.0], "mean", "src")["spread"] is None
    assert {"claim", "paper", "ours", "statistic", "spread", "verdict", "source"} <= set(mean)


# A curve: 2-step FID falls with training time (device-hours); one 50k set a snapshot.
CURVE = [{"snapshot": f"kimg{i:010.3f}.pt", "kimg": 128.0 * i, "device_hours": 0.25 * i, "fid_2step": f}
         for i, f in enumerate([9.0, 5.0, 3.5, 2.9, 2.7, 2.6, 2.5], start=1)]
BUDGET = {"gpu_hours": 1.0, "device": "A100", "fid": 2.73, "statistic": "mean"}


def test_the_snapshots_near_the_crossing_and_the_best_within_the_budget_get_the_full_protocol():
    picked = budget_candidates(CURVE, "fid_2step", 2.73, 1.0)
    # 2.7 (1.25 h) is the first within 5 % of 2.73 (2.87): it and the snapshot before it (2.9, 1.0 h), which is also
    # the best by 1.05 h
    assert picked == [CURVE[3]["snapshot"], CURVE[4]["snapshot"]]
    assert budget_candidates(CURVE, "fid_2step", 1.0, 0.3) == [CURVE[0]["snapshot"]]  # never crosses: the best in budget


def test_a_crossing_inside_the_budget_on_the_named_device_is_reproduced():
    full = {CURVE[2]["snapshot"]: [3.4, 3.5, 3.6], CURVE[3]["snapshot"]: [2.70, 2.75, 2.80]}
    judged = judge_budget(CURVE, full, "fid_2step", BUDGET, "NVIDIA A100-SXM4-80GB")
    assert judged["verdict"] == "reproduced" and judged["best_within_budget"]["fid"] == pytest.approx(2.75)
    assert judged["best_within_budget"]["protocol"] == "3 sets"
    assert judged["time_to_fid_hours"] == 1.25  # first at or below 2.73: the next snapshot, on the curve's one set
    assert judged["time_to_fid_protocol"] == "curve (one set)"


def test_a_crossing_after_the_budget_is_short_and_another_device_is_unjudged():
    full = {CURVE[3]["snapshot"]: [3.0, 3.1, 3.2]}  # at 1 h the full protocol says 3.1: not within 5 % of 2.73
    late = judge_budget(CURVE, full, "fid_2step", BUDGET, "NVIDIA A100 80GB PCIe")
    assert late["verdict"] == "short" and "+14%" in late["text"]
    elsewhere = judge_budget(CURVE, full, "fid_2step", BUDGET, "NVIDIA H100 80GB HBM3")
    assert elsewhere["verdict"] == "unjudged" and "not on an A100" in elsewhere["text"]
    assert elsewhere["best_within_budget"]["device_hours"] == 1.0  # the measured hours are still shown
    assert judge_budget(CURVE, full, "fid_2step", BUDGET, None)["verdict"] == "unjudged"
