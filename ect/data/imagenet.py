"""ImageNet (ILSVRC2012 training set) to our dataset format, preprocessed as EDM2 does.

Reads the training images from the extracted ``train`` folder (one sub-folder per synset), from a
tar of that folder, from the official ``ILSVRC2012_img_train.tar`` (one inner tar per synset), or
from EDM2's prepared 64x64 dataset zip. Images are taken in the order of their relative paths
(plain string sort) and labelled by the index of their synset folder among the sorted synsets.

Each source image goes through ADM's "center-crop-dhariwal" recipe: halve it with a box filter
while its short side is at least twice the target, resize bicubically so the short side equals the
target, then crop the centre square. This is exactly EDM2's ``dataset_tool.py convert
--transform=center-crop-dhariwal``; any other resampling would shift the pixel statistics and make
FIDs against EDM2's published reference statistics meaningless.

Every file is treated as hostile: decoders are limited to JPEG and PNG, image dimensions and member
sizes are capped before anything is decoded or read, and archives are read in memory, never extracted.
"""
from __future__ import annotations

import io
import json
import lzma
import os
import sys
import tarfile
import warnings
import zipfile
import zlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from ect.data import DatasetError

IMAGENET_TRAIN_COUNT = 1_281_167
IMAGE_EXTS = (".jpeg", ".jpg", ".png")
MAX_PIXELS = 64 * 2**20  # far above any ImageNet photo, far below what exhausts memory
MAX_RESIZED_PIXELS = 2**24  # the bicubic step's output: a 100000x1 strip would otherwise grow 64-fold
MAX_SCANS = 100  # JPEG scans (SOS markers): progressive photos have about 10; each costs a decoding pass
MAX_FILE_BYTES = 64 * 2**20
MAX_READ = 4 * MAX_FILE_BYTES  # one read from a tar: a member or a header block (a GNU long name is a few KB)
JSON_BYTES_PER_IMAGE = 64  # dataset.json: ["00000/img00000000.png", 999] is 33 bytes an image
_FORMATS = ("JPEG", "PNG")  # ILSVRC2012 train holds JPEGs and one PNG named .JPEG; no other decoder is exposed
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError,
                   RuntimeError, NotImplementedError)  # the last two: encrypted or exotic zip members


def center_crop_dhariwal(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM/EDM2 preprocessing of an RGB image: a (resolution, resolution, 3) uint8 array."""
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = resolution / min(img.size)
    size = (round(img.width * scale), round(img.height * scale))
    if size[0] * size[1] > MAX_RESIZED_PIXELS:
        raise DatasetError(f"a {img.width}x{img.height} image would be resized to {size[0]}x{size[1]}: "
                           "its aspect ratio is too extreme for a photograph")
    img = img.resize(size, resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top:top + resolution, left:left + resolution])


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens a 16-bit grayscale PNG


def _to_rgb(img):
    """An image as 8-bit RGB. A 16-bit grayscale image is scaled to 8 bits (Pillow's own conversion would clip
    every value above 255 to white)."""
    if img.mode in WIDE_GRAY:
        gray = np.round(np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return img.convert("RGB")


def _decode(data: bytes, name: str, resolution: int, prepared: bool = False) -> np.ndarray:
    """One image file to a (resolution, resolution, 3) array; ``prepared`` ones must already be that."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_FORMATS) as img:
                w, h = img.size  # from the header: nothing is decoded yet
                if w * h > MAX_PIXELS:
                    raise DatasetError(f"image {name} is {w}x{h} ({w * h} pixels), over the limit of {MAX_PIXELS}")
                if img.format == "JPEG" and data.count(b"\xff\xda") > MAX_SCANS:
                    raise DatasetError(f"image {name} has more than {MAX_SCANS} JPEG scans (a decoding-time bomb)")
                if prepared:
                    if (w, h) != (resolution, resolution) or img.mode != "RGB":
                        raise DatasetError(f"image {name} is {w}x{h} {img.mode}, "
                                           f"expected {resolution}x{resolution} RGB")
                    return np.array(img)
                rgb = _to_rgb(img)
    except DatasetError:
        raise
    except Exception as exc:  # whatever a malformed file makes a decoder raise, it is a bad input file
        msg = (str(exc).splitlines() or [""])[0][:200]
        raise DatasetError(f"cannot decode image {name}: {type(exc).__name__}: {msg}") from exc
    try:
        return center_crop_dhariwal(rgb, resolution)
    except DatasetError as exc:
        raise DatasetError(f"image {name}: {exc}") from None


def _check_count(found: int, expected: int | None, where) -> None:
    if found == 0:
        raise DatasetError(f"no images found in {where}")
    if expected is not None and found != expected:
        raise DatasetError(f"{where}: found {found} images, expected {expected} (incomplete or wrong download?)")


def _labels(paths: list[str], where) -> np.ndarray:
    for p in paths:
        if "/" not in p:
            raise DatasetError(f"{where}: image {p} is not inside a synset folder")
    tops = [p.split("/", 1)[0] for p in paths]
    index = {name: i for i, name in enumerate(sorted(set(tops)))}
    return np.array([index[t] for t in tops], dtype=np.int64)


def _bar(total, progress):
    return tqdm(total=total, unit="img", file=sys.stderr, disable=not progress, desc="imagenet")


def _inside(path: str, real_root: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), real_root]) == real_root


