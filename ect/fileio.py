"""Atomic file writes and hashing: a killed job leaves the old file or the new one, never half.

Outputs get the permissions the umask allows (a temporary file would be 0600: collaborators on a
shared cluster filesystem could not read the results), and temporaries that a killed process left
behind are removed by the next write of the same file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ect.errors import BadInput


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


class OutputError(OSError):
    """An output could not be written (full disk, a path under a regular file, no permission...)."""


def _output_error(path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(exc.errno, f"cannot write {path}: {reason}")


def make_parent(path: Path) -> None:
    """Create ``path``'s directory, with an error that names the path when a parent is a regular file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), path.parent)
        raise OutputError(20, f"cannot write {path}: {blocker} is a file, not a directory") from None
    except OSError as exc:
        raise _output_error(path, exc) from exc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove ``.<name>.tmp-<pid>-…`` beside ``path`` whose process is gone (killed mid-write)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name[len(path.name) + 6:].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    make_parent(path)
    if path.exists() and not path.is_file():  # a rename would replace a device (/dev/null) or a directory
        raise OutputError(17, f"cannot write {path}: it exists and is not a regular file")
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
        os.fchmod(fd, 0o666 & ~UMASK)
        os.close(fd)
    except OSError as exc:
        raise _output_error(path, exc) from exc
    try:
        try:
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            if isinstance(exc, OutputError):
                raise
            raise _output_error(path, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, obj) -> None:
    """JSON with a newline; a NaN or infinity anywhere is an error (it would be invalid JSON), not an output."""
    try:
        text = json.dumps(obj, indent=1, allow_nan=False)
    except ValueError:
        raise BadInput(f"refusing to write {path}: it would hold a non-finite number (NaN or infinity)") from None
    write_text_atomic(path, text + "\n")


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


class ChecksumError(BadInput):
    pass


HEX_DIGITS = {"md5": 32, "sha256": 64}


def check_checksum_format(kind: str, value: str) -> str:
    """A checksum as lowercase hex digits of its length (upper case accepted and lowered); else an error."""
    digits = HEX_DIGITS[kind]
    if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{digits}}}", value.lower()):
        raise ChecksumError(f"a {kind} must be {digits} hexadecimal digits, not {str(value)[:80]!r}")
    return value.lower()


def verify_sha256(path, expected: str) -> str:
    """Raise :class:`ChecksumError` unless the file's sha256 equals ``expected``; return it."""
    expected = check_checksum_format("sha256", expected)
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")
    return actual


def verify_zip(path, error=BadInput) -> None:
    """A zip we wrote (``torch.save``, TorchScript) with every member's CRC checked: a flipped bit or a torn
    write is refused, naming the file, before anything reads it (``torch.load`` does not check them)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise error(f"cannot read checkpoint {path}: not a zip of torch.save ({str(exc)[:120]}); rerun the step that "
                    "made it") from None
    if damaged is not None:
        raise error(f"{path}: damaged: its member {damaged[:120]!r} fails its CRC check (a flipped bit or a torn "
                       "write); rerun the step that made it")


MAX_NPZ_RATIO = 100  # deflate reaches ~1000x only on degenerate data; images and statistics stay far below
NPZ_SMALL = 64 << 20  # members this small are not held to the ratio (a test's tiny all-zero arrays)


def _check_npz_members(path, max_bytes: int | None) -> None:
    """Every array of an .npz must declare no more bytes than its member holds, and the member may not inflate
    far beyond what it takes on disk: numpy allocates what a header declares before reading, and inflates a
    member whole."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if max_bytes is not None and info.file_size > max_bytes:
                raise ValueError(f"member {info.filename[:80]!r} holds {info.file_size:,} bytes, more than "
                                 f"{max_bytes:,}")
            if info.file_size > NPZ_SMALL and info.file_size > MAX_NPZ_RATIO * max(info.compress_size, 1):
                raise ValueError(f"member {info.filename[:80]!r} inflates {info.file_size // max(info.compress_size, 1)}"
                                 f"-fold (a decompression bomb?)")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(member, max_header_size=1 << 16)
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared > info.file_size:
                raise ValueError(f"member {info.filename[:80]!r} declares {declared:,} bytes but holds "
                                 f"{info.file_size:,}")


