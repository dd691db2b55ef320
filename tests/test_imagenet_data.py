import io
import json
import struct
import tarfile
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from ect.data import DatasetError
from ect.data.imagenet import IMAGENET_TRAIN_COUNT, center_crop_dhariwal, read_imagenet

# (path under train/, (width, height), mode), written in this (non-alphabetical) order
TREE = [
    ("n02000000/n02000000_2.JPEG", (500, 375), "RGB"),
    ("n02000000/n02000000_10.JPEG", (64, 100), "RGB"),
    ("n01000000/a.JPEG", (300, 300), "RGB"),
    ("n01000000/sub/b.jpg", (129, 200), "RGB"),
    ("n01000000/c.png", (40, 90), "RGB"),
    ("n03000000/x.jpeg", (200, 150), "L"),
]
# plain string order: "_10" before "_2", "c.png" before "sub/"
SORTED = ["n01000000/a.JPEG", "n01000000/c.png", "n01000000/sub/b.jpg",
          "n02000000/n02000000_10.JPEG", "n02000000/n02000000_2.JPEG", "n03000000/x.jpeg"]
LABELS = [0, 0, 0, 1, 1, 2]


def _encode(size, mode, seed, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # structure plus fine noise
    arr = np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w] // 2
    arr += rng.integers(0, 128, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "train"
    blobs = {}
    for seed, (rel, size, mode) in enumerate(TREE):
        blobs[rel] = _encode(size, mode, seed, "PNG" if rel.endswith(".png") else "JPEG")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blobs[rel])
    (root / "n03000000" / "notes.txt").write_text("not an image")
    return root, blobs


def _expected(blob, r=64):
    """EDM2's center-crop-dhariwal, spelled out independently of the module."""
    img = Image.open(io.BytesIO(blob)).convert("RGB")
    w, h = img.size
    while w >= 2 * r and h >= 2 * r:
        w, h = w // 2, h // 2
        img = img.resize((w, h), resample=Image.BOX)
    s = r / min(w, h)
    img = img.resize((round(w * s), round(h * s)), resample=Image.BICUBIC)
    a = np.array(img)
    y, x = (a.shape[0] - r) // 2, (a.shape[1] - r) // 2
    return a[y:y + r, x:x + r]


def test_directory_is_read_in_sorted_path_order_with_synset_labels(tree, capsys):
    root, blobs = tree
    x, y = read_imagenet(root, expected_count=6)
    assert x.dtype == np.uint8 and x.shape == (6, 64, 64, 3) and y.dtype == np.int64
    assert y.tolist() == LABELS
    for i, rel in enumerate(SORTED):
        np.testing.assert_array_equal(x[i], _expected(blobs[rel]), err_msg=rel)
    assert not np.array_equal(x[0], x[1])
    assert capsys.readouterr().err.count("6/6") >= 1  # the progress bar went to stderr
    read_imagenet(root, progress=False)
    assert "6/6" not in capsys.readouterr().err
    assert IMAGENET_TRAIN_COUNT == 1_281_167


