"""ect/launch.py, the per-node launcher of a multi-node tune job: the torchrun line it builds from what srun
sets, and one-line refusals when it is not under srun or SLURM names no usable host."""
import subprocess
import sys

from ect.launch import FORWARDED_SIGNALS, torchrun_command


def test_the_torchrun_line_meets_on_the_first_node_with_a_port_from_the_job():
    env = {"SLURM_STEP_NUM_NODES": "8", "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[01-08]"}
    cmd = torchrun_command(env, 4, ["tune", "--config", "c.yaml"], head="gpu01")
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nnodes=8", "--nproc-per-node=4", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=gpu01:30956", "--rdzv-id=ect-123456", f"--signals-to-handle={FORWARDED_SIGNALS}",
                       "--max-restarts=0", "-m", "ect.cli", "tune", "--config", "c.yaml"]
    assert "SIGUSR1" in FORWARDED_SIGNALS  # SLURM's warning before the time limit reaches the trainers


def launch(tmp_path, env, hosts="node1"):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\nprintf '%s\\n' '{hosts}'\n")
    (bin_dir / "scontrol").chmod(0o755)
    return subprocess.run([sys.executable, "-m", "ect.launch", "--nproc-per-node", "1", "--", "tune"],
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env}, capture_output=True, text=True, cwd=tmp_path,
                          timeout=60)


def test_outside_srun_or_without_a_usable_host_it_refuses_in_one_line(tmp_path):
    proc = launch(tmp_path, {})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "run under srun" in proc.stderr
    step = {"SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "x"}
    proc = launch(tmp_path, step, hosts="$(touch pwned)")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no host name" in proc.stderr, proc.stderr
    assert not (tmp_path / "pwned").exists()
