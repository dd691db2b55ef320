"""`ect convert-edm` against a corpus of hostile pickles, whole classes of attack rather than single files.

Each file is converted by the real command in its own process, under `ulimit -v` 4 GB and a 10 s limit:
it must be refused with one line naming the reason, exit 2, no traceback, no output file and nothing run.
Classes: code execution through globals; numpy gadgets (dtype state, scalars); tensor and storage
rebuilds that would read out of bounds or allocate more than the file holds; amplification (exponential
reprs, deep or shared module trees, dict hash collisions); malformed architectures and weights; and
pickle opcodes EDM snapshots never use.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ect.networks import build_network
from tests.helpers import (
    Persistent,
    edm_network,
    edm_snapshot_bytes,
    fake_torch_utils,
    malicious_pickle,
    randomized,
    small_unet_kwargs,
)

LIMIT_KB, LIMIT_S = 4_000_000, 10


class Reduce:
    """Pickles as ``func(*args)``, then BUILD ``state`` when given."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)

    def __call__(self):  # pickle asks a reduce's callable to be callable; this one is pickled, never called
        raise AssertionError("never called")


def snapshot(ema) -> bytes:
    with fake_torch_utils():
        return pickle.dumps({"ema": ema}, protocol=4)


def legacy_blob(declared: int, data: bytes, storage="FloatStorage", magic=0x1950A86A20F9469CFC6C,
                little_endian=True, extra_global=None) -> bytes:
    """A storage in torch's legacy save layout, with whatever header, declared size and data we like."""
    f = io.BytesIO()
    for header in (magic, 1001, {"protocol_version": 1001, "little_endian": little_endian,
                                 "type_sizes": {"short": 2, "int": 4, "long": 8}}):
        pickle.dump(header, f, protocol=2)
    storage_type = getattr(torch, storage)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage_type, "0", "cpu", declared, None) if obj == "STORAGE" else None

    Pickler(f, protocol=2).dump(extra_global if extra_global is not None else "STORAGE")
    pickle.dump(["0"], f, protocol=2)
    f.write(declared.to_bytes(8, "little") + data)
    return f.getvalue()


def storage(declared=4, data=None, **kw):
    return Reduce(torch.storage._load_from_bytes, (legacy_blob(declared, data if data is not None else
                                                               b"\0" * 4 * declared, **kw),))


def tensor(size, stride, offset=0, store=None):
    return Reduce(torch._utils._rebuild_tensor_v2,
                  (store or storage(), offset, size, stride, False, collections.OrderedDict()))


def dtype_with_state(name, state):
    return Reduce(np.dtype, (name, False, True), state)


def nested_lists(depth):
    """A list that is 2**depth lists when walked or printed, in a few hundred bytes."""
    x = [0]
    for _ in range(depth):
        x = [x, x]
    return x


def network(model_channels=16, **overrides):
    kwargs = small_unet_kwargs(model_channels=model_channels)
    net = randomized(build_network(dict(kind="edm", img_resolution=8, img_channels=3, **kwargs)))
    return net, kwargs


def with_unet_kwargs(**kwargs_overrides):
    """A valid small EDM network whose SongUNet records other constructor kwargs than its weights have."""
    net, kwargs = network()
    ema = edm_network(net, kwargs)
    ema.meta["state"]["_modules"]["model"].meta["state"]["_init_kwargs"].update(kwargs_overrides)
    return snapshot(ema)


def deep_modules(depth):
    node = Persistent("GroupNorm", {"_parameters": {}, "_buffers": {}, "_modules": {}})
    for _ in range(depth):
        node = Persistent("Linear", {"_parameters": {}, "_buffers": {}, "_modules": {"child": node}})
    net, kwargs = network()
    ema = edm_network(net, kwargs)
    ema.meta["state"]["_modules"]["model"].meta["state"]["_modules"]["deep"] = node
    return snapshot(ema)


def shared_module():
    net, kwargs = network()
    ema = edm_network(net, kwargs)
    modules = ema.meta["state"]["_modules"]["model"].meta["state"]["_modules"]
    modules["map_layer1"] = modules["map_layer0"]  # the same record twice: a DAG, not a tree
    return snapshot(ema)


