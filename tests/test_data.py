import numpy as np
import pytest

from ect.data import DatasetError, content_hash, load_dataset, save_dataset
from ect.data.digits import digits_images


def test_digits_are_16x16_grayscale_uint8_and_reproducible(tmp_path):
    images, labels = digits_images(16)
    assert images.shape == (1797, 16, 16, 1) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0 and sorted(set(labels.tolist())) == list(range(10))
    np.testing.assert_array_equal(images[:, ::2, ::2, 0], images[:, 1::2, 1::2, 0])  # replicated pixels
    from sklearn.datasets import load_digits
    np.testing.assert_array_equal(images[:, ::2, ::2, 0], np.round(load_digits().images * 255 / 16))
    digest = save_dataset(tmp_path / "d.npz", images, labels)
    assert digest == content_hash(*digits_images(16))
    loaded, loaded_labels = load_dataset(tmp_path / "d.npz")
    np.testing.assert_array_equal(loaded, images)
    np.testing.assert_array_equal(loaded_labels, labels)


def test_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="uint8 NHWC"):
        save_dataset(tmp_path / "x.npz", np.zeros((2, 4, 4, 3), np.float32), np.zeros(2))
    images = np.zeros((2, 4, 4, 3), np.uint8)
    save_dataset(tmp_path / "x.npz", images, np.zeros(2, np.int64))
    data = dict(np.load(tmp_path / "x.npz"))
    data["images"][0, 0, 0, 0] = 1  # tampered pixels no longer match the recorded hash
    np.savez(tmp_path / "y.npz", **data)
    with pytest.raises(DatasetError, match="content hash"):
        load_dataset(tmp_path / "y.npz")
    (tmp_path / "z.npz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(tmp_path / "z.npz")
    with pytest.raises(ValueError, match="multiple of 8"):
        digits_images(12)
