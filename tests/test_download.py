import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from ect.download import DownloadError, download
from ect.fileio import ChecksumError
from helpers import toy_config
from loopback import LoopbackServer

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


def test_fetch_command_reads_url_and_checksums_from_the_config(server, tmp_path):
    cfg = toy_config()
    cfg["dataset"] = {"source": "cifar10", "resolution": 32, "url": f"{server.url}/file.bin", "md5": MD5, "sha256": None}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "ect.cli", "fetch", "--config", str(tmp_path / "c.yaml"), "--item",
                           "dataset", "--out", str(tmp_path / "out" / "a.tgz"), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "a.tgz").read_bytes() == DATA
    assert f"dataset.sha256 is not pinned in the config; this file's is {SHA}" in proc.stderr
    cfg["dataset"]["md5"] = "f" * 32
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "ect.cli", "fetch", "--config", str(tmp_path / "c.yaml"), "--item",
                           "dataset", "--out", str(tmp_path / "out" / "b.tgz"), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "md5 mismatch" in proc.stderr and not (tmp_path / "out" / "b.tgz").exists()
