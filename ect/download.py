"""Downloads that either produce a verified file or nothing.

``download(url, dst, md5=..., sha256=...)`` streams into ``dst.part`` and resumes it with an HTTP
Range request after a dropped connection or a stall (a read that waits longer than ``timeout``),
up to ``retries`` times, within an overall ``deadline``. A part is resumed only when the server honours
the range (206 with a Content-Range starting where the part ends); otherwise it starts again from zero.
A ``.part`` that is a symlink, or a destination that is not a regular file, is refused. Only a complete file whose checksums match is renamed to ``dst``. On any
reported failure (HTTP error, checksum mismatch, too large, still truncated after the retries) the
partial file is deleted; a process killed midway leaves only ``dst.part``, which the next call
resumes and verifies like any other. A full disk is reported at once, naming the file, not retried.

Only http(s) URLs are fetched (redirects included), checksums must be well-formed before anything is
requested, and no file may exceed its known size or ``max_bytes``.

A file whose publisher gives no checksum is fetched **trust on first use** with a record file
(:class:`ChecksumRecord`, ``downloads.lock`` in the repository): the first fetch records its sha256
and size with the date, the user commits the record, and every later fetch is verified against it.
Only bytes fetched from the server in that call are recorded (a ``.part`` left by an earlier call is
discarded first), and the record is read like any untrusted YAML: no aliases, no repeated keys, every
field checked.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml
from tqdm import tqdm

from ect.errors import BadInput
from ect.fileio import ChecksumError, OutputError, check_checksum_format, fsync_dir, make_parent, write_text_atomic

CHUNK = 1 << 20
USER_AGENT = "ect-pipeline (+https://github.com/locuslab/ect reimplementation)"
MAX_BYTES = 8 << 30  # no download of this project is larger (the biggest EDM2 teacher is about 2.3 GB)
DEADLINE_S = 6 * 3600.0  # a fetch that has not finished by then is abandoned (8 GB at 400 kB/s)
RECORD_FILE = "downloads.lock"  # the record of first-use checksums, at the repository root


class DownloadError(BadInput):
    pass


def check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DownloadError(f"only http(s) URLs are downloaded, not {str(url)[:200]!r}")
    return url


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl)  # a server may not send us to file:// or ftp://
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def _digests(path: Path) -> dict[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            md5.update(chunk)
            sha.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}


class DeadlinePassed(DownloadError):
    pass


class _DiskFull(Exception):
    """Writing the part file failed for a reason retrying cannot fix (carries the OSError)."""


def _resumes_at(response, have: int) -> bool:
    """Whether a response to ``Range: bytes=have-`` continues the part: 206 with a Content-Range that starts
    exactly there. Anything else (200, or another range) means starting again from zero."""
    if response.status != 206:
        return False
    unit, _, span = (response.headers.get("Content-Range") or "").partition(" ")
    start = span.split("-", 1)[0]
    return unit == "bytes" and start.isdigit() and int(start) == have


def _fetch_into(url: str, part: Path, timeout: float, progress: bool, max_bytes: int, deadline: float) -> None:
    """Append the rest of ``url`` to ``part`` (Range from its size); raise on a short or failed read."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT,
                                                   **({"Range": f"bytes={have}-"} if have else {})})
    with _OPENER.open(request, timeout=timeout) as response:
        if have and not _resumes_at(response, have):
            if response.status == 206:  # a range that does not continue the part: ask again for the whole
                part.unlink()
                raise DownloadError(f"the server answered the range from {have} with another range")
            have = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else None
        if total is not None and total > max_bytes:
            raise ChecksumError(f"{url} is {total} bytes, more than the {max_bytes} bytes allowed; refusing it")
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                             desc=part.name[:-5], disable=not progress,
                                                             file=sys.stderr) as bar:
            size = have
            while chunk := response.read(CHUNK):
                if time.monotonic() > deadline:
                    raise DeadlinePassed(f"{url} did not finish downloading within the deadline; the partial file "
                                         "is kept to be resumed")
                size += len(chunk)
                if size > max_bytes:
                    raise ChecksumError(f"{url} sent more than the {max_bytes} bytes allowed; refusing it")
                try:
                    f.write(chunk)
                except OSError as exc:
                    raise _DiskFull(exc) from exc
                bar.update(len(chunk))
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                raise _DiskFull(exc) from exc
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"connection closed after {part.stat().st_size} of {total} bytes")


