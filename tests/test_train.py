import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ect.checkpoint import read_checkpoint
from ect.spec import Tune
from ect.train import batch_indices, batch_noise, train
from tests.helpers import TINY_ARCH, ect_command, make_dataset, make_teacher, run_ect, state_dicts_equal, write_config


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "data.npz"
    make_dataset(data)
    teacher = make_teacher(tmp_path / "teacher.pt")
    return tmp_path, data, teacher


def tune_args(tmp, data, teacher, config, name):
    return ["tune", "--config", config, "--data", data, "--teacher", teacher, "--state-dir", tmp / f"{name}-state",
            "--out", tmp / f"{name}.pt", "--snapshots", tmp / f"{name}-snaps", "--train-log", tmp / f"{name}.jsonl",
            "--threads", "1", "--no-progress"]


def wait_for(path, proc, timeout=60):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"process ended early: {proc.stderr.read() if proc.stderr else ''}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_config_errors_name_the_key():
    base = {"kimg": 1, "batch": 8}
    with pytest.raises(ValueError, match="unknown key 'learning_rate' in tune"):
        Tune.from_dict({**base, "learning_rate": 1})
    with pytest.raises(ValueError, match="unknown key 'Pmean' in tune.loss"):
        Tune.from_dict({**base, "loss": {"Pmean": 1}})
    with pytest.raises(ValueError, match="tune.optimizer: 'sgd' is not one of"):
        Tune.from_dict({**base, "optimizer": "sgd"})
    with pytest.raises(ValueError, match="tune.output_ema_std: 0.05 is not one of pf_ema_stds"):
        Tune.from_dict({**base, "output_ema_std": 0.05})
    with pytest.raises(ValueError, match="tune: 'batch' is a required property"):
        Tune.from_dict({"kimg": 1})


def test_batches_are_epoch_permutations_and_noise_is_per_iteration():
    seen = torch.cat([batch_indices(0, i, 16, 64) for i in range(4)])
    assert sorted(seen.tolist()) == list(range(64))  # one epoch = each image once
    assert not torch.equal(batch_indices(0, 4, 16, 64), batch_indices(0, 0, 16, 64))
    a, b = batch_noise(0, 3, (4, 3, 8, 8)), batch_noise(0, 3, (4, 3, 8, 8))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], batch_noise(0, 4, (4, 3, 8, 8))[1])


