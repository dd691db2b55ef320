"""The generated corpus (tests/hostile_corpus.py), a case at a time through the real `ect` command: under
`ulimit -v` 4 GB and a time limit, each is refused with exit 2 and one line naming the reason, no traceback,
no output, in bounded time, and the process tree's peak memory bounded by the file's size."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT
from tests.hostile_corpus import CASES

LIMIT_KB, LIMIT_S = 4_000_000, 60
# Runs the command and prints the peak resident memory (kB) of its process tree: the largest of the `ect`
# process and the parsing child it waited for.
PEAK = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")


def run_limited(args, cwd):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_KB * 1024, LIMIT_KB * 1024))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "ect.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=LIMIT_S, preexec_fn=limit)
    lines = proc.stderr.strip().splitlines()
    return proc, lines[:-1], int(lines[-1]), time.perf_counter() - start


@pytest.fixture(scope="module")
def baseline_kb(tmp_path_factory):
    """The peak memory of a refusal that reads nothing: what the command costs before any file does."""
    proc, _, peak, _ = run_limited(["convert-edm", "/dev/null", "out.pt"], tmp_path_factory.mktemp("base"))
    assert proc.returncode == 2
    return peak


@pytest.mark.parametrize("name", CASES)
def test_every_hostile_case_is_refused_in_one_line_within_time_and_memory(name, tmp_path, baseline_kb):
    case = CASES[name]
    args, expected = case.make(tmp_path)
    proc, lines, peak_kb, seconds = run_limited(args, tmp_path)
    assert proc.returncode == 2, (case.klass, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expected in lines[0], lines[0]
    assert "\x1b" not in proc.stderr  # no terminal control character from a file or a name
    for output in case.outputs:
        assert not (tmp_path / output).exists(), output
    largest = max((p.stat().st_size for p in tmp_path.iterdir() if p.is_file() and not p.name.startswith("huge")),
                  default=0)
    # the parsing child may hold the file a few times over (ect/untrusted.py's limits), never more
    assert peak_kb <= max(baseline_kb, 1_200_000) + 5 * largest // 1024 + 300_000, (peak_kb, baseline_kb, largest)
    assert seconds < LIMIT_S
