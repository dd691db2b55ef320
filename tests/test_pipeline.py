"""The pipeline end to end: the toy default through Snakemake (the README's command) and DVC.

One Snakemake run of the real toy default is shared by the tests of this module (session
fixture, about 4 minutes on 2 cores); the DVC run uses a shrunk config to stay fast.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from ect.layout import SAMPLE_SETS, RunLayout
from ect.spec import build_spec, load_spec
from tests.helpers import BIN, ROOT, clone_repo, env, run, sha256, toy_config

pytestmark = pytest.mark.slow
TOY = RunLayout(build_spec(toy_config()))  # every path of the toy run
SETS = list(SAMPLE_SETS)


def tracked_outputs(repo: Path) -> dict[str, str]:
    """Every file DVC tracks in the repo (from dvc.lock), with its sha256."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    out = {}
    for stage in lock["stages"].values():
        for o in stage.get("outs", []):
            path = repo / o["path"]
            for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
                if f.name != ".snakemake_timestamp":
                    out[str(f.relative_to(repo))] = sha256(f)
    return out


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """The README's first command, `snakemake` from the repo root, on the embedded toy default."""
    repo = clone_repo(tmp_path_factory.mktemp("toy"))
    start = time.perf_counter()
    proc = run(["snakemake"], repo, timeout=1200)
    wall = time.perf_counter() - start
    print(f"toy pipeline through Snakemake: {wall:.0f} s", file=sys.stderr)
    return repo, wall, proc


def fid(repo, name):
    return json.loads((repo / TOY.fid(name)).read_text())


def test_toy_run_finishes_within_four_minutes_and_makes_the_papers_point(toy_run):
    repo, wall, _ = toy_run
    # "minutes on a laptop": 130-198 s measured on this project's 2-core machine on different days, the same
    # outputs bit for bit (its speed varies); 240 s still catches a step that became much slower
    assert wall < 240, f"toy pipeline took {wall:.0f} s"
    teacher, ect1, ect2 = fid(repo, "teacher-1step"), fid(repo, "ect-1step"), fid(repo, "ect-2step")
    heun = fid(repo, "teacher-heun")
    # The point of ECT: the tuned model at 1 step is far better than the teacher used at 1 step, in every set,
    # and at 2 steps it comes within 1.5x of the teacher's own 11-evaluation sampler.
    assert max(ect1["fid_sets"]) < 0.8 * min(teacher["fid_sets"]), (ect1, teacher)
    assert ect2["fid_mean"] < ect1["fid_mean"]
    assert ect2["fid_mean"] <= 1.5 * heun["fid_mean"], (ect2["fid_mean"], heun["fid_mean"])
    assert (ect1["nfe"], ect2["nfe"], teacher["nfe"], fid(repo, "teacher-heun")["nfe"]) == (1, 2, 1, 11)
    assert ect1["sets"] == 3 and ect1["samples_per_set"] == 512 and ect1["seeds"] == [0, 1535]
    for name in SETS:
        r = fid(repo, name)
        assert r["fid_min"] == min(r["fid_sets"]) and abs(r["fid_mean"] - sum(r["fid_sets"]) / 3) < 1e-9
    # every rule left a log and a benchmark file
    for rule in ["dataset", "feature_net", "fid_reference", "pretrain", "tune", "fid_curve", "report"]:
        assert (repo / TOY.log(rule)).exists() and (repo / TOY.benchmark(rule)).exists()


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_data(self, data):
        self.text.append(data)


def test_report_parses_references_only_existing_local_files_and_shows_the_numbers(toy_run):
    repo, _, _ = toy_run
    page = repo / "reports" / "toy" / "index.html"
    parser = _Refs()
    parser.feed(page.read_text())
    text = " ".join(parser.text)
    assert len(parser.refs) >= 6
    for ref in parser.refs:
        assert not re.match(r"^[a-z]+://", ref), f"report loads {ref} from the network"
        assert (page.parent / ref).is_file(), f"report references missing file {ref}"
    for name in SETS:
        assert f"{fid(repo, name)['fid_min']:.2f}" in text
    assert "not comparable" in text
    assert fid(repo, "ect-1step")["feature_net_sha256"] in text
    assert sha256(repo / TOY.tuned) in text
    assert "sample ect-2step" in text and "wall time" in text  # each step's runtime, as the step recorded it
    curve = json.loads((repo / TOY.curve).read_text())
    assert [p["kimg"] for p in curve["points"]] == sorted(p["kimg"] for p in curve["points"]) and len(curve["points"]) == 4


AUDIT = """
import json, os, sys
from ect.report import build_report
from ect.spec import load_spec
opened = set()
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        opened.add(os.path.relpath(os.path.abspath(args[0])))
sys.addaudithook(hook)
build_report(load_spec(*sys.argv[2:]), sys.argv[2:], sys.argv[1])
print(json.dumps(sorted(opened)))
"""


def report_reads(repo, out, *configs) -> set[str]:
    """Every file under the repository that `ect report` opens (an audit hook on open), bar the code, its config
    files (its params) and its own output."""
    proc = subprocess.run([sys.executable, "-c", AUDIT, out, *configs], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    own = ("..", "/", out, ".git", "ect/", *configs)  # not the run's files: the code, its templates, the configs
    return {p for p in json.loads(proc.stdout.splitlines()[-1]) if not p.startswith(own) and os.path.isfile(repo / p)}


def test_the_report_opens_only_the_files_it_declares(toy_run, tmp_path):
    """Snakemake and DVC know when the report is stale only if every file it reads is a declared input."""
    repo, _, _ = toy_run
    declared = set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["report"]["deps"])
    read = report_reads(repo, "reports/audit", "config/config.yaml")
    assert read and read <= declared, read - declared