def test_tune_writes_outputs_and_sigkill_resume_is_bit_identical(setup):
    tmp, data, teacher = setup
    config = write_config(tmp / "c.yaml", tune={"kimg": 0.96, "snapshot_kimg": 0.32, "arch": {"dropout": 0.3}})
    run_ect(*tune_args(tmp, data, teacher, config, "full"))
    full = read_checkpoint(tmp / "full.pt")
    assert full["arch"]["kind"] == "ect" and full["arch"]["augment_dim"] == 0 and full["meta"]["iteration"] == 120
    log = read_log(tmp / "full.jsonl")
    assert [e["iteration"] for e in log] == list(range(5, 121, 5))
    assert {"loss", "stage", "lr", "img_per_s", "kimg", "peak_mem_mb"} <= set(log[0])
    assert [e["stage"] for e in log] == [(e["iteration"] - 1) // 10 for e in log]  # a stage every 10 iterations

    args = tune_args(tmp, data, teacher, config, "killed")
    proc = subprocess.Popen(ect_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(tmp / "killed-state" / "state.pt", proc)
    time.sleep(random.uniform(0.0, 0.8))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp / "killed.pt").exists()
    killed_at = torch.load(tmp / "killed-state" / "state.pt", weights_only=True)["iteration"]
    assert 0 < killed_at < 120
    resumed = run_ect(*args)
    assert "resuming from" in resumed.stderr
    assert state_dicts_equal(read_checkpoint(tmp / "killed.pt")["state_dict"], full["state_dict"])
    assert [e["iteration"] for e in read_log(tmp / "killed.jsonl")] == [e["iteration"] for e in log]
    snaps = sorted(p.name for p in (tmp / "full-snaps").iterdir())
    assert snaps == ["kimg000000.320.pt", "kimg000000.640.pt", "kimg000000.960.pt"]
    for name in snaps:
        a, b = read_checkpoint(tmp / "full-snaps" / name), read_checkpoint(tmp / "killed-snaps" / name)
        assert state_dicts_equal(a["state_dict"], b["state_dict"]) and a["meta"]["kimg"] == float(name[4:-3])
    assert state_dicts_equal(read_checkpoint(tmp / "full-snaps" / snaps[-1])["state_dict"], full["state_dict"])


def test_sigterm_saves_state_exits_75_and_resumes_even_with_other_save_and_log_intervals(setup):
    tmp, data, teacher = setup
    config = write_config(tmp / "c.yaml", tune={"kimg": 0.8, "state_kimg": 10})  # periodic state: never
    run_ect(*tune_args(tmp, data, teacher, config, "full"))
    args = tune_args(tmp, data, teacher, config, "term")
    proc = subprocess.Popen(ect_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # first tick logged: training is under way
    assert json.loads(line)["iteration"] == 5
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "rerun the same command to resume" in err
    stopped = torch.load(tmp / "term-state" / "state.pt", weights_only=True)
    saved = stopped["iteration"]
    assert 5 <= saved < 100
    # resumed with more frequent saves and ticks (CADENCE_KEYS): accepted, and the same weights
    resume_config = write_config(tmp / "more-often.yaml", tune={"kimg": 0.8, "state_kimg": 0.016, "tick_kimg": 0.008})
    run_ect(*tune_args(tmp, data, teacher, resume_config, "term"))
    assert state_dicts_equal(read_checkpoint(tmp / "term.pt")["state_dict"], read_checkpoint(tmp / "full.pt")["state_dict"])
    timing = ("elapsed_s", "device_hours")  # wall-clock: the only meta that differs between the two runs
    term, full = (read_checkpoint(tmp / f"{n}.pt")["meta"] for n in ("term", "full"))
    assert {k: v for k, v in term.items() if k not in timing} == {k: v for k, v in full.items() if k not in timing}
    # the training time continues across the resume: the interrupted run's time is kept, not restarted
    assert 0 < stopped["elapsed_s"] < term["elapsed_s"]
    log = read_log(tmp / "term.jsonl")
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(log, log[1:], strict=False))
    assert [e["flops"] for e in log] == [e["iteration"] * term["flops_per_iteration"] for e in log]


def test_diverging_loss_stops_and_keeps_last_good_state(setup):
    tmp, data, teacher = setup
    config = write_config(tmp / "c.yaml", tune={"lr": 1e15, "optimizer": "adam", "state_kimg": 0.008})
    proc = run_ect(*tune_args(tmp, data, teacher, config, "nan"), check=False)
    assert proc.returncode == 1
    assert "became" in proc.stderr and "last good state" in proc.stderr
    assert not (tmp / "nan.pt").exists()
    state = torch.load(tmp / "nan-state" / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["net"].values())


def test_bf16_autocast_and_channels_last_run(setup):
    tmp, data, teacher = setup
    cfg = Tune.from_dict({**yaml.safe_load(write_config(tmp / "c.yaml").read_text())["tune"],
                                 "kimg": 0.04, "bf16": True, "channels_last": True, "tf32": True})
    summary = train(cfg, data, tmp / "st", tmp / "out.pt", init_path=teacher, progress=False)
    assert summary["iterations"] == 5
    ckpt = read_checkpoint(tmp / "out.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not state_dicts_equal(ckpt["state_dict"], read_checkpoint(teacher)["state_dict"])


def test_resume_refuses_a_different_config(setup):
    tmp, data, teacher = setup
    run_ect(*tune_args(tmp, data, teacher, write_config(tmp / "a.yaml", tune={"kimg": 0.08}), "x"))
    proc = run_ect(*tune_args(tmp, data, teacher, write_config(tmp / "b.yaml", tune={"kimg": 0.08, "lr": 2e-3}), "x"),
                   check=False)
    assert proc.returncode == 2 and "different configuration" in proc.stderr


def two_nodes(tmp, ect_args, env):
    """What srun starts in a two-node tune job: one launcher (ect/launch.py) a node, here both on this machine,
    meeting at a c10d rendezvous on the step's first node as SLURM names it (scontrol: a stand-in here)."""
    bin_dir = tmp / "slurm-bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (bin_dir / "scontrol").chmod(0o755)
    job = str(random.randrange(10**6))
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "ect.launch", "--nproc-per-node", "1", "--", *map(str, ect_args)],
        env={**env, "PATH": f"{bin_dir}:{env['PATH']}", "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_ID": job,
             "SLURM_STEP_NODELIST": "localhost,localhost", "SLURM_NODEID": str(node)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], logs
    assert all("--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=localhost:" in log for log in logs)


def test_ddp_two_processes_match_one_process_and_accumulation(setup):
    tmp, data, teacher = setup
    config = write_config(tmp / "c.yaml", tune={"kimg": 0.16})
    run_ect(*tune_args(tmp, data, teacher, config, "one"))
    accum = write_config(tmp / "acc.yaml", tune={"kimg": 0.16, "batch_gpu": 2})
    run_ect(*tune_args(tmp, data, teacher, accum, "acc"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ect.cli",
           *map(str, tune_args(tmp, data, teacher, config, "two"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_nodes(tmp, tune_args(tmp, data, teacher, config, "nodes"), env)
    one = read_checkpoint(tmp / "one.pt")["state_dict"]
    for name in ("two", "acc", "nodes"):
        other = read_checkpoint(tmp / f"{name}.pt")["state_dict"]
        for k in one:
            torch.testing.assert_close(other[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
    assert not state_dicts_equal(one, read_checkpoint(tmp / "teacher.pt")["state_dict"])


def test_pretrain_lowers_edm_loss_and_writes_an_edm_teacher(tmp_path):
    data = tmp_path / "data.npz"
    make_dataset(data)
    config = write_config(tmp_path / "c.yaml", pretrain={"kimg": 0.8, "lr": 2e-3, "ema_beta": 0.5})
    run_ect("pretrain", "--config", config, "--data", data, "--state-dir", tmp_path / "st", "--out", tmp_path / "t.pt",
            "--train-log", tmp_path / "log.jsonl", "--threads", "1", "--no-progress")
    ckpt = read_checkpoint(tmp_path / "t.pt")
    assert ckpt["arch"]["kind"] == "edm" and ckpt["meta"]["producer"] == "ect pretrain"
    losses = [e["loss"] for e in read_log(tmp_path / "log.jsonl")]
    assert sum(losses[-4:]) < sum(losses[:4])


def test_lr_schedules_and_ema_half_life():
    cfg = Tune.from_dict({"kimg": 1, "lr": 1e-3, "lr_schedule": "isqrt", "lr_decay_iters": 100, "batch": 128})
    assert [cfg.lr_at(i) for i in (0, 100)] == [1e-3, 1e-3]
    assert cfg.lr_at(400) == pytest.approx(1e-3 / 2)
    assert Tune.from_dict({"kimg": 1, "batch": 8, "lr": 1e-3}).lr_at(10**6) == 1e-3
    half = Tune.from_dict({"kimg": 1, "batch": 128, "ema_halflife_kimg": 0.5})
    assert half.ema_decay() == pytest.approx(0.5 ** (128 / 500))
    assert half.ema_decay() ** (500 / 128) == pytest.approx(0.5)
    assert Tune.from_dict({"kimg": 1, "batch": 8, "ema_beta": 0.9993}).ema_decay() == 0.9993


def test_ema_is_beta_average_of_parameters_after_each_step(setup):
    tmp, data, teacher = setup
    cfg = Tune.from_dict({**yaml.safe_load(write_config(tmp / "c.yaml").read_text())["tune"],
                                 "kimg": 0.008, "ema_beta": 0.9})  # exactly one iteration
    train(cfg, data, tmp / "st", tmp / "out.pt", init_path=teacher, progress=False)
    init = read_checkpoint(teacher)["state_dict"]
    net = torch.load(tmp / "st" / "state.pt", weights_only=True)["net"]
    ema = read_checkpoint(tmp / "out.pt")["state_dict"]
    for k, v in ema.items():
        want = 0.9 * init[k] + 0.1 * net[k] if not k.endswith("resample_filter") else init[k]
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(net["model.enc.8x8_conv.weight"], init["model.enc.8x8_conv.weight"])


def test_flops_of_an_iteration_scale_with_the_batch_and_ect_adds_one_forward_pass():
    from torch.utils.flop_counter import FlopCounterMode

    from ect.cost import forward_flops, iteration_flops
    from ect.networks import build_network

    arch, shape = {**TINY_ARCH, "kind": "ect", "dropout": 0.1}, (3, 8, 8)
    per_8 = iteration_flops(arch, "ect", 8, 8, shape)
    assert iteration_flops(arch, "ect", 8, 16, shape) == iteration_flops(arch, "ect", 16, 16, shape) == 2 * per_8
    assert per_8 - iteration_flops(arch, "edm", 8, 8, shape) == forward_flops(arch, 8, shape)
    # counted on shapes (the meta device) exactly as on real tensors
    net = build_network(arch).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(8, *shape), torch.ones(8))
    assert counter.get_total_flops() == forward_flops(arch, 8, shape) > 0


def test_ticks_and_snapshots_carry_the_cost_so_far(setup):
    tmp, data, teacher = setup
    config = write_config(tmp / "c.yaml", tune={"kimg": 0.32, "snapshot_kimg": 0.16})
    run_ect(*tune_args(tmp, data, teacher, config, "run"))
    log = read_log(tmp / "run.jsonl")
    meta = read_checkpoint(tmp / "run.pt")["meta"]
    assert meta["flops"] == meta["iteration"] * meta["flops_per_iteration"] > 0
    assert meta["device"]["type"] == "cpu" and meta["device"]["count"] == 1 and meta["device"]["name"].startswith("CPU")
    assert meta["device_hours"] == pytest.approx(meta["elapsed_s"] / 3600)
    assert all(e["tflops"] > 0 and e["utilization"] is None for e in log)  # no peak is known for a CPU
    snaps = [read_checkpoint(p)["meta"] for p in sorted((tmp / "run-snaps").glob("*.pt"))]
    assert [m["iteration"] for m in snaps] == [20, 40] and snaps[0]["elapsed_s"] < snaps[1]["elapsed_s"]
    assert list((tmp / "run-state" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_shorter_run_is_a_prefix_of_a_longer_one_so_snapshots_are_budget_points(setup):
    """What makes a scaling study's budget points valid: the learning rate and the stage depend only on the
    iteration, so the snapshot of a long run at k kimg is the model a k-kimg run ends with, bit for bit."""
    tmp, data, teacher = setup
    for schedule in ("constant", "isqrt"):
        tune = {"snapshot_kimg": 0.08, "lr_schedule": schedule, "lr_decay_iters": 3}
        long = write_config(tmp / f"long-{schedule}.yaml", tune={"kimg": 0.24, **tune})
        short = write_config(tmp / f"short-{schedule}.yaml", tune={"kimg": 0.08, **tune})
        run_ect(*tune_args(tmp, data, teacher, long, f"long-{schedule}"))
        run_ect(*tune_args(tmp, data, teacher, short, f"short-{schedule}"))
        snapshot = read_checkpoint(tmp / f"long-{schedule}-snaps" / "kimg000000.080.pt")
        assert state_dicts_equal(snapshot["state_dict"], read_checkpoint(tmp / f"short-{schedule}.pt")["state_dict"])
