"""Small archives in CIFAR-10's python format (what cifar-10-python.tar.gz contains), for tests."""
from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np


def cifar_tarball(per_batch: int = 4, seed: int = 0, extra_global: bool = False) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Bytes of a .tar.gz with data_batch_1..5 (+ test_batch, batches.meta); and the NHWC images and labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(5 * per_batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5 * per_batch)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, obj):
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size, info.mtime = len(blob), 1234567890
            tar.addfile(info, io.BytesIO(blob))
        for b in range(5):
            sl = slice(b * per_batch, (b + 1) * per_batch)
            batch = {b"batch_label": b"training batch", b"labels": labels[sl].tolist(),
                     b"data": images[sl].transpose(0, 3, 1, 2).reshape(per_batch, 3072), b"filenames": []}
            if extra_global and b == 2:
                batch[b"payload"] = print  # a global that is not numpy array data
            add(f"data_batch_{b + 1}", batch)
        add("test_batch", {b"labels": [], b"data": np.zeros((0, 3072), np.uint8)})
        add("batches.meta", {b"label_names": [b"airplane"]})
    return buf.getvalue(), images, labels