def download(url: str, dst, md5: str | None = None, sha256: str | None = None, timeout: float = 60.0,
             retries: int = 3, backoff: float = 2.0, progress: bool = True, allow_unverified: bool = False,
             size: int | None = None, max_bytes: int = MAX_BYTES, deadline_s: float = DEADLINE_S) -> dict[str, str]:
    """Download ``url`` to ``dst`` (atomically, after checking md5/sha256/size); return the file's digests.

    Without a checksum the download is refused unless ``allow_unverified`` (trust on first use); then no
    leftover part is resumed, so every byte recorded came from the server in this call."""
    check_url(url)
    md5 = check_checksum_format("md5", md5) if md5 is not None else None
    sha256 = check_checksum_format("sha256", sha256) if sha256 is not None else None
    if not (md5 or sha256 or allow_unverified):
        raise DownloadError(f"refusing to download {url} without a checksum to verify it against. Pin its sha256 in "
                         "the config, or trust this one download by hand ('ect fetch URL --out FILE --unverified'), "
                         "check the sha256 it prints against a source you trust, and pin that")
    if size is not None:
        max_bytes = min(max_bytes, size)
    dst = Path(dst)
    make_parent(dst)
    part = dst.with_name(dst.name + ".part")
    _check_targets(dst, part)
    if allow_unverified:
        part.unlink(missing_ok=True)
    deadline = time.monotonic() + deadline_s
    try:
        for attempt in range(retries + 1):
            try:
                _fetch_into(url, part, timeout, progress, max_bytes, deadline)
                break
            except DeadlinePassed:
                raise
            except _DiskFull as exc:
                cause = exc.args[0]
                raise OutputError(cause.errno or errno.EIO, f"cannot write {part}: {cause.strerror or cause}; "
                                  "the partial file was deleted") from cause
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and part.exists():  # Range past the end: the part is complete or wrong
                    break
                raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
            except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt == retries:
                    raise DownloadError(f"download of {url} failed after {retries + 1} attempts: {reason}") from exc
                if time.monotonic() + backoff * 2 ** attempt > deadline:
                    raise DeadlinePassed(f"download of {url} did not finish within {deadline_s:g} s") from exc
                print(f"download of {url} interrupted ({reason}); resuming in {backoff * 2 ** attempt:.0f} s",
                      file=sys.stderr)
                time.sleep(backoff * 2 ** attempt)
        digests = _verify(part, url, size, {"md5": md5, "sha256": sha256})
        os.replace(part, dst)
        fsync_dir(dst.parent)
        return digests
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, DeadlinePassed)):  # an interrupted download is kept to resume
            part.unlink(missing_ok=True)
        raise


def _verify(part: Path, url: str, size: int | None, expected: dict) -> dict[str, str]:
    """The complete part's digests, after checking its size and every checksum given."""
    digests, actual_size = _digests(part), part.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"size mismatch for {url}: expected {size} bytes, got {actual_size}; the file was deleted")
    for name, value in expected.items():
        if value and digests[name] != value:
            raise ChecksumError(f"{name} mismatch for {url}: expected {value}, got {digests[name]} "
                                f"({actual_size} bytes); the file was deleted")
    return digests


def _check_targets(dst: Path, part: Path) -> None:
    """Refuse a part file that is a symlink (writing through it would write elsewhere) and a destination that
    exists but is not a regular file (a device, a FIFO, a directory, a symlink)."""
    if part.is_symlink() or (part.exists() and not part.is_file()):
        raise DownloadError(f"{part} is a symlink or not a regular file: refusing to write through it")
    if dst.is_symlink() or (dst.exists() and not dst.is_file()):
        raise DownloadError(f"{dst} exists and is not a regular file: refusing to replace it")