@pytest.mark.parametrize("size, steps, top_left", [
    ((500, 375), [((250, 187), Image.BOX), ((125, 93), Image.BOX), ((86, 64), Image.BICUBIC)], (0, 11)),
    ((129, 200), [((64, 100), Image.BOX), ((64, 100), Image.BICUBIC)], (18, 0)),
    ((40, 90), [((64, 144), Image.BICUBIC)], (40, 0)),  # smaller than 64: upscaled
    ((70, 117), [((64, 107), Image.BICUBIC)], (21, 0)),  # 117 * 64 / 70 = 106.97: rounded, not truncated
    ((64, 64), [((64, 64), Image.BICUBIC)], (0, 0)),
])
def test_transform_halves_then_resizes_bicubically_then_crops_the_centre(monkeypatch, size, steps, top_left):
    calls, original = [], Image.Image.resize

    def recording_resize(self, new_size, resample=None, *args, **kwargs):
        out = original(self, new_size, resample, *args, **kwargs)
        calls.append((tuple(new_size), resample, out))
        return out

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    img = Image.open(io.BytesIO(_encode(size, "RGB", 7))).convert("RGB")
    out = center_crop_dhariwal(img, 64)
    assert [(s, r) for s, r, _ in calls] == steps
    last = np.array(calls[-1][2])
    y, x = top_left
    np.testing.assert_array_equal(out, last[y:y + 64, x:x + 64])
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tar_of_the_folder_and_the_official_tar_of_tars_match_the_directory(tree, tmp_path):
    root, blobs = tree
    want_x, want_y = read_imagenet(root, progress=False)
    with tarfile.open(tmp_path / "train.tar", "w") as tar:
        tar.add(root, arcname="train")  # directories, notes.txt and a train/ prefix on everything
        link = tarfile.TarInfo("train/n01000000/link.JPEG")
        link.type, link.linkname = tarfile.SYMTYPE, "a.JPEG"
        tar.addfile(link)
    with tarfile.open(tmp_path / "dot.tar", "w") as tar:
        for rel in reversed(SORTED):
            _add(tar, f"./{rel}", blobs[rel])
    with tarfile.open(tmp_path / "ILSVRC2012_img_train.tar", "w") as outer:
        for synset in ("n03000000", "n01000000", "n02000000"):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for rel in TREE:
                    if rel[0].startswith(synset):
                        _add(inner, rel[0].split("/", 1)[1], blobs[rel[0]])
                _add(inner, "deeper.tar", b"\0" * 1024)  # a tar two levels down is not read
            _add(outer, f"{synset}.tar", buf.getvalue())
    for name in ("train.tar", "dot.tar", "ILSVRC2012_img_train.tar"):
        x, y = read_imagenet(tmp_path / name, expected_count=6, progress=False)
        np.testing.assert_array_equal(x, want_x, err_msg=name)
        np.testing.assert_array_equal(y, want_y, err_msg=name)


def _edm2_zip(path, images, labels, extra=None, meta=True):
    with zipfile.ZipFile(path, "w") as zf:
        for i in reversed(range(len(images))):  # stored out of order: names decide the order
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            zf.writestr(f"{i // 1000:05d}/img{i:08d}.png", buf.getvalue())
        if meta:
            zf.writestr("dataset.json", json.dumps(
                {"labels": [[f"{i // 1000:05d}/img{i:08d}.png", int(labels[i])] for i in range(len(images))]}
                if extra is None else extra))


def test_edm2_dataset_zip_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    labels = np.array([4, 0, 999, 4, 1])
    _edm2_zip(tmp_path / "d.zip", images, labels)
    x, y = read_imagenet(tmp_path / "d.zip", expected_count=5, progress=False)
    np.testing.assert_array_equal(x, images)
    assert y.dtype == np.int64 and y.tolist() == labels.tolist()
    _edm2_zip(tmp_path / "small.zip", np.ascontiguousarray(images[:, :32, :32]), labels)
    with pytest.raises(DatasetError, match=r"img00000000.png is 32x32 RGB, expected 64x64 RGB"):
        read_imagenet(tmp_path / "small.zip", progress=False)
    names = [f"00000/img{i:08d}.png" for i in range(5)]
    for extra, message in [
        ({"labels": None}, "malformed"),
        ({"labels": [[n, 0] for n in names[:4]]}, r"do not match the images \(1 differ, e.g. 00000/img00000004.png\)"),
        ({"labels": [[n, -1 if i == 2 else 0] for i, n in enumerate(names)]}, "img00000002.png is -1, not an integer"),
        ({"labels": [[n, 1.5] for n in names]}, "is 1.5, not an integer"),
        ({"labels": [[n, 0] for n in names + names[:1]]}, "malformed"),  # a file labelled twice
        ([1, 2], "malformed"),
    ]:
        _edm2_zip(tmp_path / "bad.zip", images, labels, extra=extra)
        with pytest.raises(DatasetError, match=message):
            read_imagenet(tmp_path / "bad.zip", progress=False)
    _edm2_zip(tmp_path / "nometa.zip", images, labels, meta=False)
    with pytest.raises(DatasetError, match="has no dataset.json"):
        read_imagenet(tmp_path / "nometa.zip", progress=False)