@pytest.fixture
def plain_report_after(toy_run):
    """Overlays change the report's settings: the shared toy run gets its own report back afterwards, so later
    tests see a run that is up to date."""
    yield
    run(["snakemake"], toy_run[0])


def report_with_paper(repo, tmp_path, paper: dict) -> list[dict]:
    """The toy's report with paper numbers given by an overlay: the verdicts of claims.json."""
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump({"report": {"paper": {"source": "a test overlay", **paper}}}))
    run(["snakemake", "--configfile", "config/config.yaml", str(path)], repo)
    return json.loads((repo / TOY.claims).read_text())


def test_paper_numbers_given_by_an_overlay_are_reproduced_short_or_inconsistent_where_they_belong(toy_run, tmp_path,
                                                                                               plain_report_after):
    repo, _, _ = toy_run
    ours = fid(repo, "ect-2step")
    for factor, state in ((1.02, "reproduced"), (0.5, "short"), (1.5, "inconsistent")):
        paper = round(ours["fid_mean"] * factor, 3)
        claims = report_with_paper(repo, tmp_path, {"claims": [{"set": "ect-2step", "fid": paper, "source": "src"}]})
        assert [(c["verdict"], c["paper"]) for c in claims] == [(state, paper)], claims
        assert claims[0]["ours"] == pytest.approx(ours["fid_mean"]) and claims[0]["statistic"] == "mean over sets"
        assert claims[0]["spread"] == [min(ours["fid_sets"]), max(ours["fid_sets"])]
        page = (repo / TOY.report).read_text()
        assert f'<span class="{state}">{state}</span>' in page and "not comparable" not in page
    minimum = report_with_paper(repo, tmp_path, {"claims": [{"set": "teacher-heun", "statistic": "min", "source": "s",
                                                             "fid": round(fid(repo, "teacher-heun")["fid_min"], 3)}]})
    assert minimum[0]["verdict"] == "reproduced" and minimum[0]["statistic"].startswith("minimum")


def test_a_number_at_an_earlier_budget_and_a_compute_budget_are_judged_from_the_snapshots(toy_run, tmp_path,
                                                                                         plain_report_after):
    """A number published at 8 kimg is that snapshot's, scored with the full protocol; a compute-budget claim with
    a stand-in budget: reached inside it, not within it, and on another device."""
    repo, _, _ = toy_run
    curve = {p["kimg"]: p for p in json.loads((repo / TOY.curve).read_text())["points"]}
    at8 = report_with_paper(repo, tmp_path, {"claims": [{"set": "ect-1step", "fid": 100.0, "kimg": 8, "source": "s"}]})
    scored = json.loads((repo / TOY.snapshot_fid("8")).read_text())
    assert len(scored["fid_1step"]) == 3 and scored["snapshot"] == "kimg000008.000.pt"
    assert at8[0]["ours"] == pytest.approx(sum(scored["fid_1step"]) / 3) and at8[0]["verdict"] == "short"
    last = curve[12.0]  # the crossing: the curve's FID at 12 kimg, within the hours it took
    inside = {"fid": round(last["fid_2step"], 3), "gpu_hours": last["device_hours"] * 1.01, "device": "CPU",
              "source": "a stand-in budget"}
    for budget, state in ((inside, "reproduced"), ({**inside, "gpu_hours": curve[4.0]["device_hours"] / 10}, "short"),
                          ({**inside, "device": "A100"}, "unjudged")):
        claims = report_with_paper(repo, tmp_path, {"budget": budget})
        judged = json.loads((repo / TOY.budget_fid).read_text())
        assert claims[-1]["verdict"] == judged["verdict"] == state, judged
        assert [p["fid_sets"] is not None for p in judged["points"]].count(True) >= 1  # scored on 3 sets
        assert judged["measured_device"].startswith("CPU")
    assert "Time to FID" in (repo / TOY.report).read_text()


def test_report_screenshot_in_headless_chromium_is_not_blank(toy_run, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("ECT_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (ECT_REQUIRE_CHROMIUM is set) but not installed")
        pytest.skip("chromium not installed (.ci/run installs it)")
    from PIL import Image
    repo, _, _ = toy_run
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
                    (repo / "reports/toy/index.html").as_uri()], check=True, capture_output=True, timeout=120)
    img = Image.open(shot).convert("L")
    hist = img.histogram()
    assert max(hist) < 0.97 * sum(hist), "screenshot is (almost) one colour"
    assert img.getextrema()[0] < 64, "no dark pixels: nothing rendered"


def test_second_run_does_nothing(toy_run):
    repo, _, _ = toy_run
    assert "Nothing to be done" in run(["snakemake", "-n"], repo).stdout


def _planned_jobs(dry_run_stdout: str) -> dict[str, int]:
    """Snakemake's dry-run job stats as {rule: count}, without the total; {} for nothing to do."""
    if "Nothing to be done" in dry_run_stdout:
        return {}
    stats = dry_run_stdout.split("Job stats:")[1].split("Reasons")[0]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", stats, re.M) if rule != "total"}