class ChecksumRecord:
    """The record of first-use checksums (YAML: url -> sha256, size, recorded date), kept in git."""

    HEADER = ("# sha256 of downloads whose publisher gives no checksum, recorded by `ect fetch` the first time\n"
              "# each was fetched (trust on first use). Every later fetch is verified against it. Commit this\n"
              "# file; check a new entry against a source you trust.\n")

    def __init__(self, path=RECORD_FILE):
        self.path = Path(path)

    MAX_BYTES = 1 << 20

    def entries(self) -> dict:
        """url -> entry, read like any untrusted YAML (no aliases, no repeated keys), every field checked."""
        from ect.config import load_yaml_text

        if not self.path.exists():
            return {}
        try:
            text = None
            if self.path.is_file():
                with open(self.path, "rb") as f:
                    text = f.read(self.MAX_BYTES + 1)
            if text is None or len(text) > self.MAX_BYTES:
                raise DownloadError(f"the checksum record {self.path} is not a regular file under {self.MAX_BYTES} "
                                    "bytes")
            data = load_yaml_text(text.decode(), f"the checksum record {self.path}") or {}
        except BadInput as exc:  # its message names the file
            raise DownloadError(str(exc)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DownloadError(f"cannot read the checksum record {self.path}: {exc}") from None
        if type(data) is not dict:
            raise DownloadError(f"the checksum record {self.path} is not a mapping of URLs")
        for url, entry in data.items():
            self._check(url, entry)
        return data

    def _check(self, url, entry) -> None:
        ok = (type(url) is str and url.startswith(("http://", "https://")) and type(entry) is dict
              and set(entry) <= {"sha256", "size", "recorded"} and type(entry.get("sha256")) is str
              and len(entry["sha256"]) == 64 and all(c in "0123456789abcdef" for c in entry["sha256"])
              and type(entry.get("size", 0)) is int and entry.get("size", 0) >= 0
              and type(entry.get("recorded", "")) is str)
        if not ok:
            raise DownloadError(f"the checksum record {self.path} has a malformed entry for {str(url)[:200]!r}: "
                                "each is a URL with a sha256 (64 hex digits), a size and a recorded date")

    def get(self, url: str) -> dict | None:
        return self.entries().get(url)

    def add(self, url: str, sha256: str, size: int) -> dict:
        """Record a first fetch (under a lock: downloads may run in parallel)."""
        make_parent(self.path)
        with open(self.path.with_name(self.path.name + ".flock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.entries()
            entry = {"sha256": sha256, "size": size, "recorded": datetime.date.today().isoformat()}
            entries[url] = entry
            write_text_atomic(self.path, self.HEADER + yaml.safe_dump(entries, sort_keys=True))
        return entry


def fetch(url: str, out, md5=None, sha256=None, record=None, size=None, before_recording=None, **kwargs) -> dict:
    """What `ect fetch` does: verify against the given checksums; else against the URL's entry in the
    ``record`` file, recording it on first use; returns the digests and how they were verified.
    ``before_recording(result)`` runs once the file is verified and before the record is written (the
    record, rewritten in place, is the last thing a fetch changes)."""
    before_recording = before_recording or (lambda result: None)
    size_of = Path(out).stat
    if md5 or sha256 or record is None:
        digests = download(url, out, md5=md5, sha256=sha256, size=size, **kwargs)
        result = {**digests, "size": size_of().st_size, "verified": "pinned" if md5 or sha256 else "unverified"}
    elif (entry := ChecksumRecord(record).get(url)) is not None:
        digests = download(url, out, sha256=entry["sha256"], size=entry.get("size", size), **kwargs)
        result = {**digests, "size": size_of().st_size,
                  "verified": f"recorded on first use ({entry.get('recorded', 'date unknown')})"}
    else:
        kwargs["allow_unverified"] = True
        digests = download(url, out, size=size, **kwargs)
        today = datetime.date.today().isoformat()
        result = {**digests, "size": size_of().st_size,
                  "verified": f"recorded on first use ({today}) in {record}: commit it"}
        before_recording(result)
        ChecksumRecord(record).add(url, digests["sha256"], result["size"])
        return result
    before_recording(result)
    return result
