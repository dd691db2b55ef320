import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_device_check_goes_through_every_step_on_cpu_at_smoke_sizes(tmp_path):
    """benchmarks/device_check.sh is what a lent GPU machine runs, in one call with little time to spare: its
    --smoke run here takes the same steps (the CUDA-only tests, skipped here; gpu_check.py on a tiny network)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 skipped" in (tmp_path / "cuda-tests.log").read_text()  # the CUDA variant was collected
    lines = (tmp_path / "gpu-check.log").read_text().splitlines()
    rows = json.loads("\n".join(lines[lines.index("{"):]))
    assert [r["precision"] for r in rows["train"]] == ["fp32", "bf16 autocast"]
    assert all(r["img_per_s"] > 0 and r["iters"] == 2 for r in rows["train"])
    assert rows["fid"]["samples"] == 16 and rows["fid"]["projected_50k_fid_min"] > 0
    assert not (tmp_path / "RESULTS.md").exists()  # a smoke run records nothing


def test_the_step_time_benchmark_runs_on_the_toy_network():
    """benchmarks/step_time.py drives the trainer's TrainStep directly: run it (one round, the toy network, no
    reference checkout) so that a change of the trainer's interfaces cannot break it silently again."""
    proc = subprocess.run([sys.executable, "benchmarks/step_time.py", "--only", "toy", "--batch-toy", "4", "--steps",
                           "1", "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["network"] == "toy" and row["batch"] == 4 and row["ours"]["step_s"] > 0 and row["noise_floor"] > 0
    assert "reference" not in row and "no --reference" in proc.stderr


def test_the_scaling_fit_benchmark_runs_beside_the_first_version():
    """benchmarks/scaling_fit.py times ours beside ect/scaling.py at its first commit (read from git): run it
    small, so that it stays runnable."""
    proc = subprocess.run([sys.executable, "benchmarks/scaling_fit.py", "--rows", "2000", "--baseline-rows", "400"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("faster") == 2 and proc.stdout.count("2,000 rows: ours") == 2


def test_the_throughput_options_benchmark_times_each_option_and_holds_its_losses_to_the_default():
    """bf16, channels_last and compile (torch.compile, here on a CPU) against float32 eager: each option's step
    time as a ratio, and its losses over the first iterations within the stated tolerance of the default's (the
    benchmark's EARLY iterations: here all of them)."""
    proc = subprocess.run([sys.executable, "benchmarks/throughput_options.py", "--iterations", "10", "--steps", "1",
                           "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    options = json.loads(proc.stdout)["options"]
    assert set(options) == {"default", "bf16", "channels_last", "compile"}
    assert options["default"]["early_loss_rel_diff_max"] == 0 and options["default"]["step_time_over_default"] == 1
    for name in ("bf16", "channels_last", "compile"):
        assert options[name]["within_tolerance"], (name, options[name])
        assert options[name]["step_s"] > 0


def test_the_dataset_memory_benchmark_measures_both_ways_on_two_processes():
    proc = subprocess.run([sys.executable, "benchmarks/dataset_memory.py", "--images", "3000"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "copy per process (baseline)" in proc.stdout and "mapped (ours)" in proc.stdout
    assert "node total: ours / baseline = " in proc.stdout
