"""CIFAR-10 from its official python tarball (``cifar-10-python.tar.gz``) to our dataset format.

The 50,000 training images are ``data_batch_1`` … ``data_batch_5`` in that order (as EDM's
dataset tool reads them), each a pickled dict with ``data`` (N, 3072) uint8 in CHW order and
``labels``. The batches are pickles, so they are read with an unpickler that resolves only
numpy's array reconstruction: a tampered archive cannot run code, even before its md5 is checked.
"""
from __future__ import annotations

import codecs
import io
import pickle
import tarfile

import numpy as np

from ect.data import DatasetError

TRAIN_MEMBERS = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]

_ALLOWED = {  # numpy 1 pickles name numpy.core, numpy 2 numpy._core; Python 3's protocol 2 adds _codecs
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise DatasetError(f"refusing global '{module}.{name}' in a CIFAR-10 batch (not numpy array data)")
        return found


def _read_batch(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
        data, labels = batch[b"data"], np.asarray(batch[b"labels"], dtype=np.int64)
    except DatasetError:
        raise
    except Exception as exc:  # any malformed pickle: report it as a bad archive
        raise DatasetError(f"{name} is not a CIFAR-10 batch: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or labels.shape != (len(data),):
        raise DatasetError(f"{name} has an unexpected layout")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar10_train(path) -> tuple[np.ndarray, np.ndarray]:
    """The training images (N, 32, 32, 3) uint8 and labels, in EDM's order."""
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in TRAIN_MEMBERS:
                f = tar.extractfile(member)
                if f is None:
                    raise DatasetError(f"{member} in {path} is not a file")
                x, y = _read_batch(f.read(), member)
                images.append(x)
                labels.append(y)
    except KeyError as exc:
        raise DatasetError(f"{path} is not the CIFAR-10 python tarball: {exc.args[0]}") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path} (truncated or not a .tar.gz?): {exc}") from exc
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
