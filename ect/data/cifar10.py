"""CIFAR-10 from its official python tarball (``cifar-10-python.tar.gz``) to our dataset format.

The 50,000 training images are ``data_batch_1`` … ``data_batch_5`` in that order (as EDM's
dataset tool reads them), each a pickled dict with ``data`` (N, 3072) uint8 in CHW order and
``labels``. The batches are Python 2 pickles: they are read by our strict reader
(``ect/safepickle.py``) with an allow-list of numpy's array reconstruction only, in a child process
with resource limits (``ect/untrusted.py``), so a tampered archive cannot run code or exhaust memory,
even before its md5 is checked.
"""
from __future__ import annotations

import tarfile

import numpy as np

from ect.data import DatasetError
from ect.safepickle import NUMPY_ARRAY_GLOBALS, Format, arrays, load

TRAIN_MEMBERS = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
BATCH_BYTES = 40 << 20  # a batch pickle is 31 MB: a member larger than this is not one
# A batch: a dict of numpy arrays and lists (Python 2 strings read as bytes, as encoding='bytes' does).
CIFAR_BATCH = Format("a CIFAR-10 batch", NUMPY_ARRAY_GLOBALS, py2_strings="bytes")


def _read_batch(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = arrays(load(blob, CIFAR_BATCH))
    if type(batch) is not dict:
        raise DatasetError(f"{name} is not a CIFAR-10 batch (not a dict)")
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{name} has no uint8 (N, 3072) 'data'")
    if type(labels) is not list or len(labels) != len(data) or not all(type(v) is int and 0 <= v < 10 for v in labels):
        raise DatasetError(f"{name} has no list of {len(data)} labels in 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


def parse_cifar10_tarball(path) -> dict:
    """In the parsing child: the training images (N, 32, 32, 3) uint8 and labels, in EDM's order, as tensors."""
    import torch

    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in TRAIN_MEMBERS:
                info = tar.getmember(member)
                if not info.isfile() or info.size > BATCH_BYTES:
                    raise DatasetError(f"{member} in {path} is not a file of at most {BATCH_BYTES:,} bytes")
                x, y = _read_batch(tar.extractfile(info).read(BATCH_BYTES + 1), member)
                images.append(x)
                labels.append(y)
    except KeyError as exc:
        raise DatasetError(f"{path} is not the CIFAR-10 python tarball: no {exc.args[0]}") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path} (truncated or not a .tar.gz?): {exc}") from None
    return {"images": torch.from_numpy(np.ascontiguousarray(np.concatenate(images))),
            "labels": torch.from_numpy(np.concatenate(labels))}


def read_cifar10_train(path) -> tuple[np.ndarray, np.ndarray]:
    """The training images (N, 32, 32, 3) uint8 and labels, in EDM's order, parsed in a limited child process."""
    from ect.untrusted import parse

    parsed = parse("cifar10-tarball", path)
    return parsed["images"].numpy(), parsed["labels"].numpy()