def test_a_zip_member_claiming_a_huge_size_is_refused_before_reading(tmp_path):
    images = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    _edm2_zip(tmp_path / "d.zip", images, np.zeros(2))
    blob = bytearray((tmp_path / "d.zip").read_bytes())
    at = blob.index(b"PK\x01\x02")  # central directory entry of the first stored member
    struct.pack_into("<I", blob, at + 24, 0x7FFF_FFFF)  # its uncompressed size: 2 GiB
    (tmp_path / "d.zip").write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match=r"img00000001.png claims 2147483647 bytes, over the limit"):
        read_imagenet(tmp_path / "d.zip", progress=False)


def test_counts_and_empty_or_unknown_sources(tree, tmp_path):
    root, _ = tree
    with pytest.raises(DatasetError, match="found 6 images, expected 1281167"):
        read_imagenet(root, expected_count=IMAGENET_TRAIN_COUNT, progress=False)
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        tar.add(root, arcname="train")
    with pytest.raises(DatasetError, match="found 6 images, expected 7"):
        read_imagenet(tmp_path / "t.tar", expected_count=7, progress=False)
    (tmp_path / "empty" / "n01000000").mkdir(parents=True)
    (tmp_path / "empty" / "n01000000" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images found in"):
        read_imagenet(tmp_path / "empty", progress=False)
    (tmp_path / "plain.txt").write_text("hello")
    for bad in (tmp_path / "plain.txt", tmp_path / "missing"):
        with pytest.raises(DatasetError, match="is not a directory, a tar or a zip"):
            read_imagenet(bad, progress=False)
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.JPEG").write_bytes(_encode((70, 70), "RGB", 0))
    with pytest.raises(DatasetError, match="a.JPEG is not inside a synset folder"):
        read_imagenet(tmp_path / "loose", progress=False)


@pytest.mark.parametrize("member", ["../evil.JPEG", "/etc/evil.JPEG", "n01000000/../../evil.JPEG"])
def test_tar_members_escaping_the_archive_are_refused(tmp_path, member):
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        _add(tar, "n01000000/a.JPEG", _encode((70, 70), "RGB", 0))
        _add(tar, member, _encode((70, 70), "RGB", 1))
    with pytest.raises(DatasetError, match="refusing member with unsafe path"):
        read_imagenet(tmp_path / "t.tar", progress=False)


def _png_claiming(width, height):
    blob = bytearray(_encode((8, 8), "RGB", 0, "PNG"))
    struct.pack_into(">II", blob, 16, width, height)  # IHDR data starts after signature, length and type
    struct.pack_into(">I", blob, 29, zlib.crc32(bytes(blob[12:29])))
    return bytes(blob)


def test_corrupt_disguised_and_oversized_images_are_named(tree):
    root, blobs = tree
    target = root / "n02000000" / "n02000000_2.JPEG"
    cases = [(blobs["n02000000/n02000000_2.JPEG"][:2000], "cannot decode image .*n02000000_2.JPEG: OSError"),
             (b"garbage" * 100, "cannot decode image .*n02000000_2.JPEG"),
             (_encode((70, 70), "RGB", 0, "GIF"), "cannot decode image .*n02000000_2.JPEG"),  # only JPEG/PNG decoders
             (_png_claiming(9000, 9000), r"n02000000_2.JPEG is 9000x9000 \(81000000 pixels\), over the limit"),
             (_png_claiming(30000, 30000), "n02000000_2.JPEG.*DecompressionBomb")]
    for blob, message in cases:
        target.write_bytes(blob)
        start = time.perf_counter()
        with pytest.raises(DatasetError, match=message) as info:
            read_imagenet(root, progress=False)
        assert "\n" not in str(info.value)
        assert time.perf_counter() - start < 2  # refused from the header, nothing huge decoded


def test_prepare_data_cli_writes_the_dataset_and_refuses_a_wrong_count(tree, tmp_path):
    from ect.data import load_dataset
    from tests.helpers import run_ect

    root, blobs = tree
    run_ect("prepare-data", "--source", "imagenet", "--resolution", 64, "--archive", root, "--expect-count", 6,
            "--out", tmp_path / "d.npz", "--no-progress")
    images, labels = load_dataset(tmp_path / "d.npz")
    assert images.shape == (6, 64, 64, 3) and labels.tolist() == LABELS
    assert np.array_equal(images[0], _expected(blobs[SORTED[0]]))
    proc = run_ect("prepare-data", "--source", "imagenet", "--resolution", 64, "--archive", root, "--expect-count",
                   IMAGENET_TRAIN_COUNT, "--out", tmp_path / "x.npz", check=False)
    assert proc.returncode == 2 and "1281167" in proc.stderr.replace(",", "") and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.npz").exists()


# ---- resource bombs: each refused before it costs more than a few megabytes or seconds -------------

def test_compressed_tars_and_huge_tar_headers_are_refused(tree, tmp_path):
    root, _ = tree
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="train")
    with pytest.raises(DatasetError, match="is compressed"):
        read_imagenet(tmp_path / "t.tar.gz", progress=False)
    # A GNU long-name header declaring 3 GB (backed by nothing): tarfile would read it in one call.
    head = tarfile.TarInfo("././@LongLink")
    head.type, head.size = tarfile.GNUTYPE_LONGNAME, 3 * 2**30
    (tmp_path / "longname.tar").write_bytes(head.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 4096)
    start = time.perf_counter()
    with pytest.raises(DatasetError):
        read_imagenet(tmp_path / "longname.tar", progress=False)
    assert time.perf_counter() - start < 5


