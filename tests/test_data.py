import numpy as np
import pytest

from ect.data import DatasetError, content_hash, load_dataset, map_dataset, save_dataset
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


def test_training_maps_the_images_shares_them_and_refuses_a_file_that_lies(tmp_path):
    """Training maps the images (every process on a node shares the page cache's copy) and checks structure,
    not the hash, at start; a dataset written compressed is read whole and verified instead."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 50)
    path = tmp_path / "d.npz"
    save_dataset(path, images, labels)
    mapped, mapped_labels = map_dataset(path)
    assert isinstance(mapped, np.memmap) and str(mapped.filename) == str(path.resolve())
    np.testing.assert_array_equal(mapped, images)
    np.testing.assert_array_equal(mapped_labels, labels)

    blob = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])  # a torn copy
    with pytest.raises(DatasetError, match="cannot read dataset"):
        map_dataset(tmp_path / "cut.npz")
    header = blob.index(b"(50, 8, 8, 3)")  # the images' header claims more images than the member holds
    (tmp_path / "lies.npz").write_bytes(blob[:header] + b"(99, 8, 8, 3)" + blob[header + 13:])
    with pytest.raises(DatasetError, match="declares"):
        map_dataset(tmp_path / "lies.npz")
    np.savez_compressed(tmp_path / "packed.npz", images=images, labels=labels,
                        content_sha256=np.array(content_hash(images, labels)))
    packed, _ = map_dataset(tmp_path / "packed.npz")
    assert not isinstance(packed, np.memmap)
    np.testing.assert_array_equal(packed, images)