def test_an_overlay_reruns_only_the_steps_that_read_what_it_changes(toy_run, tmp_path):
    """Adding an overlay file is no reason to rerun a step (on CIFAR-10, tune is two GPU-days); changing a value is,
    for the steps that read it. Only the report, which shows the config files and the merged config, always reruns."""
    repo, _, _ = toy_run

    def planned(overlay):
        path = tmp_path / "overlay.yaml"
        path.write_text(yaml.safe_dump(overlay))
        return _planned_jobs(run(["snakemake", "-n", "--configfile", "config/config.yaml", str(path)], repo).stdout)

    assert planned({"resources": {"fid_curve": {"runtime": 99}}}) == {"report": 1, "all": 1}
    assert planned({"tune": {"state_kimg": 0.5, "tick_kimg": 0.5}}) == {"report": 1, "all": 1}  # when to save and log
    assert planned({"sample": {"t_mid": [0.5]}}) == {"sample": 4, "fid": 4, "fid_curve": 1, "report": 1, "all": 1}
    assert planned({"tune": {"lr": 0.5}}) == {"tune": 1, "sample": 2, "fid": 2, "fid_curve": 1, "report": 1, "all": 1}


def _mtimes(repo):
    return {str(p.relative_to(repo)): p.stat().st_mtime_ns for p in (repo / "results").rglob("*")
            if p.is_file() and "/logs/" not in str(p) and "/benchmarks/" not in str(p)}


def test_forcerun_reruns_the_rule_and_its_dependents_only(toy_run):
    repo, _, _ = toy_run
    jobs = _planned_jobs(run(["snakemake", "-n", "--forcerun", "fid"], repo).stdout)
    assert jobs == {"fid": 4, "report": 1, "all": 1}, jobs
    before = _mtimes(repo)
    run(["snakemake", "--forcerun", "fid"], repo)
    after = _mtimes(repo)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {TOY.fid(s) for s in SETS} | {TOY.claims}  # the fid jobs and the report's verdicts
    assert "Nothing to be done" in run(["snakemake", "-n"], repo).stdout


def test_bad_config_key_or_value_stops_snakemake_with_one_clear_error(toy_run, tmp_path):
    repo, _, _ = toy_run
    for overlay, expected in [({"tune": {"lrr": 0.1}}, "unknown key 'lrr' in tune"),
                              ({"sample": {"sets": 0}}, "sample.sets: 0 is less than the minimum of 1"),
                              ({"tune": {"loss": {"q": 1}}}, "tune.loss.q: 1 is less than or equal to the minimum"),
                              ({"tune": {"arch": {"model_channels": 2048}}}, "tune.arch.model_channels: 2048 is")]:
        path = tmp_path / "overlay.yaml"
        path.write_text(yaml.safe_dump(overlay))
        proc = run(["snakemake", "-n", "--configfile", "config/config.yaml", str(path)], repo, check=False)
        assert proc.returncode == 2 and proc.stdout == ""  # planned nothing
        errors = [line for line in proc.stderr.splitlines() if line.startswith("invalid config: ")]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in proc.stderr, proc.stderr


def test_lint_and_snakemake_report_are_clean(toy_run, tmp_path):
    repo, _, _ = toy_run
    lint = run(["snakemake", "--lint"], repo, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    run(["snakemake", "--report", str(tmp_path / "smk-report.html")], repo)
    assert (tmp_path / "smk-report.html").stat().st_size > 10_000


def test_after_snakemake_dvc_is_up_to_date_repro_does_nothing_and_a_remote_round_trips(toy_run, tmp_path):
    repo, _, proc = toy_run
    assert "recorded" in proc.stdout + proc.stderr  # the Snakefile's onsuccess ran `dvc commit`: no manual step
    assert "up to date" in run(["dvc", "status", "dvc.yaml"], repo).stdout
    repro = run(["dvc", "repro"], repo).stdout
    assert "Running stage" not in repro, repro
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in ["dataset", "pretrain", "tune", "fid-ect-1step"]:
        assert all(o.get("md5") for o in lock["stages"][stage]["outs"]), stage
    assert "fid_min" in run(["dvc", "metrics", "show"], repo).stdout
    plots = json.loads(run(["dvc", "plots", "show", "--json", "dvc.yaml"], repo).stdout)
    for axis in ("kimg", "device_hours", "flops"):  # the FID curve against each cost, as DVC plots
        assert f"FID against {axis} (toy)" in json.dumps(plots), axis

    before = tracked_outputs(repo)
    assert len(before) > 20
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    run(["dvc", "push", "dvc.yaml"], repo)
    for name in before:
        (repo / name).unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    run(["dvc", "pull", "dvc.yaml"], repo)  # a plain `dvc pull` also wants the CIFAR-10 stages, never run here
    assert tracked_outputs(repo) == before


def test_dvc_repro_runs_the_pipeline_and_single_stages(tmp_path):
    """`dvc repro` from nothing on a shrunk toy config; then `dvc repro -f -s <stage>` reruns that stage only."""
    repo = clone_repo(tmp_path / "repo")
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cfg["pretrain"].update(kimg=0.5, tick_kimg=0.25)
    cfg["tune"].update(kimg=0.5, tick_kimg=0.25, snapshot_kimg=0.25, loss={**cfg["tune"]["loss"], "double": 4})
    cfg["sample"].update(samples_per_set=64, heun_steps=2)
    cfg["fid"].update(curve_samples=64, feature_net={**cfg["fid"]["feature_net"], "epochs": 1})
    (repo / "config/config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run(["dvc", "repro"], repo, timeout=900)
    assert (repo / "reports/toy/index.html").exists()
    assert "up to date" in run(["dvc", "status", "dvc.yaml"], repo).stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) >= {"dataset", "pretrain", "tune", "report", "fid-ect-2step", "sample-teacher-heun"}
    before = _mtimes(repo)
    out = run(["dvc", "repro", "-f", "-s", "fid_curve"], repo).stdout
    assert re.findall(r"Running stage '([^']+)'", out) == ["fid_curve"]
    changed = {k for k, v in _mtimes(repo).items() if before.get(k) != v}
    assert changed == {TOY.curve, TOY.curve_table}


def test_a_killed_step_leaves_no_output_and_a_failed_report_keeps_the_old_one(toy_run, tmp_path, monkeypatch):
    repo, _, _ = toy_run
    out = tmp_path / "s.npz"
    proc = subprocess.Popen([str(BIN / "ect"), "sample", "--checkpoint", str(repo / TOY.teacher),
                             "--out", str(out), "--sampler", "heun", "--seeds", "0-99999", "--no-progress"],
                            cwd=repo, env=env(), stderr=subprocess.PIPE)
    time.sleep(8)
    proc.kill()
    proc.wait()
    assert not out.exists() and list(tmp_path.glob("*.npz")) == []

    from ect.report import build_report, plots
    from ect.spec import load_spec
    page = repo / "reports/toy/index.html"
    before = sha256(page)

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots, "fid_curve", broken)
    monkeypatch.chdir(repo)
    with pytest.raises(RuntimeError, match="plotting failed"):
        build_report(load_spec("config/config.yaml"), ["config/config.yaml"], "reports/toy")
    assert sha256(page) == before
    assert [p.name for p in (repo / "reports").iterdir() if p.name.startswith(".toy")] == []  # no temporary left


