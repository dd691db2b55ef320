import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from ect.download import DownloadError, download, fetch
from ect.fileio import ChecksumError, OutputError
from tests.helpers import LoopbackServer, small_filesystem

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


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "javascript:alert(1)", "//x/y", "http://"])
def test_only_http_urls_are_fetched(url, tmp_path):
    with pytest.raises(ValueError, match="only http"):
        download(url, tmp_path / "x", sha256="0" * 64)
    assert leftovers(tmp_path) == []


def test_checksums_are_checked_for_format_before_any_request(server, tmp_path):
    for kwargs in ({"md5": "xyz"}, {"sha256": "0" * 63}, {"sha256": "g" * 64}, {"md5": MD5, "sha256": ""}):
        with pytest.raises(ChecksumError, match="hexadecimal digits"):
            download(f"{server.url}/file.bin", tmp_path / "f.bin", progress=False, **kwargs)
    assert server.requests == [] and leftovers(tmp_path) == []


def test_a_redirect_to_another_scheme_is_refused(server, tmp_path):
    with pytest.raises(ValueError, match="only http"):
        download(f"{server.url}/redirect/file.bin", tmp_path / "f.bin", sha256=SHA, retries=0, progress=False)
    assert leftovers(tmp_path) == []


def test_a_file_over_its_known_size_or_the_cap_is_refused_without_retrying(server, tmp_path):
    with pytest.raises(ChecksumError, match="more than the 1000 bytes allowed"):
        download(f"{server.url}/file.bin", tmp_path / "f.bin", sha256=SHA, size=1000, progress=False)
    with pytest.raises(ChecksumError, match="more than the 5000 bytes allowed"):
        download(f"{server.url}/file.bin", tmp_path / "f.bin", sha256=SHA, max_bytes=5000, progress=False)
    assert len(server.requests) == 2 and leftovers(tmp_path) == []
    download(f"{server.url}/file.bin", tmp_path / "f.bin", sha256=SHA, size=len(DATA), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_a_full_disk_is_named_and_not_retried(server, tmp_path):
    with small_filesystem(tmp_path / "small", 128) as small:
        with pytest.raises(OutputError, match=r"cannot write .*f\.bin\.part: No space left on device"):
            download(f"{server.url}/file.bin", small / "f.bin", sha256=SHA, backoff=0, progress=False)
        assert len(server.requests) == 1 and list(small.iterdir()) == []


def test_trust_on_first_use_records_the_sha256_then_verifies_every_later_fetch(server, tmp_path):
    record = tmp_path / "downloads.lock"
    url = f"{server.url}/file.bin"
    first = fetch(url, tmp_path / "a.bin", record=record, progress=False)
    assert first["sha256"] == SHA and first["verified"].startswith("recorded on first use")
    entry = yaml.safe_load(record.read_text())[url]
    assert entry["sha256"] == SHA and entry["size"] == len(DATA) and entry["recorded"]
    assert record.read_text().startswith("# sha256 of downloads")
    again = fetch(url, tmp_path / "b.bin", record=record, progress=False)
    assert again["verified"] == f"recorded on first use ({entry['recorded']})" and (tmp_path / "b.bin").exists()
    server.files["file.bin"] = DATA[:-1] + b"!"  # the server now sends other bytes under the same URL
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        fetch(url, tmp_path / "c.bin", record=record, progress=False)
    assert not (tmp_path / "c.bin").exists() and yaml.safe_load(record.read_text())[url] == entry


def test_fetch_command_records_on_first_use(server, tmp_path):
    cmd = [sys.executable, "-m", "ect.cli", "fetch", f"{server.url}/file.bin", "--record", str(tmp_path / "r.lock"),
           "--no-progress"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "a.bin")], capture_output=True, text=True)
    assert proc.returncode == 0 and "recorded on first use" in proc.stderr and "commit it" in proc.stderr
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "x" / "b.bin"), "--md5", "nothex"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "hexadecimal" in proc.stderr


@pytest.mark.parametrize("fault", ["norange", "badrange"])
def test_a_part_is_resumed_only_when_the_server_honours_the_range(server, tmp_path, fault):
    """A server that ignores the range (200) or answers another one (a 206 from byte 0) must not have its bytes
    appended to the part: the download starts again from zero and is still exactly the file."""
    (tmp_path / "f.bin.part").write_bytes(DATA[:1000])
    download(f"{server.url}/{fault}/file.bin", tmp_path / "f.bin", sha256=SHA, backoff=0, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == DATA and leftovers(tmp_path) == ["f.bin"]


def test_trust_on_first_use_records_only_bytes_fetched_in_this_call(server, tmp_path):
    """A part left by an earlier call (here: tampered bytes) is discarded, not resumed and then recorded."""
    (tmp_path / "f.bin.part").write_bytes(b"\x00" * 1000)
    result = fetch(f"{server.url}/file.bin", tmp_path / "f.bin", record=tmp_path / "lock.yaml", progress=False)
    assert result["sha256"] == SHA and (tmp_path / "f.bin").read_bytes() == DATA
    assert server.requests == [("/file.bin", None)]  # no range: the part was not resumed


def test_symlinked_parts_and_outputs_that_are_not_files_are_refused(server, tmp_path):
    (tmp_path / "elsewhere").write_bytes(b"keep")
    (tmp_path / "f.bin.part").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DownloadError, match="symlink"):
        download(f"{server.url}/file.bin", tmp_path / "f.bin", sha256=SHA, progress=False)
    assert (tmp_path / "elsewhere").read_bytes() == b"keep"
    (tmp_path / "dir.bin").mkdir()
    with pytest.raises(DownloadError, match="not a regular file"):
        download(f"{server.url}/file.bin", tmp_path / "dir.bin", sha256=SHA, progress=False)
    assert server.requests == []


def test_every_fetch_has_an_overall_deadline(server, tmp_path):
    with pytest.raises(DownloadError, match="did not finish"):
        download(f"{server.url}/stall/file.bin", tmp_path / "f.bin", sha256=SHA, timeout=0.5, backoff=0.3,
                 deadline_s=1.0, progress=False)


@pytest.mark.parametrize("text, why", [
    ("a: &x {sha256: x}\nb: *x\n", "aliases"),
    ("http://h/f: {sha256: " + "0" * 64 + "}\nhttp://h/f: {sha256: " + "1" * 64 + "}\n", "appears twice"),
    ("http://h/f: {sha256: 12}\n", "malformed entry"),
    ("http://h/f: {sha256: " + "a" * 64 + ", size: -1}\n", "malformed entry"),
    ("file:///etc/passwd: {sha256: " + "a" * 64 + "}\n", "malformed entry"),
    ("http://h/f: {sha256: " + "0" * 64 + "}\n", "an integer of 64 digits"),
    ("http://h/f: {recorded: 2024-02-30}\n", "malformed entry"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
    ("[1, 2]\n", "not a mapping"),
])
def test_the_checksum_record_is_read_like_any_untrusted_yaml(server, tmp_path, text, why):
    (tmp_path / "lock.yaml").write_text(text)
    with pytest.raises(DownloadError, match=why):
        fetch(f"{server.url}/file.bin", tmp_path / "f.bin", record=tmp_path / "lock.yaml", progress=False)
    assert not (tmp_path / "f.bin").exists()
