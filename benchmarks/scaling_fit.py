"""Time of `ect scaling-fit` on large point tables: ours beside the first version, in one process, as a ratio.

    python benchmarks/scaling_fit.py [--rows 100000] [--baseline-rows 5000] [--baseline-commit 5b01932]

A synthetic study (4 sizes, a law with a floor, 5 sets a point, 2 % noise per set) is written as the
points CSV. Ours fits it twice, one size and the frontier across sizes (both forms, the bootstrap that
redraws sets and reselects the frontier per replicate). The baseline is ect/scaling.py as it was at
``--baseline-commit`` (read with `git show`, loaded from a temporary file, never committed twice): a
bootstrap looping over points in Python, one form only. Both fit the same ``--baseline-rows`` table
(the baseline is too slow for more), then ours alone the ``--rows`` table. Reports seconds and the ratio.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ect.scaling import fit_file  # noqa: E402


def write_study(path: Path, rows: int, seed: int = 0) -> None:
    rng, sets, sizes = np.random.default_rng(seed), 5, 4
    per_size = rows // (sets * sizes)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["compute", "fid", "size", "steps", "set", "kimg"])
        for k in range(sizes):
            for j, compute in enumerate(np.geomspace(1e12, 1e16, per_size) * (k + 1)):
                for s in range(sets):
                    fid = (2 + 6e3 * compute ** -0.3) * np.exp(rng.normal(0, 0.02))
                    writer.writerow([compute, fid, f"s{k}", 2, s, j + 1])


def baseline_module(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:ect/scaling.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / "scaling_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("scaling_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(function, *args, **kwargs) -> float:
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--baseline-rows", type=int, default=5_000)
    parser.add_argument("--baseline-commit", default="5b01932")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    small, large = work / "small.csv", work / "large.csv"
    write_study(small, args.baseline_rows)
    write_study(large, args.rows)
    old = baseline_module(args.baseline_commit)
    for label, kwargs in (("one size", {"steps": "2", "size": "s0"}), ("frontier", {"steps": "2", "use_frontier": True})):
        theirs = timed(old.fit_file, small, **kwargs)
        ours = timed(fit_file, small, **kwargs)
        print(f"{label}, {args.baseline_rows:,} rows: first version {theirs:.2f} s, ours {ours:.2f} s "
              f"(both forms): {theirs / ours:.1f}x faster")
    for label, kwargs in (("one size", {"steps": "2", "size": "s0"}), ("frontier", {"steps": "2", "use_frontier": True})):
        print(f"{label}, {args.rows:,} rows: ours {timed(fit_file, large, **kwargs):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