def _read_dir(root: str, resolution, expected_count, progress):
    paths, seen, real_root = [], set(), os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or not _inside(real, real_root):  # a symlink loop, a second link, or a way out
            dirnames[:] = []
            continue
        seen.add(real)
        for f in filenames:
            full = os.path.join(dirpath, f)
            if _is_image_name(f) and os.path.isfile(full) and _inside(full, real_root):
                paths.append(os.path.relpath(full, root).replace(os.sep, "/"))
    paths.sort()
    _check_count(len(paths), expected_count, root)
    labels = _labels(paths, root)
    out = np.empty((len(paths), resolution, resolution, 3), dtype=np.uint8)
    with _bar(len(paths), progress) as bar:
        for i, rel in enumerate(paths):
            full = os.path.join(root, rel)
            with open(full, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise DatasetError(f"image {full} is larger than {MAX_FILE_BYTES} bytes")
            out[i] = _decode(data, full, resolution)
            bar.update()
    return out, labels


def _member_path(name: str, where) -> str:
    """A tar member's normalised relative path; refuses names that would escape the archive."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise DatasetError(f"{where}: refusing member with unsafe path {name!r}")
    return "/".join(parts)


def _member_bytes(tar: tarfile.TarFile, m: tarfile.TarInfo, where) -> bytes:
    if m.size > MAX_FILE_BYTES:
        raise DatasetError(f"{where}: member {m.name} is {m.size} bytes, over the limit of {MAX_FILE_BYTES}")
    return tar.extractfile(m).read()


class _CappedReader(io.RawIOBase):
    """A tar file whose single reads are capped: tarfile reads a member, or a GNU long-name or pax header
    (which a crafted tar can declare gigabytes long), in one call."""

    def __init__(self, f):
        self.f = f

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def read(self, n=-1):
        if n is None or n < 0 or n > MAX_READ:
            raise DatasetError(f"the tar asks to read {n} bytes at once (a member or header over {MAX_READ} bytes)")
        return self.f.read(n)

    def readinto(self, b):
        return self.f.readinto(b)


def _read_tar(path: str, resolution, expected_count, progress):
    items: list[tuple[str, np.ndarray]] = []
    # Uncompressed only (ILSVRC's tars are): a compressed tar is a decompression bomb in waiting.
    with _bar(expected_count, progress) as bar, open(path, "rb") as raw, \
            tarfile.open(fileobj=_CappedReader(raw), mode="r:") as tar:
        for m in tar:
            name = _member_path(m.name, path)
            if not m.isfile():  # directories, links, devices
                continue
            if name.lower().endswith(".tar"):  # ILSVRC2012_img_train.tar: one plain tar per synset
                where = f"{path}:{name}"
                with tarfile.open(fileobj=tar.extractfile(m), mode="r|") as inner:
                    for im in inner:  # only image files count, so a tar nested deeper is skipped
                        iname = _member_path(im.name, where)
                        if im.isfile() and _is_image_name(iname):
                            data = _member_bytes(inner, im, where)
                            items.append((f"{name[:-4]}/{iname}", _decode(data, f"{where}:{iname}", resolution)))
                            bar.update()
            elif _is_image_name(name):
                items.append((name, _decode(_member_bytes(tar, m, path), f"{path}:{name}", resolution)))
                bar.update()
    paths = [p for p, _ in items]
    if len(set(paths)) != len(paths):
        raise DatasetError(f"{path} holds the same image path more than once")
    firsts = {p.split("/", 1)[0] for p in paths}
    if len(firsts) == 1 and all(p.count("/") >= 2 for p in paths) \
            and len({p.split("/")[1] for p in paths}) > 1:  # e.g. everything under train/
        paths = [p.split("/", 1)[1] for p in paths]
    _check_count(len(paths), expected_count, path)
    order = sorted(range(len(paths)), key=paths.__getitem__)
    out = np.empty((len(paths), resolution, resolution, 3), dtype=np.uint8)
    for i, j in enumerate(order):
        out[i] = items[j][1]
        items[j] = None  # the output fills as the list empties: peak memory stays near one copy
    return out, _labels([paths[j] for j in order], path)


MAX_CLASSES = 100_000  # as a network's label_dim


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, where) -> bytes:
    """A member's bytes, decompressing at most ``limit`` + 1 (a header may understate the real size)."""
    if info.file_size > limit:
        raise DatasetError(f"{where}: member {info.filename} claims {info.file_size} bytes, over the limit of {limit}")
    with zf.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DatasetError(f"{where}: member {info.filename} holds more than {limit} bytes")
    return data


def _read_zip(path: str, resolution, expected_count, progress):
    with zipfile.ZipFile(path) as zf:
        infos: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            if info.is_dir() or not _is_image_name(info.filename):
                continue
            if info.filename in infos:
                raise DatasetError(f"{path} holds {info.filename} more than once")
            infos[info.filename] = info
        names = sorted(infos)
        _check_count(len(names), expected_count, path)
        try:
            meta = zf.getinfo("dataset.json")
        except KeyError:
            raise DatasetError(f"{path} has no dataset.json (not an EDM2 dataset zip?)") from None
        limit = JSON_BYTES_PER_IMAGE * len(names) + 1024
        try:
            pairs = json.loads(_zip_member(zf, meta, limit, path)).get("labels")
            table = {k: v for k, v in pairs} if isinstance(pairs, list) else None
            if table is None or len(table) != len(pairs) or not all(isinstance(k, str) for k in table):
                raise ValueError("labels must be a list of unique [file name, label] pairs")
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:
            raise DatasetError(f"{path}: dataset.json is malformed: {(str(exc).splitlines() or [''])[0]}") from None
        if set(table) != set(names):
            diff = sorted(set(table) ^ set(names))
            raise DatasetError(f"{path}: dataset.json labels do not match the images "
                               f"({len(diff)} differ, e.g. {diff[0]})")
        bad = [n for n in names if type(table[n]) is not int or not 0 <= table[n] < MAX_CLASSES]
        if bad:
            raise DatasetError(f"{path}: label of {bad[0]} is {str(table[bad[0]])[:40]}, not an integer in "
                               f"[0, {MAX_CLASSES})")
        out = np.empty((len(names), resolution, resolution, 3), dtype=np.uint8)
        with _bar(len(names), progress) as bar:
            for i, name in enumerate(names):
                out[i] = _decode(_zip_member(zf, infos[name], MAX_FILE_BYTES, path), f"{path}:{name}", resolution,
                                 prepared=True)
                bar.update()
    return out, np.array([table[n] for n in names], dtype=np.int64)


def _is_plain_tar(path: str) -> bool:
    """An uncompressed tar (POSIX/GNU magic at offset 257); compressed tars are refused by name."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        raise DatasetError(f"{path} is compressed: give the uncompressed tar (ILSVRC's are), or unpack it")
    return len(head) == 512 and head[257:262] == b"ustar"


def read_imagenet(source, resolution: int = 64, expected_count: int | None = None,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, resolution, resolution, 3) uint8, labels (N,) int64) from a train folder, a tar of
    it, ILSVRC2012_img_train.tar, or an EDM2 dataset zip; the kind is told by content, not name."""
    path = os.fspath(source)
    try:
        if os.path.isdir(path):
            return _read_dir(path, resolution, expected_count, progress)
        if os.path.isfile(path):
            if _is_plain_tar(path):
                return _read_tar(path, resolution, expected_count, progress)
            if zipfile.is_zipfile(path):
                return _read_zip(path, resolution, expected_count, progress)
    except _ARCHIVE_ERRORS as exc:
        msg = (str(exc).splitlines() or [""])[0]
        raise DatasetError(f"cannot read {path} (truncated or corrupt?): {type(exc).__name__}: {msg}") from exc
    raise DatasetError(f"{path} is not a directory, a tar or a zip of ImageNet images")
