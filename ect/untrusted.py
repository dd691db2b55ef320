"""Untrusted files are parsed in a child process with resource limits: defence in depth behind the strict
reader (``ect/safepickle.py``).

``parse(kind, path)`` checks that the source is a regular file under its size cap (a device, a FIFO or an
oversized file is refused at once), then runs ``python -m ect.untrusted KIND PATH`` with nothing inherited
but its pipes (no other file descriptor, stdin from /dev/null, an empty working directory). The child
limits itself before it reads a byte: its address space (what it has after importing its libraries, plus
a few times the file's size), its CPU time (a minute plus the file's size at 20 MB/s), the size of any
file it could write (0), the files it may open. It writes its result to stdout as a ``torch.save`` of
plain data and tensors, which the parent loads with ``weights_only=True``. A crash, a limit, a hang (the
parent's deadline) or any failure of the child becomes one refusal naming the file; nothing is written.
"""
from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ect.errors import BadInput, printable

# What may be parsed, by kind: the module and function that read a path into plain data and tensors.
READERS = {
    "edm-snapshot": ("ect.edm.convert", "parse_snapshot"),
    "cifar10-tarball": ("ect.data.cifar10", "parse_cifar10_tarball"),
    "edm2-reference": ("ect.fid", "parse_edm2_reference"),
}
MAX_SOURCE_BYTES = {"edm-snapshot": 8 << 30, "cifar10-tarball": 1 << 30, "edm2-reference": 1 << 30}
EXIT_REFUSED = 2


class Refused(BadInput):
    """An untrusted file that could not be parsed within its limits: the message names it and why."""


def check_source(path, limit: int) -> int:
    """The size of a source that is a regular file of at most ``limit`` bytes; anything else is refused."""
    import stat

    try:
        info = os.stat(path)
    except OSError as exc:
        raise Refused(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise Refused(f"{path}: refused: not a regular file (a device, a FIFO or a directory is never read)")
    if info.st_size > limit:
        raise Refused(f"{path}: refused: {info.st_size:,} bytes, more than the {limit:,} such a file may have")
    return info.st_size


def limits_for(size: int) -> tuple[int, int]:
    """(extra address space in bytes, CPU seconds) a child may use for a file of ``size`` bytes."""
    return 4 * size + (1 << 30), 60 + size // (20 << 20)


def parse(kind: str, path) -> object:
    """Parse an untrusted file of ``kind`` in a limited child process; its result (plain data and tensors)."""
    return parse_with(READERS[kind], path, MAX_SOURCE_BYTES[kind])


def parse_with(reader: tuple[str, str], path, max_bytes: int) -> object:
    """Run ``module.function(path)`` (``reader``) in a limited child process on a checked source."""
    import torch

    size = check_source(path, max_bytes)
    extra_bytes, cpu_seconds = limits_for(size)
    with tempfile.TemporaryDirectory(prefix="ect-untrusted-") as empty:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "ect.untrusted", *reader, str(Path(path).resolve()),
                                 str(extra_bytes), str(cpu_seconds)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=empty,
                                close_fds=True, env=env)
        deadline = 2 * cpu_seconds + 60
        try:
            out, err = proc.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise Refused(f"{path}: refused: parsing it did not finish within {deadline} s") from None
    if proc.returncode != 0:
        raise Refused(f"{path}: refused: {_why(proc.returncode, err, cpu_seconds)}")
    try:
        return torch.load(io.BytesIO(out), map_location="cpu", weights_only=True)
    except Exception as exc:  # our own child's output: a failure here is a truncated pipe, not the file
        raise Refused(f"{path}: refused: the parser's result could not be read ({type(exc).__name__})") from None


def _why(code: int, err: bytes, cpu_seconds: int) -> str:
    """One line on why the child failed: its own message, or the signal or limit that stopped it."""
    lines = [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    if code == EXIT_REFUSED and lines:
        return printable(lines[-1])
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        if -code == signal.SIGXCPU:
            return f"parsing it needed more than {cpu_seconds} s of CPU"
        return f"the parser was stopped by {name} (a crash or a limit)"
    return f"the parser failed (exit {code}){': ' + printable(lines[-1], 200) if lines else ''}"


# ---------------------------------------------------------------------------------------------
# The child.

def _limit_self(extra: int, cpu_seconds: int) -> None:
    """Limits set before the file is read: address space, CPU time, file writes, open files, core dumps."""
    with open("/proc/self/statm") as f:
        virtual = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    for limit, value in ((resource.RLIMIT_AS, virtual + extra), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64)):
        soft, hard = resource.getrlimit(limit)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, hard))


def child_main(argv) -> int:
    import importlib

    import torch  # imported before the limits: the libraries are not the file's doing

    module, function, path, extra, cpu_seconds = argv
    reader = getattr(importlib.import_module(module), function)
    try:
        _limit_self(int(extra), int(cpu_seconds))
        result = reader(path)
        buf = io.BytesIO()
        torch.save(result, buf)
    except BadInput as exc:
        print(printable(str(exc)), file=sys.stderr)
        return EXIT_REFUSED
    except MemoryError:
        print("parsing it needed more memory than the file's size allows", file=sys.stderr)
        return EXIT_REFUSED
    except RecursionError:
        print("it is nested too deeply", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:  # whatever breaks on a hostile file is a refusal, said in one line
        print(f"the parser failed on it: {type(exc).__name__}: {printable(str(exc), 200)}", file=sys.stderr)
        return EXIT_REFUSED
    with os.fdopen(sys.stdout.fileno(), "wb", closefd=False) as out:
        out.write(buf.getbuffer())
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