def test_a_strip_image_that_would_grow_64_fold_is_refused(tmp_path):
    (tmp_path / "n01").mkdir()
    Image.new("RGB", (60000, 1)).save(tmp_path / "n01" / "strip.png")
    start = time.perf_counter()
    with pytest.raises(DatasetError, match="aspect ratio"):
        read_imagenet(tmp_path, progress=False)
    assert time.perf_counter() - start < 5


def test_a_jpeg_with_thousands_of_scans_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="JPEG", progressive=True)
    data = buf.getvalue()
    sos = data.index(b"\xff\xda")
    (tmp_path / "n01").mkdir()
    (tmp_path / "n01" / "p.JPEG").write_bytes(data[:sos] + data[sos:-2] * 1 + b"\xff\xda\x00\x08" * 200 + data[-2:])
    with pytest.raises(DatasetError, match="JPEG scans"):
        read_imagenet(tmp_path, progress=False)


def test_zip_members_that_understate_their_size_are_read_only_up_to_the_limit(tmp_path, monkeypatch):
    import ect.data.imagenet as imagenet

    monkeypatch.setattr(imagenet, "MAX_FILE_BYTES", 4096)
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:  # a member whose real size is 40000x its header's
        zf.writestr("dataset.json", json.dumps({"labels": [["00000/img00000000.png", 0]]}))
        zf.writestr(zipfile.ZipInfo("00000/img00000000.png"), b"\0" * 40_000_000, compress_type=zipfile.ZIP_DEFLATED)
    raw = bytearray((tmp_path / "d.zip").read_bytes())
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # patch the declared size in the local and central headers
        at = raw.rfind(sig)
        field = at + (22 if sig == b"PK\x03\x04" else 24)
        raw[field:field + 4] = struct.pack("<I", 100)
    (tmp_path / "d.zip").write_bytes(bytes(raw))
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(DatasetError):
            read_imagenet(tmp_path / "d.zip", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, f"{peak} bytes allocated: the member was inflated beyond its limit"


def test_links_out_of_the_source_folder_are_not_followed(tree, tmp_path):
    root, _ = tree
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (80, 80)).save(outside / "stolen.JPEG")
    (root / "n01000000" / "escape").symlink_to(outside)
    (root / "n01000000" / "stolen.JPEG").symlink_to(outside / "stolen.JPEG")
    x, _ = read_imagenet(root, expected_count=6, progress=False)  # the two links add nothing
    assert len(x) == 6


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    """Pillow's own conversion of a 16-bit image clips every value above 255; the reader scales 0..65535 to
    0..255 (65535 / 257 = 255), so a mid-gray 16-bit image stays mid-gray."""
    from ect.data.imagenet import _decode

    wide = np.full((80, 80), 32896, dtype=np.uint16)  # 128 * 257
    wide[0, 0] = 65535
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    out = _decode(buf.getvalue(), "gray16.png", 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert abs(int(out[32, 32, 0]) - 128) <= 1 and (out[..., 0] == out[..., 2]).all()
