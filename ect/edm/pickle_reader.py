"""Read EDM, EDM2 and ECT training snapshots (``*.pkl``) without executing anything from them.

A downloaded snapshot is written by an attacker until its checksum says otherwise, and even then we
never hand its contents to code that trusts them. EDM pickles its networks through
``torch_utils.persistence``: each layer reduces to ``_reconstruct_persistent_obj(meta)`` whose
``meta['module_src']`` is Python source that EDM's loader would ``exec``. We never do. The pickle runs
on our strict reader (``ect/safepickle.py``) with this format's allow-list, every global a handler of
ours that checks its arguments:

- a persistent object becomes a :class:`PersistentRecord` (its class name and state, the hash of its
  source); a ``ModuleDict`` a placeholder; a bound method only its name;
- tensors are checked views of storages that we parse ourselves from torch's legacy ``torch.save``
  layout (itself a few pickles, read with an allow-list of storage classes only): sizes, strides and
  offsets are checked against the bytes actually present before any tensor exists, so nothing
  allocates more than the file holds;
- numpy scalars come from a plain numeric dtype name and exactly that many bytes.

EDM2's files use fewer globals than EDM's: :data:`EDM2_GLOBALS`. Format facts: docs/method.md.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ect.errors import BadInput
from ect.safepickle import (
    LATIN1_BYTES,
    NUMPY_DTYPE,
    Buildable,
    DtypeSpec,
    Format,
    Handler,
    PickleRefused,
    Reader,
    describe,
    is_str,
    load,
    run_at,
)

PERSISTENCE_VERSION = 6
MAX_NAME = 200  # characters of a class or attribute name


class EDMFormatError(BadInput):
    """The file is not a readable EDM snapshot (truncated, corrupt, or an unexpected layout)."""


def _name(value, what: str) -> str:
    if not is_str(value) or not 0 < len(value) <= MAX_NAME:
        raise EDMFormatError(f"{what} must be a short string, not {describe(value)}")
    return value


# ---------------------------------------------------------------------------------------------
# What the allowed globals resolve to: records and checked rebuilds, never the real constructors.

@dataclass
class PersistentRecord:
    """What EDM's ``_reconstruct_persistent_obj`` would have rebuilt, kept as data."""

    class_name: str
    version: int
    module_src_sha256: str
    state: dict = field(repr=False)

    def pickle_children(self):
        return [self.state]


def _source_hash(r: Reader, src: str) -> str:
    """sha256 of a persistent class's source, once per string however often the pickle refers to it."""
    key = ("source-sha256", id(src))
    if key not in r.cache:
        r.charge(len(src), "hashing a class's source")
        r.cache[key] = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
        r.keep.append(src)
    return r.cache[key]


def _reconstruct_persistent_obj(r: Reader, meta):
    if type(meta) is dict and not meta:
        # A persistent object that refers to itself (ECT's loss pickles a bound method of itself):
        # the inner reference is rebuilt while its meta dict is still empty. Only 'ema' matters.
        return PersistentRecord("<self-reference>", PERSISTENCE_VERSION, "", {})
    if type(meta) is not dict or meta.get("type") != "class":
        raise EDMFormatError(f"persistent object meta is not an EDM class record: {describe(meta)}")
    if meta.get("version") != PERSISTENCE_VERSION or type(meta.get("version")) is not int:
        raise EDMFormatError(f"EDM persistence version {describe(meta.get('version'))}, expected {PERSISTENCE_VERSION}")
    src = meta.get("module_src") or ""
    if not is_str(src):
        raise EDMFormatError(f"persistent object module_src is {describe(src)}, not source text")
    state = meta.get("state")
    if type(state) is not dict:
        raise EDMFormatError(f"persistent object {describe(meta.get('class_name'))} has no state dict")
    return PersistentRecord(_name(meta.get("class_name"), "persistent class name"), PERSISTENCE_VERSION,
                            _source_hash(r, src), state)


class PickledModuleDict(Buildable):
    """Stand-in for ``torch.nn.ModuleDict``, pickled the ordinary way: NEWOBJ creates it, BUILD hands it the
    module's ``__dict__``."""

    def __init__(self):
        self.state: dict = {}

    def pickle_state(self, reader: Reader, state) -> None:
        if type(state) is not dict:
            raise EDMFormatError(f"ModuleDict state is {describe(state)}, not a dict")
        self.state = state

    def pickle_children(self):
        return [self.state]


@dataclass
class BoundMethodPlaceholder:
    """ECT snapshots pickle a bound method of the loss via ``getattr``; we keep only its name and never look
    anything up."""

    name: str


def _scalar(r: Reader, dtype, data=None):
    """``numpy.core.multiarray.scalar``: exactly itemsize bytes of a plain numeric dtype."""
    if not isinstance(dtype, DtypeSpec):
        raise PickleRefused(f"numpy scalar of {describe(dtype)} (not a plain numeric dtype) is refused")
    real = dtype.dtype()
    if data is None:
        return real.type().item()
    if type(data) is not bytes or len(data) != real.itemsize:
        raise EDMFormatError(f"numpy {dtype.name} scalar needs {real.itemsize} bytes, got {describe(data)}")
    return np.frombuffer(data, dtype=real, count=1)[0].item()