def raw(opcodes: bytes) -> bytes:
    return b"\x80\x04" + opcodes + b"."


def then(obj, opcodes: bytes) -> bytes:
    """A pickle of ``obj`` followed by more opcodes that act on it (before STOP)."""
    return pickle.dumps(obj, protocol=4)[:-1] + opcodes + b"."


def int_keyed_dict(n: int) -> bytes:
    """A dict whose n integer keys all hash alike (multiples of 2**61 - 1): quadratic to build in Python."""
    keys = (i * (2**61 - 1) for i in range(1, n + 1))
    items = b"".join(b"\x8a" + bytes([16]) + k.to_bytes(16, "little", signed=True) + b"K\x00" for k in keys)
    return raw(b"}(" + items + b"u")


CORPUS = {  # name -> (the file, given where a payload would leave a trace; what the refusal must say)
    # code execution through globals
    "os-system": (lambda m: malicious_pickle(os.system, f"touch {m}"), "refusing to load global"),
    "exec": (lambda m: malicious_pickle(exec, f"open({str(m)!r}, 'w')"), "builtins.exec"),
    "eval": (lambda m: malicious_pickle(eval, f"open({str(m)!r}, 'w')"), "builtins.eval"),
    "popen": (lambda m: malicious_pickle(subprocess.Popen, ["touch", str(m)]), "subprocess.Popen"),
    "import": (lambda m: malicious_pickle(__import__, "os"), "builtins.__import__"),
    "getattr-gadget": (lambda m: snapshot(Reduce(Reduce(getattr, (collections.OrderedDict(), "__init__")), ())),
                       "refusing to call"),
    "other-class": (lambda m: pickle.dumps({"ema": collections.Counter()}, protocol=2), "not on this format's allow-list"),
    # numpy gadgets: attacker state never reaches numpy's dtype.__setstate__ or scalar()
    "dtype-object": (lambda m: snapshot(dtype_with_state("O", None)), "not a plain numeric type"),
    "dtype-object-field": (lambda m: snapshot(dtype_with_state(
        "f8", (3, "|", None, ("a",), {"a": (np.dtype("f8"), 0)}, 8, 1, 0x3F))), "fields or a subarray"),
    "dtype-field-offset": (lambda m: snapshot(Reduce(np._core.multiarray.scalar, (dtype_with_state(
        "f8", (3, "|", None, ("a",), {"a": (np.dtype("f8"), 2**40)}, 8, 1, 0)), b"\0" * 8))),
        "fields or a subarray"),
    "dtype-big-endian": (lambda m: snapshot(dtype_with_state("f8", (3, ">", None, None, None, -1, -1, 0))),
                         "byte order"),
    "scalar-short-bytes": (lambda m: snapshot(Reduce(np._core.multiarray.scalar, (np.dtype("f8"), b"\0" * 3))),
                           "needs 8 bytes"),
    "scalar-of-a-string": (lambda m: snapshot(Reduce(np._core.multiarray.scalar, ("f8", b"\0" * 8))),
                           "not a plain numeric dtype"),
    # tensors and storages: checked against the bytes present before anything is allocated
    "storage-claims-2**40": (lambda m: snapshot(tensor((4,), (1,), store=storage(declared=2**40, data=b"\0" * 16))),
                             "declares"),
    "storage-global": (lambda m: snapshot(storage(extra_global=os.system)), "a torch storage blob: refusing to load global"),
    "storage-bad-magic": (lambda m: snapshot(storage(magic=12345)), "legacy-format header"),
    "storage-big-endian": (lambda m: snapshot(storage(little_endian=False)), "big-endian"),
    "tensor-stride-0": (lambda m: snapshot(tensor((2**30, 2**10), (0, 0))), "not contiguous"),
    "tensor-out-of-bounds": (lambda m: snapshot(tensor((4,), (1,), offset=2**30)), "outside its storage"),
    "tensor-huge": (lambda m: snapshot(tensor((2**39, 2**39), (2**39, 1))), "outside its storage"),
    "tensor-negative-size": (lambda m: snapshot(tensor((-4,), (1,))), "non-negative integers"),
    "build-on-a-tensor": (lambda m: snapshot(Reduce(torch._utils._rebuild_tensor_v2,
                                                    (storage(), 0, (4,), (1,), False, collections.OrderedDict()),
                                                    state=(None, {"x": 1}))), "set the state of a Tensor"),
    "build-on-a-dict": (lambda m: raw(b"}}b"), "set the state of a dict"),
    "setitems-on-a-tensor": (lambda m: then(tensor((4,), (1,)), b"(K\x00K\x01u"), "only dicts take items"),
    # amplification: nothing walks, prints or hashes attacker structures without bounds
    "exponential-class-name": (lambda m: snapshot(Persistent(nested_lists(60), {})), "short string"),
    "exponential-kwarg": (lambda m: with_unet_kwargs(model_channels=nested_lists(60)), "not a number"),
    "deep-module-tree": (lambda m: deep_modules(100), "nested deeper than"),
    "deep-nesting": (lambda m: raw(b"]" * 100_000 + b"a" * 99_999), "nested deeper than"),
    "shared-module": (lambda m: shared_module(), "appears twice"),
    "int-keyed-dict": (lambda m: int_keyed_dict(50_000), "keys dicts by name"),
    "huge-int-literal": (lambda m: b"L" + b"9" * 100_000 + b"L\n.", "LONG (protocol-0 text)"),
    # architectures and weights: kwargs validated, shapes compared before a network is built
    "model-channels-100000": (lambda m: with_unet_kwargs(model_channels=100_000), "model_channels"),
    "channel-mult-string": (lambda m: with_unet_kwargs(channel_mult="abc"), "channel_mult"),
    "weights-of-another-net": (lambda m: with_unet_kwargs(model_channels=32), "shape"),
    "resolution-not-halvable": (lambda m: with_unet_kwargs(channel_mult=[1, 2, 2, 2, 2]), "cannot be halved"),
    # opcodes EDM snapshots never use
    "persistent-id": (lambda m: raw(b"\x8c\x01xQ"), "persistent ids"),
    "inst-opcode": (lambda m: b"(iposix\nsystem\n.", "INST"),
    "text-memo": (lambda m: b"(lp0\n.", "PUT"),
    "truncated": (lambda m: edm_snapshot_bytes(*network())[:5000], "truncated"),
}


