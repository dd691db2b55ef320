"""A generated corpus of hostile and broken inputs, a class of defect at a time, for the real `ect` command.

    python -m tests.hostile_corpus OUT_DIR     # writes every case's files and prints its command

Each case makes its files in a directory and returns the command (``ect`` arguments) and the words its
one-line refusal must contain. tests/test_hostile_corpus.py runs every case through the real CLI under
``ulimit -v`` 4 GB and a time limit: exit 2, one line, no traceback, no output, bounded time and memory.
The cases are our own, made here from the formats' byte layouts (pickle opcodes, tar, zip, JSON).
"""
from __future__ import annotations

import io
import json
import os
import shlex
import struct
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ect.errors import printable


@dataclass(frozen=True)
class Case:
    klass: str  # the defect class (docs/testing.md maps each to its test)
    make: Callable[[Path], tuple[list[str], str]]  # directory -> (ect arguments, words of the refusal)
    outputs: tuple = ("out.pt",)  # files that must not exist afterwards


# ---- pickle programs, byte by byte

def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def short_str(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + struct.pack("<I", len(raw)) + raw


def nested_tuple(depth: int) -> bytes:
    """A tuple nested ``depth`` deep: (((),),), one TUPLE1 over the last, with a constant stack."""
    return b")" + b"\x85" * depth


def snapshot_of(body: bytes) -> bytes:
    """A protocol-4 pickle of {'ema': <body>}."""
    return b"\x80\x04}" + short_str("ema") + body + b"s."


def deep_tuple_as_dict_key(d: Path):
    """A million-deep tuple as a key of a protocol-0 DICT: hashing it recursively overflows C's stack."""
    (d / "evil.pkl").write_bytes(b"\x80\x02(" + nested_tuple(1_000_000) + b"Nd.")
    return ["convert-edm", "evil.pkl", "out.pt"], "nested deeper than"


def deep_tuple_as_class(d: Path):
    """NEWOBJ of a deep tuple: a membership test of the class would hash it."""
    (d / "evil.pkl").write_bytes(b"\x80\x02" + nested_tuple(1_000_000) + b")\x81.")
    return ["convert-edm", "evil.pkl", "out.pt"], "nested deeper than"


def deep_tuple_as_dtype_name(d: Path):
    """numpy.dtype(<deep tuple>): a set lookup of the name would hash it."""
    (d / "evil.pkl").write_bytes(b"\x80\x02" + op_global("numpy", "dtype") + nested_tuple(100_000) + b"\x85R.")
    return ["convert-edm", "evil.pkl", "out.pt"], "nested deeper than"


def legacy_storage(elements: int) -> bytes:
    """A float storage in torch's legacy ``torch.save`` layout, as EDM's pickles embed them."""
    import warnings

    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(torch.zeros(elements).storage(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def memo_blob_referenced_often(d: Path):
    """An 8 MB storage blob, memoised once and handed to torch's storage loader 60 times: built once."""
    blob = legacy_storage(2 << 20)
    body = b"B" + struct.pack("<I", len(blob)) + blob + b"\x94"  # BINBYTES, MEMOIZE (index 0)
    calls = b"".join(op_global("torch.storage", "_load_from_bytes") + b"h\x00\x85R0" for _ in range(60))
    (d / "evil.pkl").write_bytes(b"\x80\x04" + body + b"0" + calls + b"}.")
    return ["convert-edm", "evil.pkl", "out.pt"], "refused"


def memo_string_referenced_often(d: Path):
    """One 1 MB memoised string as the source of 3,000 persistent objects: hashed once, not 3,000 times."""
    src = "x" * (1 << 20)
    program = [b"\x80\x04", short_str(src), b"\x94", b"0", b"]"]
    meta = (b"}(" + short_str("type") + short_str("class") + short_str("version") + b"K\x06" + short_str("module_src")
            + b"h\x00" + short_str("class_name") + short_str("Nope") + short_str("state") + b"}u")
    program += [b"(", *[op_global("torch_utils.persistence", "_reconstruct_persistent_obj") + meta + b"\x85R"
                        for _ in range(3000)], b"e.", ]
    (d / "evil.pkl").write_bytes(b"".join(program))
    return ["convert-edm", "evil.pkl", "out.pt"], "dict at top level"


def list_beyond_budget(d: Path):
    """Ten million Nones: more container slots than a file of this size may materialise."""
    (d / "evil.pkl").write_bytes(b"\x80\x04]" + (b"(" + b"N" * 500_000 + b"e") * 20 + b".")
    return ["convert-edm", "evil.pkl", "out.pt"], "would materialise more than"


def huge_integer(d: Path):
    (d / "evil.pkl").write_bytes(b"\x80\x04\x8b" + struct.pack("<i", 100_000) + b"\x01" * 100_000 + b".")
    return ["convert-edm", "evil.pkl", "out.pt"], "an integer of 100000 bytes"


def declared_length_past_the_end(d: Path):
    (d / "evil.pkl").write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc")
    return ["convert-edm", "evil.pkl", "out.pt"], "runs past the end"


def code_execution(d: Path):
    (d / "evil.pkl").write_bytes(b"\x80\x02" + op_global("posix", "system") + short_str("touch pwned") + b"\x85R.")
    return ["convert-edm", "evil.pkl", "out.pt"], "refusing to load global 'posix.system'"


# ---- CIFAR-10 batches (Python 2 pickles inside a tar.gz)

def cifar_tar(d: Path, batch: bytes, size: int | None = None) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(1, 6):
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(batch) if size is None else size
            tar.addfile(info, io.BytesIO(batch if size is None else b"\x00" * size))
    (d / "cifar.tar.gz").write_bytes(buf.getvalue())
    return d / "cifar.tar.gz"


def prepare(d: Path) -> list[str]:
    return ["prepare-data", "--source", "cifar10", "--resolution", "32", "--archive", "cifar.tar.gz", "--out",
            "out.npz", "--no-progress"]


def numpy_dtype_with_fields(d: Path):
    """The numpy dtype gadget: a dtype state with fields would reach numpy's setstate with an offset we chose."""
    state = b"(K\x03" + short_str("|") + b"N" + b"(" + short_str("a") + b"t" + b"}" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    batch = (b"\x80\x02" + op_global("numpy", "dtype") + short_str("u1") + b"\x89\x88\x87R" + state + b"b.")
    cifar_tar(d, batch)
    return prepare(d), "declares a byte order, fields or a subarray"


def numpy_object_array(d: Path):
    """An array whose data is a list: an object array, whose items numpy would unpickle."""
    array = (op_global("numpy.core.multiarray", "_reconstruct") + op_global("numpy", "ndarray") + b"K\x00\x85"
             + b"C\x01b\x87R" + b"(K\x01K\x02\x85" + op_global("numpy", "dtype") + short_str("u1") + b"\x89\x88\x87R"
             + b"\x89]tb")
    cifar_tar(d, b"\x80\x02}" + short_str("data") + array + b"s.")
    return prepare(d), "not bytes"


def numpy_array_larger_than_its_data(d: Path):
    array = (op_global("numpy.core.multiarray", "_reconstruct") + op_global("numpy", "ndarray") + b"K\x00\x85"
             + b"C\x01b\x87R" + b"(K\x01J\x00\x00\x00\x40K\x02\x86" + op_global("numpy", "dtype") + short_str("u1")
             + b"\x89\x88\x87R" + b"\x89C\x04abcdtb")
    cifar_tar(d, b"\x80\x02}" + short_str("data") + array + b"s.")
    return prepare(d), "needs"


def cifar_member_too_large(d: Path):
    cifar_tar(d, b"", size=64 << 20)
    return prepare(d), "is not a file of at most"


def cifar_deep_nesting(d: Path):
    cifar_tar(d, b"\x80\x02" + nested_tuple(1_000_000) + b".")
    return prepare(d), "nested deeper than"


# ---- the process boundary: sources that are not regular files, or too large

def source_dev_zero(d: Path):
    return ["convert-edm", "/dev/zero", "out.pt"], "not a regular file"


def source_fifo(d: Path):
    os.mkfifo(d / "fifo.pkl")
    return ["convert-edm", "fifo.pkl", "out.pt"], "not a regular file"


def source_directory(d: Path):
    (d / "dir.pkl").mkdir()
    return ["convert-edm", "dir.pkl", "out.pt"], "not a regular file"


def source_too_large(d: Path):
    with open(d / "huge.pkl", "wb") as f:
        f.truncate(9 << 30)  # sparse: 9 GB declared, nothing on disk
    return ["convert-edm", "huge.pkl", "out.pt"], "more than the"


def control_characters_in_a_name(d: Path):
    name = "evil\x1b[31m\n.pkl"
    (d / name).write_bytes(b"garbage")
    return ["convert-edm", name, "out.pt"], "evil\\x1b[31m\\n.pkl"


# ---- files an earlier step wrote, damaged: refused naming the file

def checkpoint_with_a_flipped_bit(d: Path):
    import torch

    buf = io.BytesIO()
    torch.save({"arch": {"kind": "edm"}, "state_dict": {"w": torch.zeros(4096)}, "meta": {}}, buf)
    data = bytearray(buf.getvalue())
    data[len(data) // 2] ^= 0x01
    (d / "tuned.pt").write_bytes(bytes(data))
    return ["sample", "--checkpoint", "tuned.pt", "--out", "out.npz", "--seeds", "0-1"], "fails its CRC check"


def statistics_with_nan(d: Path):
    meta = np.array(json.dumps({"modes": ["clean"], "feature_net_sha256": "x"}))
    np.savez(d / "ref.npz", mu_clean=np.zeros(4), sigma_clean=np.full((4, 4), np.nan), meta=meta)
    (d / "ours.npz").write_bytes((d / "ref.npz").read_bytes())
    np.savez(d / "theirs.npz", mu=np.zeros(4), sigma=np.eye(4))
    return ["reference-check", "--ours", "ref.npz", "--theirs", "theirs.npz", "--mode", "clean", "--out",
            "out.json"], "must be a finite float64 mean"


def published_statistics_of_the_wrong_shape(d: Path):
    np.savez(d / "ours.npz", mu_clean=np.zeros(4), sigma_clean=np.eye(4),
             meta=np.array(json.dumps({"modes": ["clean"]})))
    np.savez(d / "theirs.npz", mu=np.zeros(4), sigma=np.eye(5))
    return ["reference-check", "--ours", "ours.npz", "--theirs", "theirs.npz", "--mode", "clean", "--out",
            "out.json"], "mu and sigma must be finite floats"


def scaling_point_garbage(d: Path):
    (d / "p.json").write_text(json.dumps({"size": "s", "model": "s", "design": "prefix", "kimg": 1, "flops": "NaN", "sets": 1, "samples": 2}))
    return ["scaling-points", "out.csv", "p.json"], "'flops' is missing or malformed"


def scaling_point_not_json(d: Path):
    (d / "p.json").write_text('{"size": "s", "kimg": NaN}')
    return ["scaling-points", "out.csv", "p.json"], "cannot read scaling point"


def fid_curve_garbage(d: Path):
    (d / "curve.json").write_text(json.dumps({"samples": 2, "mode": "clean", "points": [{"snapshot": "../x.pt"}]}))
    (d / "c.yaml").write_text("run: x\n")
    return ["fid-budget", "--config", "c.yaml", "--curve", "curve.json", "--snapshots", ".", "--ref", "r.npz",
            "--feature-net", "f.pt", "--out", "out.json"], "c.yaml"


# ---- configs: YAML the parser itself cannot build, and values whose consequences overflow

TOY = Path(__file__).resolve().parents[1] / "config" / "config.yaml"


def config_overlay(d: Path, text: str) -> list[str]:
    """A step that reads the toy preset with ``text`` as an overlay (refused while reading the config)."""
    (d / "c.yaml").write_text(text)
    return ["sample", "--config", str(TOY), "c.yaml", "--set", "ect-1step", "--checkpoint", "x.pt", "--out", "out.npz"]


def yaml_deep_nesting(d: Path):
    return config_overlay(d, "x: " + "[" * 5000 + "]" * 5000 + "\n"), "nested deeper than"


def yaml_impossible_date(d: Path):
    return config_overlay(d, "tune: {kimg: 2001-13-45}\n"), "tune.kimg: '2001-13-45' is not of type 'number'"


def yaml_explicit_tag(d: Path):
    return config_overlay(d, "tune: {kimg: !!float abc}\n"), "YAML tags"


def yaml_huge_integer(d: Path):
    return config_overlay(d, "tune: {seed: " + "9" * 5000 + "}\n"), "an integer of 5000 digits"


def value_that_overflows_downstream(d: Path):
    return config_overlay(d, "tune: {kimg: 1.0e+306}\n"), "no setting is that large"


def required_value_null(d: Path):
    return config_overlay(d, "fid: {feature_net: {kind: inception, url: null, sha256: null}, modes: [clean]}\n"), \
        "'url' is a required property"


# ---- weights that claim more than the file holds; arrays that inflate; statistics that overflow

def shared_storage_snapshot(d: Path):
    """An EDM snapshot whose every weight is a view of one storage: the file holds one weight's bytes, the
    network its arch describes is many times larger."""
    import pickle

    import torch

    from ect import networks
    from tests import helpers

    kwargs = dict(model_channels=32, channel_mult=[1, 1, 1, 1], num_blocks=2, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):
        net = networks.Precond("edm", img_resolution=32, img_channels=3, **kwargs)
    storage = legacy_storage(max(p.numel() for p in net.state_dict().values()))

    class Shared:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (storage,)

    shared = Shared()

    class OneStorage(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, torch.Tensor):
                shape = tuple(obj.shape)
                strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
                return torch._utils._rebuild_tensor_v2, (shared, 0, shape, strides, False, None)
            return NotImplemented

    buf = io.BytesIO()
    with helpers.fake_torch_utils():
        OneStorage(buf, protocol=4).dump({"ema": helpers.edm_network(net.eval(), kwargs)})
    (d / "shared.pkl").write_bytes(buf.getvalue())
    return ["convert-edm", "shared.pkl", "out.pt"], "overlapping views of one storage"


def npz_member(archive, name: str, shape: tuple, chunk: bytes = b"", chunks: int = 0) -> None:
    """An .npy member declaring ``shape`` (float64), streamed: a header and ``chunks`` copies of ``chunk``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    with archive.open(name, "w", force_zip64=True) as member:
        member.write(header.getvalue())
        for _ in range(chunks):
            member.write(chunk)


def npz_decompression_bomb(d: Path):
    """A 7000 x 7000 covariance of zeros (under the size cap): 392 MB inflated from well under 1 MB."""
    import zipfile

    np.savez(d / "ours.npz", mu_clean=np.zeros(4), sigma_clean=np.eye(4),
             meta=np.array(json.dumps({"modes": ["clean"]})))
    with zipfile.ZipFile(d / "theirs.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        npz_member(archive, "mu.npy", (7000,), bytes(7000 * 8), 1)
        npz_member(archive, "sigma.npy", (7000, 7000), bytes(1_000_000), 7000 * 7000 * 8 // 1_000_000)
    return ["reference-check", "--ours", "ours.npz", "--theirs", "theirs.npz", "--mode", "clean", "--out",
            "out.json"], "fold (a decompression bomb?)"


def npz_header_larger_than_its_data(d: Path):
    """A member whose header declares 8 TB: numpy would allocate it before reading."""
    import zipfile

    with zipfile.ZipFile(d / "s.npz", "w") as archive:
        npz_member(archive, "images.npy", (2**40,))
    return ["merge-samples", "out.npz", "s.npz"], "declares 8,796,093,022,208 bytes but holds"


def statistics_that_overflow(d: Path):
    big = np.full((64, 64), 1e308)
    np.savez(d / "ours.npz", mu_clean=np.zeros(64), sigma_clean=big, meta=np.array(json.dumps({"modes": ["clean"]})))
    np.savez(d / "theirs.npz", mu=np.zeros(64), sigma=big)
    return ["reference-check", "--ours", "ours.npz", "--theirs", "theirs.npz", "--mode", "clean", "--out",
            "out.json"], "Frechet distance of these statistics is not"


def trust_record_is_the_output(d: Path):
    (d / "downloads.lock").write_text("{}\n")
    return ["fetch", "http://127.0.0.1:9/f", "--out", "downloads.lock", "--record", "downloads.lock"], \
        "refusing to write over it"


# ---- outputs

def output_is_an_input(d: Path):
    np.savez(d / "s.npz", images=np.zeros((2, 8, 8, 3), np.uint8), seeds=np.arange(2),
             meta=np.array(json.dumps({"set": "x"})))
    return ["merge-samples", "s.npz", "s.npz"], "refusing to write over it"


CASES = {
    "deep-tuple-dict-key": Case("strict reader: recursive hashing", deep_tuple_as_dict_key),
    "deep-tuple-class": Case("strict reader: recursive hashing", deep_tuple_as_class),
    "deep-tuple-dtype-name": Case("strict reader: recursive hashing", deep_tuple_as_dtype_name),
    "memo-blob-60-times": Case("strict reader: work repeated per reference", memo_blob_referenced_often),
    "memo-string-3000-times": Case("strict reader: work repeated per reference", memo_string_referenced_often),
    "list-beyond-budget": Case("strict reader: limits", list_beyond_budget),
    "huge-integer": Case("strict reader: limits", huge_integer),
    "length-past-the-end": Case("strict reader: limits", declared_length_past_the_end),
    "code-execution": Case("strict reader: allow-list", code_execution),
    "cifar-dtype-fields": Case("strict reader: the numpy dtype gadget (CIFAR-10)", numpy_dtype_with_fields,
                               ("out.npz",)),
    "cifar-object-array": Case("strict reader: numpy object arrays (CIFAR-10)", numpy_object_array, ("out.npz",)),
    "cifar-array-larger-than-data": Case("strict reader: limits (CIFAR-10)", numpy_array_larger_than_its_data,
                                         ("out.npz",)),
    "cifar-member-too-large": Case("process boundary: size caps (CIFAR-10)", cifar_member_too_large, ("out.npz",)),
    "cifar-deep-nesting": Case("strict reader: recursive hashing (CIFAR-10)", cifar_deep_nesting, ("out.npz",)),
    "source-dev-zero": Case("process boundary: not a regular file", source_dev_zero),
    "source-fifo": Case("process boundary: not a regular file", source_fifo),
    "source-directory": Case("process boundary: not a regular file", source_directory),
    "source-too-large": Case("process boundary: size caps", source_too_large),
    "control-characters": Case("errors: control characters escaped", control_characters_in_a_name),
    "flipped-checkpoint": Case("resume: checkpoints verified", checkpoint_with_a_flipped_bit, ("out.npz",)),
    "statistics-with-nan": Case("readers: reference statistics", statistics_with_nan, ("out.json",)),
    "published-statistics-shape": Case("readers: published statistics", published_statistics_of_the_wrong_shape,
                                       ("out.json",)),
    "scaling-point-garbage": Case("readers: scaling points", scaling_point_garbage, ("out.csv",)),
    "scaling-point-not-json": Case("readers: scaling points", scaling_point_not_json, ("out.csv",)),
    "fid-curve-config": Case("readers: configs before curves", fid_curve_garbage, ("out.json",)),
    "output-is-an-input": Case("outputs: an output that is an input", output_is_an_input, ()),
    "trust-record-is-the-output": Case("outputs: an output that is an input", trust_record_is_the_output, ()),
    "yaml-deep-nesting": Case("configs: YAML the parser cannot build", yaml_deep_nesting, ("out.npz",)),
    "yaml-impossible-date": Case("configs: YAML the parser cannot build", yaml_impossible_date, ("out.npz",)),
    "yaml-explicit-tag": Case("configs: YAML the parser cannot build", yaml_explicit_tag, ("out.npz",)),
    "yaml-huge-integer": Case("configs: YAML the parser cannot build", yaml_huge_integer, ("out.npz",)),
    "value-overflows-downstream": Case("configs: values bounded", value_that_overflows_downstream, ("out.npz",)),
    "required-value-null": Case("configs: values bounded", required_value_null, ("out.npz",)),
    "shared-storage-snapshot": Case("weights: claims beyond the bytes held", shared_storage_snapshot),
    "npz-decompression-bomb": Case("arrays: inflation bounded", npz_decompression_bomb, ("out.json",)),
    "npz-header-larger-than-data": Case("arrays: inflation bounded", npz_header_larger_than_its_data, ("out.npz",)),
    "statistics-that-overflow": Case("readers: reference statistics", statistics_that_overflow, ("out.json",)),
}


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    for name, case in CASES.items():
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        args, expected = case.make(directory)
        command = printable(" ".join(shlex.quote(a) for a in args))
        print(f"{name} [{case.klass}] (cd {directory} && ect {command})  -> refused with: {printable(expected)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

