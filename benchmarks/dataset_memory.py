"""Peak memory of a 2-process tune on a large dataset: the mapped dataset (ours) beside each process loading
its own copy (the code before, ``--baseline-commit``), in one command, as a ratio.

    python benchmarks/dataset_memory.py [--images 600000] [--baseline-commit 69293e3]

A synthetic dataset of ``--images`` 16x16 RGB images (uint8; 600,000 make 461 MB) is written the way
`ect prepare-data` writes one, a tiny teacher is pretrained for one iteration, and `ect tune` runs for 10
iterations at batch 8 (small, so that the dataset and not the activations dominates what a process holds)
under `torchrun --standalone --nproc_per_node=2`, once with this tree's code and once with the
baseline's (`git archive` of ``--baseline-commit`` first on PYTHONPATH). Every 50 ms the script reads
each training process's resident memory from /proc: anonymous (its own heap: a loaded dataset lives
there) and file-backed (mapped pages, shared by every process that maps the same file). Reports the
peaks per process, the node's total (both processes' anonymous memory plus the larger file-backed part,
counted once since the page cache holds one copy) and the ratios.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ect.data import save_dataset  # noqa: E402

TINY = {"model_channels": 16, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def memory_of(pid: int) -> tuple[int, int] | None:
    """(anonymous, file-backed) resident bytes of a process, or None once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return int(fields["RssAnon"].split()[0]) << 10, int(fields["RssFile"].split()[0]) << 10


def trainers(root_pid: int) -> list[int]:
    """The processes under ``root_pid`` that run `ect.cli tune` (torchrun's workers, not the agent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"ect.cli" in cmd and b"tune" in cmd and b"torch.distributed.run" not in cmd and int(entry.name) != root_pid:
                found.append(int(entry.name))
    return found


def run_tune(tmp: Path, name: str, pythonpath: str, data: Path, teacher: Path, config: Path) -> dict[int, tuple]:
    """Peak (anonymous, file-backed) bytes of each training process of one 2-process tune."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ect.cli",
           "tune", "--config", str(config), "--data", str(data), "--teacher", str(teacher), "--state-dir",
           str(tmp / f"{name}-state"), "--out", str(tmp / f"{name}.pt"), "--threads", "1", "--no-progress"]
    # cwd: not the repository, which `python -m` would put before PYTHONPATH (the baseline would run our code)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, tuple[int, int]] = {}

    def watch():
        while proc.poll() is None:
            for pid in trainers(proc.pid):
                now = memory_of(pid)
                if now:
                    old = peaks.get(pid, (0, 0))
                    peaks[pid] = (max(old[0], now[0]), max(old[1], now[1]))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    out, _ = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: tune failed:\n{out[-3000:]}")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600_000)
    parser.add_argument("--baseline-commit", default="69293e3", help="the last commit that loaded a copy per process")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ect-dataset-memory-"))
    baseline = tmp / "baseline"
    baseline.mkdir()
    archive = subprocess.run(["git", "archive", args.baseline_commit, "ect"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(baseline, filter="data")

    data = tmp / "dataset.npz"
    rng = np.random.default_rng(0)
    save_dataset(data, rng.integers(0, 256, (args.images, 16, 16, 3), dtype=np.uint8),
                 rng.integers(0, 10, args.images))
    base = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        **base, "pretrain": {**base["pretrain"], "kimg": 0.032, "arch": TINY},
        "tune": {**base["tune"], "batch": 8, "kimg": 0.08, "tick_kimg": 0.08, "state_kimg": 0.08,
                 "snapshot_kimg": 0.08}}))
    teacher = tmp / "teacher.pt"
    subprocess.run([sys.executable, "-m", "ect.cli", "pretrain", "--config", str(config), "--data", str(data),
                    "--state-dir", str(tmp / "pretrain-state"), "--out", str(teacher), "--threads", "1",
                    "--no-progress"], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})

    dataset_mb = data.stat().st_size / 2**20
    print(f"dataset: {args.images:,} images 16x16x3, {dataset_mb:.0f} MB; 2 processes, 10 iterations at batch 8")
    rows = {}
    for name, path in (("copy per process (baseline)", str(baseline)), ("mapped (ours)", str(ROOT))):
        peaks = run_tune(tmp, name.split()[0], path, data, teacher, config)
        if len(peaks) != 2:
            raise SystemExit(f"{name}: saw {len(peaks)} training processes, not 2 (too short a run to sample?)")
        anon = [a / 2**20 for a, _ in peaks.values()]
        files = [f / 2**20 for _, f in peaks.values()]
        node = sum(anon) + max(files)
        rows[name] = node
        print(f"{name:<28} anonymous per process {', '.join(f'{a:.0f}' for a in anon)} MB; file-backed "
              f"{', '.join(f'{f:.0f}' for f in files)} MB; node total {node:.0f} MB")
    (base_mb, ours_mb) = rows.values()
    print(f"node total: ours / baseline = {ours_mb / base_mb:.2f}; saved {base_mb - ours_mb:.0f} MB "
          f"({(base_mb - ours_mb) / dataset_mb:.2f} dataset copies)")


if __name__ == "__main__":
    main()
