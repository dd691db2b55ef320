"""Downloads that either produce a verified file or nothing.

``download(url, dst, md5=..., sha256=...)`` streams into ``dst.part`` and resumes it with an HTTP
Range request after a dropped connection or a stall (a read that waits longer than ``timeout``),
up to ``retries`` times. Only a complete file whose checksums match is renamed to ``dst``. On any
reported failure (HTTP error, checksum mismatch, still truncated after the retries) the partial
file is deleted; a process killed midway leaves only ``dst.part``, which the next call resumes
and verifies like any other.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ect.fileio import ChecksumError, _fsync_dir

CHUNK = 1 << 20
USER_AGENT = "ect-pipeline (+https://github.com/locuslab/ect reimplementation)"


class DownloadError(RuntimeError):
    pass


def _digests(path: Path) -> dict[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            md5.update(chunk)
            sha.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def _fetch_into(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (Range from its size); raise on a short or failed read."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT,
                                                   **({"Range": f"bytes={have}-"} if have else {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status != 206:  # the server ignored the Range header: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                             desc=part.name[:-5], disable=not progress,
                                                             file=sys.stderr) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"connection closed after {part.stat().st_size} of {total} bytes")


def download(url: str, dst, md5: str | None = None, sha256: str | None = None, timeout: float = 60.0,
             retries: int = 3, backoff: float = 2.0, progress: bool = True,
             allow_unverified: bool = False) -> dict[str, str]:
    """Download ``url`` to ``dst`` (atomically, after checking md5/sha256); return the file's digests.

    Without a checksum the download is refused unless ``allow_unverified`` (trust on first use, by hand)."""
    if not (md5 or sha256 or allow_unverified):
        raise ValueError(f"refusing to download {url} without a checksum to verify it against. Pin its sha256 in "
                         "the config, or trust this one download by hand ('ect fetch URL --out FILE --unverified'), "
                         "check the sha256 it prints against a source you trust, and pin that")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    try:
        for attempt in range(retries + 1):
            try:
                _fetch_into(url, part, timeout, progress)
                break
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and part.exists():  # Range past the end: the part is complete or wrong
                    break
                raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
            except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt == retries:
                    raise DownloadError(f"download of {url} failed after {retries + 1} attempts: {reason}") from exc
                print(f"download of {url} interrupted ({reason}); resuming in {backoff * 2 ** attempt:.0f} s",
                      file=sys.stderr)
                time.sleep(backoff * 2 ** attempt)
        digests = _digests(part)
        for name, expected in (("md5", md5), ("sha256", sha256)):
            if expected and digests[name] != expected.lower():
                raise ChecksumError(f"{name} mismatch for {url}: expected {expected.lower()}, got {digests[name]} "
                                    f"({part.stat().st_size} bytes); the file was deleted")
        os.replace(part, dst)
        _fsync_dir(dst.parent)
        return digests
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):  # an interrupted download is kept to be resumed
            part.unlink(missing_ok=True)
        raise