def _getattr(r: Reader, obj, name):
    return BoundMethodPlaceholder(_name(name, "getattr name"))


def _ordered_dict(r: Reader, items=()):
    if type(items) not in (tuple, list) or len(items):
        raise PickleRefused("OrderedDict(...) with arguments is not how EDM snapshots store it")
    return {}  # a dict keeps its order; SETITEMS fills it


# ---------------------------------------------------------------------------------------------
# Tensors: storages from torch's legacy save layout, parsed here; tensors as checked views of them.

STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ByteStorage": torch.uint8, "BoolStorage": torch.bool}
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


@dataclass
class StorageBlob:
    """A storage's elements as a flat tensor (its own copy of the bytes)."""

    data: torch.Tensor


def _storage_reference(r: Reader, pid):
    """The persistent id of a legacy storage: ('storage', type, key, location, numel, view)."""
    if not (type(pid) is tuple and len(pid) == 6 and is_str(pid[0]) and pid[0] == "storage"):
        raise PickleRefused(f"tensor storage reference {describe(pid)} is not a plain storage")
    _, storage_type, key, location, numel, view = pid
    if type(storage_type) is not Handler or storage_type.name not in STORAGE_DTYPES or view is not None:
        raise PickleRefused("tensor storage reference of an unknown type, or a view of another storage")
    if type(numel) is not int or numel < 0 or not is_str(location):
        raise EDMFormatError(f"tensor storage of {describe(numel)} elements at {describe(location)}")
    return (_name(key, "storage key"), STORAGE_DTYPES[storage_type.name], numel)


LEGACY_STORAGE = Format("a torch storage blob", {("torch", name): Handler(name) for name in STORAGE_DTYPES},
                        persistent=_storage_reference)


def _storage_from_bytes(r: Reader, blob):
    """``torch.storage._load_from_bytes``: a complete legacy ``torch.save`` of one storage, parsed by us.

    Layout: three header pickles (magic number, protocol version, system info), a pickle whose value is
    a persistent reference to the storage (type, key, device, number of elements), a pickle of the
    storage keys, then per key an 8-byte little-endian element count and the raw elements."""
    if type(blob) is not bytes:
        raise EDMFormatError(f"tensor storage is {describe(blob)}, not bytes")
    inner = Reader(blob, LEGACY_STORAGE, budget=max(r.budget - r.spent, 0))
    pos, values = 0, []
    for _ in range(5):
        value, pos = run_at(inner, pos)
        values.append(value)
    magic, protocol, info, ref, keys = values
    if type(magic) is not int or magic != LEGACY_MAGIC or type(protocol) is not int or protocol != LEGACY_PROTOCOL \
            or type(info) is not dict:
        raise EDMFormatError("tensor storage blob has no torch legacy-format header")
    if info.get("little_endian") is not True:
        raise EDMFormatError("tensor storage blob is big-endian: not supported")
    if type(ref) is not tuple or len(ref) != 3 or type(keys) is not list or len(keys) != 1 or keys[0] != ref[0]:
        raise EDMFormatError("tensor storage blob does not hold exactly one storage")
    _, dtype, numel = ref
    element_size = torch.empty((), dtype=dtype).element_size()
    header, remaining = blob[pos:pos + 8], len(blob) - pos - 8
    if len(header) != 8 or int.from_bytes(header, "little") != numel or numel * element_size > remaining:
        raise EDMFormatError(f"tensor storage declares {numel} elements but the blob holds {max(remaining, 0)} bytes")
    r.charge(numel * element_size, "a tensor storage")
    data = bytearray(memoryview(blob)[pos + 8:pos + 8 + numel * element_size])  # one copy, writable
    return StorageBlob(torch.frombuffer(data, dtype=dtype) if numel else torch.empty(0, dtype=dtype))


def _ints(value, what: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list) or len(value) > 8 or \
            not all(type(v) is int and 0 <= v < 2**40 for v in value):
        raise EDMFormatError(f"tensor {what} must be up to 8 non-negative integers, got {describe(value)}")
    return tuple(value)


