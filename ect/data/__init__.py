"""Our uniform on-disk dataset: one uncompressed ``.npz`` with ``images`` (uint8 NHWC) and ``labels`` (int64).

Its identity is a content hash of the decoded pixels and labels, independent of archive
timestamps or compression, so the same images always give the same hash. It is computed when the
dataset is written and recorded in it; training maps the images rather than reading them (every
process on a node shares one copy) and checks the file's structure, not the hash, at each start.
"""
from __future__ import annotations

import hashlib

import numpy as np

from ect.errors import BadInput
from ect.fileio import atomic_path, map_npz_member, open_npz


class DatasetError(BadInput):
    pass


def content_hash(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for arr in (np.ascontiguousarray(images, dtype=np.uint8), np.ascontiguousarray(labels, dtype=np.int64)):
        h.update(repr((arr.dtype.str, arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_dataset(path, images: np.ndarray, labels: np.ndarray) -> str:
    """Write the dataset atomically; return its content hash."""
    check_dataset(images, labels)
    digest = content_hash(images, labels)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # streamed: ImageNet-64's images are 15.7 GB
        np.savez(f, images=images, labels=labels.astype(np.int64), content_sha256=np.array(digest))
    return digest


def check_dataset(images: np.ndarray, labels: np.ndarray, where="dataset") -> None:
    """Our format's rules: uint8 NHWC images with 1 or 3 channels, at least one; an int label >= 0 each."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] not in (1, 3):
        raise DatasetError(f"{where}: images must be uint8 NHWC with 1 or 3 channels, got "
                           f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if images.shape[1] != images.shape[2] or images.shape[1] < 1:
        raise DatasetError(f"{where}: images must be square, got {images.shape[1]}x{images.shape[2]}")
    if len(images) == 0:
        raise DatasetError(f"{where} holds no images")
    if not isinstance(labels, np.ndarray) or labels.shape != (images.shape[0],) \
            or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{where}: labels must be integers of shape ({images.shape[0]},), got "
                           f"{getattr(labels, 'dtype', '')} {getattr(labels, 'shape', '')}")
    if labels.min() < 0:
        raise DatasetError(f"{where}: labels must be >= 0, found {int(labels.min())}")


def load_dataset(path, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    with open_npz(path, "dataset", DatasetError) as f:
        images, labels, digest = f["images"], f["labels"], str(f["content_sha256"])
    check_dataset(images, labels, f"dataset {path}")
    if verify and content_hash(images, labels) != digest:
        raise DatasetError(f"dataset {path} does not match its recorded content hash (corrupt?)")
    return images, labels


def map_dataset(path) -> tuple[np.ndarray, np.ndarray]:
    """The images as a read-only memory map and the labels, for training: the headers, shapes and sizes are
    checked and the recorded hash must be there, but the pixels are not re-hashed (15.7 GB for ImageNet-64,
    at every start of every process); ``ect prepare-data`` hashed them when it wrote the file. A dataset
    written compressed (not by us) is read whole and verified instead."""
    with open_npz(path, "dataset", DatasetError) as f:
        labels, digest = f["labels"], f["content_sha256"]
    try:
        images = map_npz_member(path, "images")
    except (OSError, KeyError, ValueError, EOFError, SyntaxError) as exc:
        raise DatasetError(f"cannot read dataset {path}: {(str(exc).splitlines() or [''])[0][:200]}") from None
    if images is None:
        return load_dataset(path)
    if digest.shape != () or len(str(digest)) != 64:
        raise DatasetError(f"dataset {path} records no content hash; rerun `ect prepare-data`")
    check_dataset(images, labels, f"dataset {path}")
    return images, labels


def load_labels(path) -> np.ndarray:
    """A dataset's labels alone (the images are not read: ImageNet's are 15 GB)."""
    with open_npz(path, "dataset", DatasetError) as f:
        labels = f["labels"]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise DatasetError(f"dataset {path}: labels must be non-negative integers, got {labels.dtype} {labels.shape}")
    return labels


def load_dataset_digest(path) -> str:
    """The content hash recorded in a dataset file (not recomputed)."""
    with open_npz(path, "dataset", DatasetError) as f:
        return str(f["content_sha256"])


SOURCES = ("digits", "cifar10", "imagenet")  # the config's dataset.source


def prepare_dataset(source: str, resolution: int, archive=None, expected_count: int | None = None,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of a dataset source: 'digits' (bundled with scikit-learn), 'cifar10' (the
    official python tarball, already downloaded) or 'imagenet' (a local ILSVRC2012 training folder or tar,
    or EDM2's prepared zip, brought to ``resolution`` as EDM2 does; ``expected_count`` images)."""
    if source == "digits":
        from ect.data.digits import digits_images

        return digits_images(resolution)
    if source == "cifar10":
        from ect.data.cifar10 import read_cifar10_train

        if resolution != 32:
            raise DatasetError(f"cifar10 is 32x32; --resolution {resolution} is not supported")
        if not archive:
            raise DatasetError("dataset source 'cifar10' needs --archive (the downloaded cifar-10-python.tar.gz)")
        return read_cifar10_train(archive)
    if source == "imagenet":
        from ect.data.imagenet import read_imagenet

        if not archive:
            raise DatasetError("dataset source 'imagenet' needs --archive (the ILSVRC2012 training folder or tar, "
                               "or EDM2's dataset zip)")
        return read_imagenet(archive, resolution, expected_count=expected_count, progress=progress)
    raise DatasetError(f"unknown dataset source {source!r}; known: {', '.join(SOURCES)}")
