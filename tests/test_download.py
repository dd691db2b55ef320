import hashlib
import os
import subprocess
import sys

import pytest

from ect.download import DownloadError, download
from ect.fileio import ChecksumError
from tests.helpers import LoopbackServer

DATA = os.urandom(300_000)
MD5, SHA = hashlib.md5(DATA).hexdigest(), hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server():
    with LoopbackServer({"file.bin": DATA}, stall_seconds=3) as s:
        yield s


def leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_download_verifies_and_writes_atomically(server, tmp_path):
    digests = download(f"{server.url}/file.bin", tmp_path / "f.bin", md5=MD5, sha256=SHA, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == DATA and digests == {"md5": MD5, "sha256": SHA}
    assert leftovers(tmp_path) == ["f.bin"]


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    download(f"{server.url}/flaky/file.bin", tmp_path / "f.bin", md5=MD5, backoff=0, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert server.requests[0][1] is None and server.requests[1][1] == f"bytes={len(DATA) // 2}-"


def test_interrupted_download_resumes_from_the_part_file(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(DATA[:1000])
    download(f"{server.url}/file.bin", tmp_path / "f.bin", sha256=SHA, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == DATA and server.requests == [("/file.bin", "bytes=1000-")]


@pytest.mark.parametrize("path, kwargs, error, message", [
    ("file.bin", {"sha256": "0" * 64}, ChecksumError, "sha256 mismatch"),
    ("file.bin", {"md5": "0" * 32}, ChecksumError, "md5 mismatch"),
    ("missing.bin", {"md5": MD5}, DownloadError, "HTTP 404"),
    ("truncate/file.bin", {"md5": MD5}, DownloadError, "failed after 3 attempts"),
    ("stall/file.bin", {"md5": MD5, "timeout": 0.5}, DownloadError, "failed after 3 attempts"),
])
def test_failures_are_clear_and_leave_nothing_behind(server, tmp_path, path, kwargs, error, message):
    with pytest.raises(error, match=message):
        download(f"{server.url}/{path}", tmp_path / "f.bin", retries=2, backoff=0, progress=False, **kwargs)
    assert leftovers(tmp_path) == []


def test_refuses_to_download_without_a_checksum(tmp_path):
    with pytest.raises(ValueError, match="without a checksum"):
        download("http://127.0.0.1:9/x", tmp_path / "x")


def test_fetch_command_verifies_and_prints_the_sha256_to_pin(server, tmp_path):
    fetch = [sys.executable, "-m", "ect.cli", "fetch", f"{server.url}/file.bin", "--no-progress"]
    proc = subprocess.run([*fetch, "--md5", MD5, "--out", str(tmp_path / "out" / "a.tgz")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "a.tgz").read_bytes() == DATA
    assert f"no sha256 was given to verify {server.url}/file.bin; this file's is {SHA}" in proc.stderr
    proc = subprocess.run([*fetch, "--md5", MD5, "--sha256", "f" * 64, "--out", str(tmp_path / "out" / "b.tgz")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "sha256 mismatch" in proc.stderr and not (tmp_path / "out" / "b.tgz").exists()
    proc = subprocess.run([*fetch, "--out", str(tmp_path / "out" / "c.tgz")], capture_output=True, text=True)
    assert proc.returncode == 2 and "without a checksum" in proc.stderr and "--unverified" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.tgz"]
    proc = subprocess.run([*fetch, "--unverified", "--out", str(tmp_path / "out" / "c.tgz")], capture_output=True, text=True)
    assert proc.returncode == 0 and (tmp_path / "out" / "c.tgz").read_bytes() == DATA
    assert f"this file's is {SHA}" in proc.stderr