def test_cifar10_preset_prefetches_runs_offline_shares_resources_and_is_recorded_by_dvc(tmp_path, monkeypatch):
    """Both CIFAR-10 presets, shrunk and pointed at a loopback server (merged into the preset files, as DVC
    reads them). `snakemake prefetch` downloads and verifies everything; the server is then stopped and
    config/cifar10.yaml runs to the report without a network. Switching to config/cifar10-1hour.yaml reuses
    every shared file under resources/. DVC then records the run, reproduces a shared stage identically and runs
    the other preset. The scaling study trains the 400k preset's run for it (scaling.reuse), grows the batch,
    and scores FD_DINOv2 beside FID with a tiny ViT in DINOv2's layout."""
    from ect.config import merge, read_config
    from ect.networks import build_network
    from tests.helpers import (
        LoopbackServer,
        cifar_tarball,
        dinov2_like_bytes,
        edm_snapshot_bytes,
        inception_like_bytes,
        published_stats_like,
        randomized,
        small_unet_kwargs,
    )

    repo = clone_repo(tmp_path / "repo")
    tarball, _, _ = cifar_tarball(per_batch=8)
    unet = small_unet_kwargs(attn_resolutions=[16])
    teacher = edm_snapshot_bytes(randomized(build_network({"kind": "edm", "img_resolution": 32, **unet})), unet)
    inception = inception_like_bytes()
    # EDM's published statistics, as a stand-in: ours of the same images (the check passes), and shifted (it fails)
    published, shifted = published_stats_like(tarball, inception, tmp_path / "stats")
    files = {"cifar-10-python.tar.gz": tarball, "edm-cifar10-32x32-uncond-vp.pkl": teacher,
             "inception-2015-12-05.pt": inception, "cifar10-32x32.npz": published, "shifted.npz": shifted,
             "dinov2_vitl14_pretrain.pth": dinov2_like_bytes()}
    md5 = lambda b: hashlib.md5(b).hexdigest()
    dvcfile = "pipelines/cifar10/dvc.yaml"
    with LoopbackServer(files) as server:
        overlay = {
            "dataset": {"url": f"{server.url}/cifar-10-python.tar.gz", "md5": md5(tarball),
                        "sha256": hashlib.sha256(tarball).hexdigest(), "size": len(tarball)},
            "teacher": {"url": f"{server.url}/edm-cifar10-32x32-uncond-vp.pkl", "sha256": hashlib.sha256(teacher).hexdigest()},
            "tune": {"kimg": 0.064, "batch": 8, "tick_kimg": 0.016, "snapshot_kimg": 0.032, "state_kimg": 0.016},
            "sample": {"samples_per_set": 8, "heun_steps": 2, "batch": 8},
            # no sha256 for Inception, as in the presets: trusted on first use, recorded in downloads.lock
            "fid": {"feature_net": {"url": f"{server.url}/inception-2015-12-05.pt"}, "curve_samples": 8,
                    "published_reference": {"url": f"{server.url}/cifar10-32x32.npz"}},
            "resources": {"default": {"threads": 2}, "tune": {"threads": 2}},
        }
        # every CIFAR-10 preset (they share the downloads); the 1-hour one never advances its stage; the scaling
        # study's budget points are the shrunk run's snapshots
        at_32 = [{"set": "ect-2step", "fid": 2.2, "kimg": 0.032, "source": "s"},
                 {"set": "ect-2step", "fid": 2.15, "source": "s"}, {"set": "teacher-heun", "fid": 1.97, "source": "s"}]
        stages_per_preset = {"cifar10": {"tune": {"loss": {"double": 2}}, "report": {"paper": {"claims": at_32}}},
                             "cifar10-400k": {"tune": {"loss": {"double": 2}, "snapshot_kimg": 0.016},
                                              "report": {"paper": {"claims": at_32}}},
                             "cifar10-1hour": {"fid": {"published_reference": {"url": f"{server.url}/shifted.npz"}}},
                             "cifar10-scaling": {
                                 "tune": {"loss": {"double": 2}, "snapshot_kimg": 0.016},
                                 "fid": {"dinov2": {"url": f"{server.url}/dinov2_vitl14_pretrain.pth"}},
                                 "scaling": {"budgets_kimg": [0.032, 0.048, 0.064], "samples": 8,
                                             "batches": {"sizes": ["ddpmpp"], "batch": [8, 16], "iterations": 4}}}}
        for preset, stages in stages_per_preset.items():
            path = repo / "config" / f"{preset}.yaml"
            path.write_text(yaml.safe_dump(merge(merge(yaml.safe_load(path.read_text()), overlay), stages), sort_keys=False))
        # the other presets that fetch the same Inception and DINOv2 files (ImageNet) must fetch them the same way
        dinov2 = stages_per_preset["cifar10-scaling"]["fid"]["dinov2"]
        for path in sorted((repo / "config").glob("*.yaml")):
            fid = read_config(path)["fid"]
            if path.stem not in stages_per_preset and fid["feature_net"]["kind"] == "inception":
                same = {"fid": {"feature_net": overlay["fid"]["feature_net"], **({"dinov2": dinov2} if fid.get(
                    "dinov2") else {})}}
                path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), same), sort_keys=False))
        # the DVC files follow the presets: their URLs and checksums are in the commands
        run([sys.executable, "workflow/generate_dvc.py"], repo)
        run(["snakemake", "prefetch", "--configfile", "config/cifar10.yaml"], repo)
        run(["snakemake", "prefetch", "--configfile", "config/cifar10-1hour.yaml"], repo)  # its own statistics
        run(["snakemake", "prefetch", "--configfile", "config/cifar10-scaling.yaml"], repo)  # DINOv2
        assert server.requests and {p for p, _ in server.requests} == {f"/{n}" for n in files}
    for name, blob in [("downloads/cifar-10-python.tar.gz", tarball), ("teachers/edm-cifar10-32x32-uncond-vp.pkl", teacher),
                       ("fid/inception-2015-12-05.pt", inception)]:
        assert (repo / "resources" / name).read_bytes() == blob
    recorded = yaml.safe_load((repo / "downloads.lock").read_text())
    assert recorded[f"{server.url}/inception-2015-12-05.pt"] == {
        "sha256": hashlib.sha256(inception).hexdigest(), "size": len(inception), "recorded": recorded[
            f"{server.url}/inception-2015-12-05.pt"]["recorded"]}
    assert set(recorded) == {f"{server.url}/{name}" for name in ("inception-2015-12-05.pt", "cifar10-32x32.npz",
                                                                 "shifted.npz", "dinov2_vitl14_pretrain.pth")}
    run(["snakemake", "--configfile", "config/cifar10.yaml"], repo, timeout=900)  # the server is gone: no network
    res = repo / "results" / "cifar10"
    r = json.loads((res / "fid" / "ect-2step.json").read_text())
    assert r["mode"] == "legacy_tensorflow" and set(r["modes"]) == {"legacy_tensorflow", "clean"}
    assert r["modes"]["legacy_tensorflow"]["fid_sets"] != r["modes"]["clean"]["fid_sets"]
    assert r["feature_net_sha256"] == hashlib.sha256(inception).hexdigest() and r["nfe"] == 2
    assert r["reference"]["images"] == 40
    page = (repo / "reports" / "cifar10" / "index.html").read_text()
    assert "2.15" in page and "not comparable" not in page  # the paper's numbers, side by side
    assert "legacy_tensorflow" in page and hashlib.sha256(teacher).hexdigest() in page
    assert "pinned" in page and "recorded on first use" in page  # how each download was checked
    claims = json.loads((res / "claims.json").read_text())  # a verdict per paper number, at its budget
    assert [c["paper"] for c in claims] == [2.2, 2.15, 1.97] and all(c["verdict"] in ("short", "inconsistent",
                                                                                        "reproduced") for c in claims)
    assert len(json.loads((res / "fid" / "snapshot-0.032.json").read_text())["fid_2step"]) == 3
    check = json.loads((res / "fid" / "reference-check.json").read_text())
    assert check["pass"] and check["frechet_distance"] < 1e-6, check  # our statistics are the published ones
    assert "Reference statistics\nchecked" in page
    assert "Nothing to be done" in run(["snakemake", "--configfile", "config/cifar10.yaml", "-n"], repo).stdout

    # the other preset reuses the downloads, the dataset and the reference statistics as they are
    planned = run(["snakemake", "--configfile", "config/cifar10-1hour.yaml", "-n"], repo).stdout
    rules = set(re.findall(r"^rule (\w+):", planned, re.M)) | set(re.findall(r"^localrule (\w+):", planned, re.M))
    assert rules == {"teacher", "tune", "sample", "fid", "fid_curve", "fid_budget", "reference_check", "report",
                     "all"}, planned[-3000:]

    # DVC: the Snakemake runs recorded themselves, so nothing to do; the shared files are in dvc.lock
    target = f"{dvcfile}:report"
    assert "up to date" in run(["dvc", "status", "--with-deps", target], repo).stdout
    assert "Running stage" not in run(["dvc", "repro", target], repo).stdout
    lock = yaml.safe_load((repo / "pipelines/cifar10/dvc.lock").read_text())["stages"]
    recorded = {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", [])}
    for name in ["downloads/cifar-10-python.tar.gz", "teachers/edm-cifar10-32x32-uncond-vp.pkl",
                 "fid/inception-2015-12-05.pt", "fid/cifar10-32-inception-reference.npz", "datasets/cifar10-32/dataset.npz"]:
        assert recorded[f"resources/{name}"] == md5((repo / "resources" / name).read_bytes()), name
    out = run(["dvc", "repro", "-f", "-s", f"{dvcfile}:fid_reference"], repo).stdout
    assert re.findall(r"Running stage '([^']+)'", out) == [f"{dvcfile}:fid_reference"]
    assert "up to date" in run(["dvc", "status", "--with-deps", target], repo).stdout  # bit-identical statistics
    # DVC runs the other preset from the shared files: only its own stages run
    out = run(["dvc", "repro", "pipelines/cifar10-1hour/dvc.yaml"], repo).stdout
    ran = re.findall(r"Running stage '([^']+)'", out)
    assert all(name.startswith("pipelines/cifar10-1hour/dvc.yaml:") for name in ran), ran
    assert {name.split(":")[1].split("-")[0] for name in ran} == {"teacher", "tune", "sample", "fid", "fid_curve",
                                                                  "fid_budget", "reference_check", "report"}
    hour = (repo / "reports" / "cifar10-1hour" / "index.html").read_text()
    assert "2.73" in hour and "within 1 A100 GPU-hour(s)" in hour and "not on an A100" in hour  # judged on A100s only
    assert json.loads((repo / "results/cifar10-1hour/claims.json").read_text())[-1]["verdict"] == "unjudged"
    assert "do not match the published ones" in hour and "resources/fid/shifted.npz" in hour  # the warning box

    # The scaling study: the 400k preset's run is trained here, under its own name, by its own command (DVC
    # writes that stage once); batch 8 at 4 iterations is that run's snapshot, batch 16 a run of its own.
    run(["snakemake", "scaling", "--configfile", "config/cifar10-scaling.yaml"], repo, timeout=1200)
    assert (repo / "results/cifar10-400k/tuned.pt").exists() and not (repo / "results/cifar10-scaling/sizes/ddpmpp").exists()
    planned = run(["snakemake", "-n", "--configfile", "config/cifar10-400k.yaml"], repo).stdout
    assert not re.search(r"^rule (tune|teacher):", planned, re.M), planned[-2000:]  # nothing trained again
    monkeypatch.chdir(repo)  # the reused preset is read from the repository the study runs in
    study = RunLayout(load_spec(repo / "config/cifar10-scaling.yaml"))
    points = list(csv.DictReader(open(repo / study.scaling_points)))
    assert {(r["run"], r["design"], r["metric"]) for r in points} >= {
        ("ddpmpp", "prefix", "fid"), ("ddpmpp", "prefix", "fd_dinov2"), ("ddpmpp-batch8", "batch", "fd_dinov2"),
        ("ddpmpp-batch16", "batch", "fid")}
    assert (repo / "results/cifar10-scaling/sizes/ddpmpp-batch16/tuned.pt").exists()
    size_fit = json.loads((repo / study.scaling_fit("ddpmpp-2step")).read_text())
    assert size_fit["fd_dinov2"]["n_points"] == 3 and "saturating" in size_fit["fd_dinov2"]
    page = (repo / study.report).read_text()
    assert "FD_DINOv2" in page and "batch-grown" in page
    frontier = json.loads((repo / study.scaling_fit("2step")).read_text())
    if frontier.get("fitted") is False:  # runs of 4 iterations: noise can leave under 3 points on the frontier
        assert frontier["reason"].startswith("the frontier keeps") and "fd_dinov2" in frontier["not_fitted"]
        assert "No law for frontier across sizes (FLOPs), FD_DINOv2 at 2 steps: the frontier keeps" in page
    else:
        assert frontier["fd_dinov2"]["n_points"] >= 3
    dvc = [yaml.safe_load((repo / f"pipelines/{p}/dvc.yaml").read_text())["stages"] for p in ("cifar10-400k",
                                                                                            "cifar10-scaling")]
    writes = [{out for stage in stages.values() for out in stage.get("outs", [])} for stages in dvc]
    assert "results/cifar10-400k/tuned.pt" in writes[0] and "results/cifar10-400k/tuned.pt" not in writes[1]


def test_tune_runs_one_process_per_requested_gpu_under_torchrun(tmp_path):
    overlay = tmp_path / "gpus.yaml"
    overlay.write_text(yaml.safe_dump({"resources": {"tune": {"gpu": 4, "gpu_model": "a100"}}}))
    out = run(["snakemake", "-n", "-p", "--configfile", "config/config.yaml", str(overlay)], ROOT).stdout
    tune = next(line for line in out.splitlines() if line.startswith("Shell command:") and " tune --config" in line)
    assert tune.startswith("Shell command: exec torchrun --standalone --nproc_per_node=4 "
                           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m ect.cli tune --config")
    assert "gpu=4" in out and "gpu_model=a100" in out
    default = run(["snakemake", "-n", "-p"], ROOT).stdout
    assert "Shell command: exec ect tune --config config/config.yaml" in default


def test_tune_over_several_nodes_is_one_job_that_starts_one_launcher_a_node(tmp_path):
    """resources.tune.nodes: one SLURM job over the nodes (a GRES of GPUs on each), whose rule runs srun with one
    launcher a node; the dry run counts every node's GPUs. Only tune may span nodes."""
    overlay = tmp_path / "nodes.yaml"
    overlay.write_text(yaml.safe_dump({"tune": {"batch": 32}, "resources": {"tune": {"gpu": 4, "nodes": 2}}}))
    out = run(["snakemake", "-n", "-p", "--configfile", "config/config.yaml", str(overlay)], ROOT).stdout
    tune = next(line for line in out.splitlines() if line.startswith("Shell command:") and " tune --config" in line)
    assert tune.startswith("Shell command: exec srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=2 --gres=gpu:4 "
                           "--kill-on-bad-exit=1 python -m ect.launch --nproc-per-node=4 -- tune --config")
    assert "nodes=2, tasks=2, mpi=srun, tasks_per_gpu=0, gres=gpu:4" in out
    assert re.search(r"tune +1 job\(s\) x 8 GPU \(2 nodes\) x 15 min = +2\.0 GPU-h", out), out
    uneven = tmp_path / "uneven.yaml"
    uneven.write_text(yaml.safe_dump({"tune": {"batch": 36}, "resources": {"tune": {"gpu": 4, "nodes": 2}}}))
    proc = run(["snakemake", "-n", "--configfile", "config/config.yaml", str(uneven)], ROOT, check=False)
    assert proc.returncode != 0 and ("tune.batch 36 does not split evenly over resources.tune.gpu = 4 GPUs on each "
                                     "of resources.tune.nodes = 2 nodes") in proc.stderr + proc.stdout
    sample = tmp_path / "sample.yaml"
    sample.write_text(yaml.safe_dump({"resources": {"sample": {"nodes": 2}}}))
    proc = run(["snakemake", "-n", "--configfile", "config/config.yaml", str(sample)], ROOT, check=False)
    assert proc.returncode != 0 and "resources.sample.nodes: 2: only tune runs over several nodes" in proc.stderr


def test_the_report_replaces_only_a_directory_it_wrote(toy_run):
    """`ect report --out` a run's results (or the repo, or anything it did not write) is refused, and every
    file there survives; temporaries of killed reports are cleaned up by the next one."""
    repo, _, _ = toy_run
    before = {p: sha256(p) for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts and ".snakemake" not in p.parts}
    for out in ["results/toy", "results", "."]:
        proc = run(["ect", "report", "--config", "config/config.yaml", "--out", out], repo, check=False)
        assert proc.returncode == 2 and "that 'ect report' did not write" in proc.stderr, proc.stderr
    after = {p: sha256(p) for p in before if p.exists()}
    assert after == before
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = repo / "reports" / f".other.tmp-{dead.pid}-new"
    stale.mkdir()
    (stale / "index.html").write_text("half a report")
    run(["ect", "report", "--config", "config/config.yaml", "--out", "reports/other"], repo)
    assert (repo / "reports/other/index.html").exists() and not stale.exists()
    assert [p.name for p in (repo / "reports").iterdir() if p.name.startswith(".")] == []


def test_after_snakemake_is_killed_its_step_stops_and_the_documented_recovery_resumes(toy_run, tmp_path):
    """`kill -9` of snakemake mid-pretraining: the trainer saves its state and exits instead of running on
    (it dies with its parent); then the README's recovery, `snakemake --unlock` and `snakemake`, resumes the
    run, with no duplicated log lines and the same teacher as an uninterrupted run."""
    import signal

    repo = clone_repo(tmp_path / "repo")
    target = TOY.teacher
    smk = subprocess.Popen(["snakemake", target], cwd=repo, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    state, lock = repo / TOY.state("pretrain") / "state.pt", repo / TOY.state("pretrain") / "lock"
    deadline = time.time() + 300
    while not state.exists():
        assert smk.poll() is None and time.time() < deadline, "pretraining never saved a state"
        time.sleep(0.1)
    trainer = int(lock.read_text().split()[1])
    smk.send_signal(signal.SIGKILL)
    smk.wait()
    deadline = time.time() + 60
    while Path(f"/proc/{trainer}").exists() and Path(f"/proc/{trainer}/stat").read_text().split()[2] != "Z":
        assert time.time() < deadline, "the trainer outlived snakemake"
        time.sleep(0.1)
    assert "received signal 15: state saved" in (repo / TOY.log("pretrain")).read_text()
    assert not (repo / target).exists()
    run(["snakemake", "--unlock"], repo)
    run(["snakemake", target], repo)
    assert "resuming from" in (repo / TOY.log("pretrain")).read_text()
    iterations = [json.loads(line)["iteration"] for line in (repo / TOY.pretrain_log).read_text().splitlines()]
    assert iterations == sorted(set(iterations))
    import torch

    resumed = torch.load(repo / target, weights_only=True)["state_dict"]
    whole = torch.load(toy_run[0] / target, weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_no_config_file_path_reaches_a_snakemake_shell_unquoted(tmp_path):
    """A config file whose name is shell code: every rule quotes what it puts into its command."""
    repo = clone_repo(tmp_path / "repo")
    name = "x$(touch PWNED1)`touch PWNED2`'; touch PWNED3 #.yaml"
    (repo / name).write_text(yaml.safe_dump({"run": "quoted", "fid": {"feature_net": {"kind": "digits-classifier",
                                                                                     "epochs": 1}}}))
    run(["snakemake", "results/quoted/fid/feature-net.pt", "--configfile", "config/config.yaml", name], repo)
    assert (repo / "results/quoted/fid/feature-net.pt").exists()
    assert not list(repo.glob("PWNED*"))


def test_the_toy_scaling_study_scores_every_point_fits_the_laws_and_reports_them(tmp_path):
    """`snakemake scaling` on a shrunk toy study (3 sizes x 4 budgets, a second seed of each size at two budgets,
    size s grown by its batch): a job per point, the points table with its runs and designs, every fit (the
    frontier across sizes, each size, the batch-grown runs, across sizes at one budget; pure and with a floor)
    and the report with both forms and both spreads."""
    repo = clone_repo(tmp_path / "repo")
    overlay = {"pretrain": {"kimg": 2, "tick_kimg": 1},
               "tune": {"kimg": 3.2, "snapshot_kimg": 0.8, "tick_kimg": 0.8, "loss": {"double": 15}},
               "scaling": {"sizes": {"xs": {"model_channels": 8}, "s": {"model_channels": 12},
                                     "m": {"model_channels": 16}},
                           "budgets_kimg": [0.8, 1.6, 2.4, 3.2], "samples": 128, "sets": 3,
                           "seeds": {"count": 2, "budgets_kimg": [1.6, 3.2]},
                           # batch 32 for 50 iterations is the 1.6 kimg snapshot of s's own run: trained once
                           "batches": {"sizes": ["s"], "batch": [16, 32, 64], "iterations": 50}},
               "fid": {"feature_net": {"epochs": 2}}}
    (repo / "small.yaml").write_text(yaml.safe_dump(overlay))
    out = run(["snakemake", "scaling", "--configfile", "config/toy-scaling.yaml", "small.yaml"], repo, timeout=1500)
    spec = load_spec(repo / "config/toy-scaling.yaml", repo / "small.yaml")
    study = RunLayout(spec)
    declared = set(yaml.safe_load((repo / "pipelines/toy-scaling/dvc.yaml").read_text())["stages"]["report"]["deps"])
    read = report_reads(repo, "reports/audit", "config/toy-scaling.yaml", "small.yaml")
    assert {RunLayout(spec, "m").teacher} <= read <= declared, read - declared
    assert study.trained_models == ["xs", "s", "m", "xs-seed1", "s-seed1", "m-seed1", "s-batch16", "s-batch64"]
    assert "--model s-batch32 --data" not in out.stderr and not (repo / "results/toy-scaling/sizes/s-batch32").exists()
    for model in spec.scaling.models:
        for kimg in spec.scaling.budgets_of(model):
            assert (repo / study.scaling_point(model, f"{kimg:g}")).exists(), (model, kimg)

    rows = list(csv.DictReader(open(repo / study.scaling_points)))
    assert len(rows) == (3 * 4 + 3 * 2 + 3) * 3 * 2 and {r["size"] for r in rows} == {"xs", "s", "m"}
    assert {(r["run"], r["design"]) for r in rows if r["size"] == "s"} == {
        ("s", "prefix"), ("s-seed1", "prefix"), ("s-batch16", "batch"), ("s-batch32", "batch"), ("s-batch64", "batch")}
    compute = {(r["run"], r["kimg"]): float(r["compute"]) for r in rows}
    assert compute[("m", "3.2")] > compute[("m", "0.8")] and compute[("m", "3.2")] > compute[("xs", "3.2")]
    assert compute[("s-batch32", "1.6")] == compute[("s", "1.6")]  # the same snapshot
    for name in ("1step", "2step", "m-2step", "xs-1step", "s-batch-2step", "size-1step", "size-2step"):
        fit = json.loads((repo / study.scaling_fit(name)).read_text())
        assert {"coefficient", "exponent", "exponent_ci95", "r2", "n_points", "holdout", "saturating", "preferred",
                "supports", "spreads"} <= set(fit)
        assert fit["frontier"] == (name in ("1step", "2step"))
        assert fit["n_points"] == {"m-2step": 4, "xs-1step": 4, "s-batch-2step": 3, "size-1step": 3,
                                   "size-2step": 3}.get(name, fit["n_points"])
    size_fit = json.loads((repo / study.scaling_fit("size-2step")).read_text())
    assert size_fit["axis"] == "size" and size_fit["budget_kimg"] == 3.2 and "against_flops_per_iteration" in size_fit
    frontier = json.loads((repo / study.scaling_fit("2step")).read_text())
    assert frontier["spreads"]["run_to_run"] is not None and frontier["spreads"]["set_to_set"] is not None
    page = (repo / study.report).read_text()
    assert f"{frontier['exponent']:.4f}" in page and "seem to obey classic power law scaling" in page
    assert frontier["supports"] in page and "run-to-run spread" in page and "batch-grown" in page
    assert "across sizes at one budget" in page and "saturating exponent" in page
    assert (repo / study.report_dir / "scaling.png").stat().st_size > 10_000
