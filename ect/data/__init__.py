"""Our uniform on-disk dataset: one ``.npz`` with ``images`` (uint8 NHWC) and ``labels`` (int64).

Its identity is a content hash of the decoded pixels and labels, independent of archive
timestamps or compression, so the same images always give the same hash.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np

from ect.fileio import write_bytes_atomic


class DatasetError(ValueError):
    pass


def content_hash(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for arr in (np.ascontiguousarray(images, dtype=np.uint8), np.ascontiguousarray(labels, dtype=np.int64)):
        h.update(repr((arr.dtype.str, arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_dataset(path, images: np.ndarray, labels: np.ndarray) -> str:
    """Write the dataset atomically; return its content hash."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DatasetError(f"images must be uint8 NHWC with 1 or 3 channels, got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise DatasetError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    digest = content_hash(images, labels)
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels.astype(np.int64), content_sha256=np.array(digest))
    write_bytes_atomic(path, buf.getvalue())
    return digest


def load_dataset(path, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels, digest = f["images"], f["labels"], str(f["content_sha256"])
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from exc
    if verify and content_hash(images, labels) != digest:
        raise DatasetError(f"dataset {path} does not match its recorded content hash (corrupt?)")
    return images, labels