def map_npz_member(path, name: str):
    """A read-only memory map of one array of an uncompressed .npz (``np.savez``), or None when that member is
    compressed. Every process that maps the same file shares the page cache's one copy, where ``np.load`` gives
    each its own. Raises ValueError for a member that is missing, not a plain C-order array, or larger than
    what the file holds."""
    import struct
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")  # KeyError: missing
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local header: its own name and extra-field lengths place the data
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"member {name!r}: no local header at offset {info.header_offset}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f, max_header_size=1 << 16)
        offset = f.tell()
        file_size = os.fstat(f.fileno()).st_size
    if fortran_order or dtype.hasobject:
        raise ValueError(f"member {name!r} is not a plain C-order array")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if offset - start + declared > info.file_size or start + info.file_size > file_size:
        raise ValueError(f"member {name!r} declares {declared:,} bytes but holds {info.file_size - (offset - start):,}")
    if declared == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)  # copy-on-write: never written


@contextlib.contextmanager
def open_npz(path, what: str, error=BadInput, max_bytes: int | None = None):
    """``np.load`` of an untrusted .npz (no pickles), its members checked first (:func:`_check_npz_members`);
    any way it fails to read is one ``error`` naming the file."""
    import zipfile

    import numpy as np

    try:
        _check_npz_members(path, max_bytes)
        with np.load(path, allow_pickle=False) as f:
            yield f
    except (OSError, KeyError, ValueError, TypeError, EOFError, SyntaxError, zipfile.BadZipFile,
            zipfile.LargeZipFile, NotImplementedError) as exc:
        raise error(f"cannot read {what} {path}: {(str(exc).splitlines() or [''])[0][:200]}") from None


def read_jsonl(path, what: str = "log") -> tuple[list[dict], int]:
    """The JSON objects of a JSON-lines file up to its first line that is not one (a torn last line of a killed
    writer, or garbage), and how many lines were left out after it."""
    records, lines = [], Path(path).read_text(errors="replace").splitlines() if Path(path).exists() else []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            return records, len(lines) - i
        if type(record) is not dict:
            return records, len(lines) - i
        records.append(record)
    return records, 0


def _fingerprint(path: Path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


class StepOutputs:
    """The outputs of one step, all or none: an output that is one of its inputs (or another of its outputs) is
    refused before anything is written, and a step that fails removes every output it wrote or replaced (a
    directory only if it made it)."""

    def __init__(self, inputs, outputs, updates=()):
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.outputs = [Path(p) for p in outputs if p is not None]
        written = [*self.outputs, *(Path(p) for p in updates if p is not None)]  # updates: rewritten in place, last
        for i, out in enumerate(written):
            for other in [*self.inputs, *written[:i]]:
                if out == other or (out.exists() and other.exists() and os.path.samefile(out, other)):
                    raise BadInput(f"{out} is also {'an input' if other in self.inputs else 'another output'} of "
                                   f"this step ({other}): refusing to write over it")
        self.before = {out: _fingerprint(out) for out in self.outputs}

    def remove_started(self) -> None:
        for out, before in self.before.items():
            if _fingerprint(out) in (None, before):
                continue
            if out.is_dir() and not out.is_symlink():
                if before is None:
                    shutil.rmtree(out, ignore_errors=True)
            else:
                out.unlink(missing_ok=True)


def is_number(value) -> bool:
    import math

    return type(value) in (int, float) and math.isfinite(value)


def is_numbers(value) -> bool:
    return type(value) is list and len(value) > 0 and all(is_number(v) for v in value)


def read_json(path, what: str, checks: dict | None = None, max_bytes: int = 64 << 20):
    """A JSON file an earlier step wrote, checked: at most ``max_bytes``, no NaN, an object whose ``checks``
    (key -> predicate) hold. Any problem is one error naming the file and the key."""
    def no_constants(name):
        raise ValueError(f"{name} is not a number JSON allows")

    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise ValueError(f"larger than {max_bytes:,} bytes")
        value = json.loads(path.read_text(), parse_constant=no_constants)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadInput(f"cannot read {what} {path}: {str(exc)[:200]}") from None
    return value if checks is None else check_fields(value, checks, what, path)


def check_fields(value, checks: dict, what: str, path):
    """``value`` if it is a JSON object whose ``checks`` (key -> predicate) hold, else one error naming the key."""
    if type(value) is not dict:
        raise BadInput(f"{what} {path} is not a JSON object")
    for key, check in checks.items():
        if key not in value or not check(value[key]):
            raise BadInput(f"{what} {path}: '{key}' is missing or malformed; rerun the step that wrote it")
    return value