def convert(src, dst):
    """`ect convert-edm` in its own process, under the memory and time limits."""
    cmd = f"ulimit -v {LIMIT_KB}; exec timeout {LIMIT_S} {sys.executable} -m ect.cli convert-edm \"$0\" \"$1\""
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd, str(src), str(dst)], capture_output=True, text=True)
    return proc, time.perf_counter() - start


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_a_hostile_pickle_is_refused_in_one_line_quickly_and_writes_nothing(name, tmp_path):
    make, reason = CORPUS[name]
    marker = tmp_path / "pwned"
    blob = make(marker)
    src, dst = tmp_path / "evil.pkl", tmp_path / "out.pt"
    src.write_bytes(blob)
    proc, seconds = convert(src, dst)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert reason in lines[0], lines[0]
    assert len(lines[0]) < 600
    assert seconds < LIMIT_S
    assert not dst.exists() and not marker.exists() and os.listdir(tmp_path) == ["evil.pkl"]


def test_a_genuine_snapshot_converts_under_the_same_limits(tmp_path):
    for class_name in ("EDMPrecond", "ECMPrecond"):
        net, kwargs = network()
        src, dst = tmp_path / f"{class_name}.pkl", tmp_path / f"{class_name}.pt"
        src.write_bytes(edm_snapshot_bytes(net, kwargs, class_name=class_name))
        proc, _ = convert(src, dst)
        assert proc.returncode == 0, proc.stderr
        weights = torch.load(dst, weights_only=True)["state_dict"]
        assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
