"""The ImageNet-64 presets plan the whole chain: every job, with its GPU-hours, from a dry run; the
scaling preset a teacher and a recipe per size."""
from __future__ import annotations

import re

import pytest
import yaml

from ect.config import read_config
from ect.layout import RunLayout
from ect.spec import load_spec, training_options
from ect.typed import ConfigError
from tests.helpers import ROOT, run

SIZES = {"s": (192, 0.001, 0.4), "m": (256, 0.0009, 0.5), "l": (320, 0.0008, 0.5), "xl": (384, 0.0007, 0.5)}


def planned(stdout: str) -> dict[str, int]:
    start = stdout.index("Job stats:")
    table = stdout[start:stdout.index("total", start)]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def gpu_hours(stdout: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^  (\w+) .*?([\d.]+) GPU-h$", stdout, re.M)}


@pytest.mark.parametrize("size", SIZES)
def test_each_imagenet_preset_plans_the_whole_chain_with_its_gpu_hours(size):
    preset = f"config/imagenet64-{size}.yaml"
    cfg = read_config(ROOT / preset)  # with its base
    out = run(["snakemake", "-n", "--configfile", preset], ROOT).stdout
    shards = cfg["fid"]["reference_shards"]
    assert planned(out) == {"dataset": 1, "fetch_feature_net": 1, "fetch_teacher": 1, "fid_reference_shard": shards,
                            "fid_reference": 1, "teacher": 1, "tune": 1, "sample": 4, "fid": 4, "fid_curve": 1,
                            "fetch_published_reference": 1, "reference_check": 1, "fetch_dinov2": 1, "fid_emas": 1,
                            "report": 1, "all": 1}
    res = cfg["resources"]
    hours = gpu_hours(out)
    assert hours["tune"] == pytest.approx(res["tune"]["gpu"] * res["tune"]["runtime"] / 60)
    assert hours["fid_reference"] == pytest.approx(shards * res["fid_reference"]["runtime"] / 60)
    assert hours["sample"] == pytest.approx(4 * res["sample"]["runtime"] / 60)
    assert sum(v for k, v in hours.items() if k != "total") == pytest.approx(hours["total"], abs=0.1)
    # The branch's recipe for this size, from EDM2's transfer pickle of this size.
    channels, lr, dropout = SIZES[size]
    tune = training_options(load_spec(ROOT / preset), "tune")
    assert (tune.lr, tune.arch["dropout"], tune.arch["dropout_res"], tune.betas) == (lr, dropout, 16, (0.9, 0.99))
    assert tune.total_iters == 100_000 and tune.loss.double == 25_000 and tune.loss.c == 0.06
    assert f"edm2-img64-{size}-" in cfg["teacher"]["url"] and cfg["sample"]["t_mid"] == [1.526]
    assert cfg["dataset"]["expected_count"] == 1_281_167


def test_the_imagenet_scaling_preset_tunes_each_size_from_its_own_teacher_with_its_own_recipe():
    """The study as the paper ran it: every size from its own teacher and recipe at batch 128 for 100k
    iterations (prefix budgets), XL grown by its batch to 1024 at 100k iterations (batch 128 is XL's own run,
    trained once), S repeated with a second seed; FID and FD_DINOv2 at every point; fits against compute per
    size, on the frontier, for the batch-grown runs and across sizes; the GPU-hours."""
    preset = "config/imagenet64-scaling.yaml"
    proc = run(["snakemake", "-n", "-p", "scaling", "--configfile", preset], ROOT)
    out = proc.stdout + proc.stderr  # the shell commands go to stderr
    jobs = planned(out)
    assert {jobs[f"fetch_teacher_{s}"] for s in ("S", "M", "L", "XL")} == {1} and jobs["fetch_dinov2"] == 1
    assert (jobs["teacher"], jobs["tune"], jobs["scaling_point"], jobs["scaling_fit"]) == (4, 8, 22, 14)
    config = load_spec(ROOT / preset)
    for size, key in (("S", "s"), ("XL", "xl")):
        assert f"ect.cli tune --config {preset} --model {size} " in out  # one process per GPU (torchrun)
        assert f"edm2-img64-{key}-" in RunLayout(config, size).teacher_pickle_of(size)
        tune = training_options(config, "tune", size)
        assert (tune.lr, tune.arch["dropout"]) == SIZES[key][1:]
    for batch in (256, 512, 1024):  # the paper's design: compute grown by the batch, 100k iterations each
        grown = training_options(config, "tune", model=f"XL-batch{batch}")
        assert (grown.batch, grown.total_iters, grown.lr) == (batch, 100_000, SIZES["xl"][1])
        assert f"--model XL-batch{batch} " in out
    assert "tune --config config/imagenet64-scaling.yaml --model XL-batch128 " not in out  # XL's own run, once
    assert "--snapshots results/imagenet64-scaling/sizes/XL/snapshots --model XL-batch128 --kimg 12800" in out
    assert training_options(config, "tune", model="S-seed1").seed == config.tune.seed + 1
    assert out.count("--dinov2 resources/fid/dinov2_vitl14_pretrain.pth") >= 22  # every point, FD_DINOv2 too
    for fit in ("fit-size-1step.json", "fit-size-2step.json", "fit-XL-batch-2step.json", "fit-2step.json"):
        assert f"--out results/imagenet64-scaling/scaling/{fit}" in out
    assert [c.model for c in config.report.paper.claims] == ["XL-batch1024", "XL-batch1024"]
    assert re.search(r"tune\s+8 job\(s\) x 8 GPU", out) and "GPU-h" in out


def test_scaling_teachers_must_cover_every_size(tmp_path):
    cfg = read_config(ROOT / "config/imagenet64-scaling.yaml")
    del cfg["scaling"]["teachers"]["XL"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="a download for every size"):
        load_spec(tmp_path / "c.yaml")
    del cfg["scaling"]["teachers"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="need a teacher each"):
        load_spec(tmp_path / "c.yaml")
