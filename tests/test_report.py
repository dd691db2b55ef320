"""The report's judgement of our numbers against the paper's: relative difference and a verdict."""
import pytest

from ect.report import claims, verdict
from ect.spec import Paper
from ect.typed import build


@pytest.mark.parametrize("ours, paper, kind, text", [
    (2.80, 2.73, "held", "reproduced (+2.6%)"),
    (2.60, 2.73, "held", "reproduced (-4.8%)"),
    (2.40, 2.73, "held", "better (12% lower)"),
    (3.10, 2.73, "missed", "short by 14%"),
])
def test_a_fid_within_five_percent_is_reproduced_lower_is_better_higher_is_short(ours, paper, kind, text):
    v = verdict(ours, paper)
    assert v["kind"] == kind and v["text"] == text and v["relative"] == pytest.approx((ours - paper) / paper)


def test_the_top_line_judges_the_compute_budget_only_on_the_named_device():
    rows = [{"label": "ECT, 2 steps", "paper": 2.73, "fid_min": 2.75, "verdict": verdict(2.75, 2.73)},
            {"label": "ECT, 1 step", "paper": None, "fid_min": 4.0, "verdict": None}]
    paper = build(Paper, {"fid_2step": 2.73, "source": "x", "budget": {"gpu_hours": 1, "device": "A100"}})
    on_a100 = claims(rows, paper, {"device": {"name": "NVIDIA A100-SXM4-80GB", "count": 1}, "device_hours": 0.9})
    assert [c["kind"] for c in on_a100] == ["held", "held"] and on_a100[1]["text"] == "within the budget"
    slow = claims(rows, paper, {"device": {"name": "NVIDIA A100-SXM4-80GB", "count": 1}, "device_hours": 2.5})
    assert slow[1]["kind"] == "missed" and slow[1]["text"] == "2.5x the budget"
    elsewhere = claims(rows, paper, {"device": {"name": "CPU x86_64 (2 threads)", "count": 1}, "device_hours": 0.1})
    assert elsewhere[1]["kind"] == "unjudged" and "not on an A100" in elsewhere[1]["text"]
    assert claims(rows, None, {}) == []