def _rebuild_tensor_v2(r: Reader, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """A tensor as a view of a parsed storage, after checking that it lies inside it and is contiguous."""
    if not isinstance(storage, StorageBlob):
        raise PickleRefused(f"tensor rebuilt from {describe(storage)}, not a tensor storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(storage_offset) is not int or storage_offset < 0 or len(stride) != len(size):
        raise EDMFormatError("tensor offset or strides do not match its size")
    contiguous = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    if any(n > 1 and s != c for n, s, c in zip(size, stride, contiguous, strict=True)):
        raise EDMFormatError(f"tensor of size {size} with strides {stride} is not contiguous: refused")
    numel = math.prod(size)
    if storage_offset + numel > storage.data.numel():
        raise EDMFormatError(f"tensor of {numel} elements at offset {storage_offset} lies outside its storage of "
                             f"{storage.data.numel()} elements")
    if not (backward_hooks is None or (type(backward_hooks) is dict and not backward_hooks)) \
            or type(requires_grad) is not bool:
        raise EDMFormatError("tensor carries backward hooks or a malformed requires_grad")
    return storage.data[storage_offset:storage_offset + numel].view(size)


def _rebuild_parameter(r: Reader, data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise PickleRefused(f"parameter rebuilt from {describe(data)}, not a tensor")
    return data


EDM_GLOBALS = {  # everything an EDM (CIFAR-10) or ECT snapshot references
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): Handler("persistent object",
                                                                       call=_reconstruct_persistent_obj, pure=False),
    ("torch._utils", "_rebuild_tensor_v2"): Handler("tensor", call=_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): Handler("parameter", call=_rebuild_parameter),
    ("torch.storage", "_load_from_bytes"): Handler("storage", call=_storage_from_bytes),
    ("collections", "OrderedDict"): Handler("OrderedDict", call=_ordered_dict, pure=False),
    ("torch.nn.modules.container", "ModuleDict"): Handler("ModuleDict", new=lambda r: PickledModuleDict()),
    ("numpy.core.multiarray", "scalar"): Handler("numpy scalar", call=_scalar),
    ("numpy._core.multiarray", "scalar"): Handler("numpy scalar", call=_scalar),
    ("numpy", "dtype"): NUMPY_DTYPE,
    ("dnnlib.util", "EasyDict"): Handler("EasyDict", new=lambda r: {}),
    ("builtins", "getattr"): Handler("getattr", call=_getattr, pure=False),
    ("_codecs", "encode"): LATIN1_BYTES,
}
EDM_SNAPSHOT = Format("an EDM snapshot", EDM_GLOBALS)
# Everything an EDM2 snapshot or post-hoc reconstruction references (ECT's ImageNet ones too): a file that
# calls itself EDM2 but reaches for anything else of the EDM allow-list (numpy, getattr) is refused.
EDM2_GLOBALS = {("dnnlib.util", "EasyDict"), ("torch_utils.persistence", "_reconstruct_persistent_obj"),
                ("collections", "OrderedDict"), ("torch._utils", "_rebuild_parameter"),
                ("torch._utils", "_rebuild_tensor_v2"), ("torch.storage", "_load_from_bytes"),
                ("torch.nn.modules.container", "ModuleDict")}


def load_edm_pickle(data, globals_used: set | None = None) -> dict:
    """Unpickle an EDM/EDM2/ECT snapshot's bytes into plain data and :class:`PersistentRecord` s; the globals
    it referenced are added to ``globals_used``."""
    obj = load(data, EDM_SNAPSHOT, used=globals_used)
    if type(obj) is not dict:
        raise EDMFormatError(f"EDM snapshot must be a dict at top level, found {describe(obj)}")
    return obj


# ---------------------------------------------------------------------------------------------
# Walking the network: its state dict, bounded in depth and size, each module visited once.

MAX_DEPTH = 64
MAX_MODULES = 100_000


def _children(state: dict) -> dict:
    modules = state.get("_modules") or {}
    if type(modules) is not dict:
        raise EDMFormatError(f"module '_modules' is {describe(modules)}, not a dict")
    return modules


def _node_state(node) -> dict:
    if type(node) in (PersistentRecord, PickledModuleDict):
        return node.state
    raise EDMFormatError(f"unexpected object in the network tree: {describe(node)}")


def record_state_dict(root) -> dict[str, torch.Tensor]:
    """Reproduce ``module.state_dict()`` from a pickled module tree, by walking its states."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    pending = [(root, "", 0)]
    while pending:
        node, prefix, depth = pending.pop()
        if depth > MAX_DEPTH or len(seen) >= MAX_MODULES:
            raise EDMFormatError("the network tree is deeper or larger than any EDM network")
        if id(node) in seen:
            raise EDMFormatError(f"module {prefix[:MAX_NAME]!r} appears twice in the network tree")
        seen.add(id(node))
        state = _node_state(node)
        non_persistent = state.get("_non_persistent_buffers_set") or set()
        if type(non_persistent) not in (set, frozenset):
            raise EDMFormatError("module '_non_persistent_buffers_set' is not a set")
        for kind in ("_parameters", "_buffers"):
            tensors = state.get(kind) or {}
            if type(tensors) is not dict:
                raise EDMFormatError(f"module '{kind}' is {describe(tensors)}, not a dict")
            for name, value in tensors.items():
                if value is None or (kind == "_buffers" and name in non_persistent):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise EDMFormatError(f"{prefix}{name} is {describe(value)}, not a tensor")
                out[prefix + _name(name, "tensor name")] = value.detach()
        for name, child in reversed(list(_children(state).items())):
            if child is not None:
                pending.append((child, f"{prefix}{_name(name, 'module name')}.", depth + 1))
    return out


def find_child(root, name: str):
    child = _children(_node_state(root)).get(name)
    if child is None:
        raise EDMFormatError(f"network has no submodule {name!r}")
    return child
