"""Read EDM / ECT training snapshots (``*.pkl``) without executing anything from them.

A downloaded snapshot is written by an attacker until its checksum says otherwise, and even then we
never hand its contents to code that trusts them. EDM pickles its networks through
``torch_utils.persistence``: each layer reduces to ``_reconstruct_persistent_obj(meta)`` whose
``meta['module_src']`` is Python source that EDM's loader would ``exec``. We never do. The pickle is
read by our own subclass of Python's pure-Python unpickler in which every opcode that could call or
mutate something is checked:

- a global resolves only through an allow-list, to functions and classes of ours (never numpy's or
  torch's constructors);
- REDUCE and NEWOBJ call only those; BUILD applies state only to our own placeholder objects, never
  to a numpy dtype or a torch tensor (whose ``__setstate__`` trusts its input);
- SETITEMS/APPENDS/ADDITEMS act only on plain dicts, lists and sets, with string keys (so no
  hash-collision slowdowns); protocol-0 class and text-memo opcodes and persistent ids are refused;
- tensors are rebuilt from a storage blob that we parse ourselves (torch's legacy ``torch.save``
  layout): sizes, strides and offsets are checked against the bytes actually present before any
  tensor exists, so nothing allocates more than the file holds;
- numpy scalars come from a plain numeric dtype name and exactly that many bytes.

Every refusal raises :class:`UnsafePickleError` or :class:`EDMFormatError` with a message that names
the reason but never prints attacker data beyond a short, bounded excerpt. Format facts: docs/method.md.
"""
from __future__ import annotations

import codecs
import collections
import hashlib
import io
import math
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch

PERSISTENCE_VERSION = 6
MAX_DICT_ITEMS = 1_000_000  # far above any EDM snapshot's; a bound on work per opcode
MAX_NAME = 200  # characters of a class or attribute name


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something outside what EDM snapshots contain; nothing from it was run."""


class EDMFormatError(ValueError):
    """The file is not a readable EDM snapshot (truncated, corrupt, or an unexpected layout)."""


def describe(value, limit: int = 60) -> str:
    """A short description of an untrusted value: its type, and a bounded excerpt of a str/int/bytes.
    Never ``repr`` of a container (a pickle can build a DAG whose repr is exponentially long)."""
    if isinstance(value, (str, bytes)):
        text = value[:limit]
        return f"{type(value).__name__} {text!r}{'...' if len(value) > limit else ''}"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return f"int of {value.bit_length()} bits" if value.bit_length() > 64 else f"int {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    return f"a {type(value).__name__}"


def _name(value, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
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


def _reconstruct_persistent_obj(meta):
    if isinstance(meta, dict) and not meta:
        # A persistent object that refers to itself (ECT's loss pickles a bound method of itself):
        # the inner reference is rebuilt while its meta dict is still empty. Only 'ema' matters.
        return PersistentRecord("<self-reference>", PERSISTENCE_VERSION, "", {})
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise EDMFormatError(f"persistent object meta is not an EDM class record: {describe(meta)}")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise EDMFormatError(f"EDM persistence version {describe(meta.get('version'))}, expected {PERSISTENCE_VERSION}")
    src = meta.get("module_src") or ""
    if not isinstance(src, str):
        raise EDMFormatError(f"persistent object module_src is {describe(src)}, not source text")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise EDMFormatError(f"persistent object {describe(meta.get('class_name'))} has no state dict")
    return PersistentRecord(_name(meta.get("class_name"), "persistent class name"), PERSISTENCE_VERSION,
                            hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest(), state)


class PickledModuleDict:
    """Stand-in for ``torch.nn.ModuleDict``, pickled the ordinary way: NEWOBJ creates it, BUILD
    hands it the module's ``__dict__``."""

    state: dict = {}  # replaced (never mutated) by __setstate__

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise EDMFormatError(f"ModuleDict state is {describe(state)}, not a dict")
        self.state = state


class BoundMethodPlaceholder:
    """ECT snapshots pickle a bound method of the loss via ``getattr``; we keep only its name and
    never look anything up."""

    def __init__(self, obj, name):
        self.name = _name(name, "getattr name")


# numpy dtype names a snapshot's scalars may use: plain numbers only (no objects, fields, subarrays).
NUMERIC_DTYPES = {f"{kind}{size}" for kind, sizes in (("f", (2, 4, 8)), ("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8)))
                  for size in sizes} | {"b1"}


class DtypeSpec:
    """Stand-in for ``numpy.dtype(name, align, copy)``: a plain numeric dtype by name. The state that
    pickle's BUILD hands a dtype is checked here and never reaches numpy's ``__setstate__``."""

    def __init__(self, name, align=False, copy=True):
        if name not in NUMERIC_DTYPES:
            raise UnsafePickleError(f"numpy dtype {describe(name)} is not a plain numeric type; refusing it")
        self.name, self.byteorder = name, "<" if name not in ("i1", "u1", "b1") else "|"

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags) for a plain number
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise UnsafePickleError(f"numpy dtype state {describe(state)} is not that of a plain number")
        byteorder, subarray, names, fields = state[1:5]
        if byteorder not in ("<", "|", "=") or subarray is not None or names is not None or fields is not None:
            raise UnsafePickleError("numpy dtype state declares a byte order, fields or a subarray: refused "
                                    "(only plain little-endian numbers are read)")
        if state[5] not in (-1, int(self.name[1:])) or state[6] not in (-1, int(self.name[1:])):
            raise UnsafePickleError("numpy dtype state declares a size that is not its type's")

    def dtype(self) -> np.dtype:
        return np.dtype(self.byteorder + self.name)


def _scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar``: exactly itemsize bytes of a plain numeric dtype."""
    if not isinstance(dtype, DtypeSpec):
        raise UnsafePickleError(f"numpy scalar of {describe(dtype)} (not a plain numeric dtype) is refused")
    real = dtype.dtype()
    if data is None:
        return real.type()
    if not isinstance(data, bytes) or len(data) != real.itemsize:
        raise EDMFormatError(f"numpy {dtype.name} scalar needs {real.itemsize} bytes, got {describe(data)}")
    return np.frombuffer(data, dtype=real, count=1)[0].item()


def _codecs_encode(text, encoding="utf-8"):
    """Protocol 2 pickles bytes as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError("_codecs.encode is allowed only for latin-1 text (protocol-2 bytes)")
    return codecs.encode(text, "latin1")


# ---------------------------------------------------------------------------------------------
# Tensors: storages from torch's legacy save layout, parsed here; tensors as checked views of them.

STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ByteStorage": torch.uint8, "BoolStorage": torch.bool}
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


@dataclass(frozen=True)
class StorageType:
    dtype: torch.dtype


@dataclass
class StorageBlob:
    """A storage's elements as a flat tensor (its own copy of the bytes)."""

    data: torch.Tensor


def _storage_from_bytes(blob):
    """``torch.storage._load_from_bytes``: a complete legacy ``torch.save`` of one storage, parsed by us.

    Layout: three header pickles (magic number, protocol version, system info), a pickle whose value is
    a persistent reference to the storage (type, key, device, number of elements), a pickle of the
    storage keys, then per key an 8-byte little-endian element count and the raw elements."""
    if not isinstance(blob, bytes):
        raise EDMFormatError(f"tensor storage is {describe(blob)}, not bytes")
    f = io.BytesIO(blob)
    magic, protocol, info = (_LegacyUnpickler(f).load() for _ in range(3))
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL or not isinstance(info, dict):
        raise EDMFormatError("tensor storage blob has no torch legacy-format header")
    if info.get("little_endian") is not True:
        raise EDMFormatError("tensor storage blob is big-endian: not supported")
    ref = _LegacyUnpickler(f).load()
    keys = _LegacyUnpickler(f).load()
    if not isinstance(ref, tuple) or len(ref) != 3 or not isinstance(keys, list) or keys != [ref[0]]:
        raise EDMFormatError("tensor storage blob does not hold exactly one storage")
    key, dtype, numel = ref
    element_size = torch.empty((), dtype=dtype).element_size()
    header = f.read(8)
    remaining = len(blob) - f.tell()
    if len(header) != 8 or int.from_bytes(header, "little") != numel or numel * element_size > remaining:
        raise EDMFormatError(f"tensor storage declares {numel} elements but the blob holds {remaining} bytes")
    data = bytearray(memoryview(blob)[f.tell():f.tell() + numel * element_size])  # one copy, writable
    return StorageBlob(torch.frombuffer(data, dtype=dtype) if numel else torch.empty(0, dtype=dtype))


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 8 or \
            not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40 for v in value):
        raise EDMFormatError(f"tensor {what} must be up to 8 non-negative integers, got {describe(value)}")
    return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """A tensor as a view of a parsed storage, after checking that it lies inside it and is contiguous."""
    if not isinstance(storage, StorageBlob):
        raise UnsafePickleError(f"tensor rebuilt from {describe(storage)}, not a tensor storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if not isinstance(storage_offset, int) or storage_offset < 0 or len(stride) != len(size):
        raise EDMFormatError("tensor offset or strides do not match its size")
    contiguous = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    if any(n > 1 and s != c for n, s, c in zip(size, stride, contiguous, strict=True)):
        raise EDMFormatError(f"tensor of size {size} with strides {stride} is not contiguous: refused")
    numel = math.prod(size)
    if storage_offset + numel > storage.data.numel():
        raise EDMFormatError(f"tensor of {numel} elements at offset {storage_offset} lies outside its storage of "
                             f"{storage.data.numel()} elements")
    if backward_hooks not in (None, {}) or not isinstance(requires_grad, bool):
        raise EDMFormatError("tensor carries backward hooks or a malformed requires_grad")
    return storage.data[storage_offset:storage_offset + numel].view(size)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"parameter rebuilt from {describe(data)}, not a tensor")
    return data


def _ordered_dict(items=()):
    if items not in ((), []):
        raise UnsafePickleError("OrderedDict(...) with arguments is not how EDM snapshots store it")
    return collections.OrderedDict()


ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch.nn.modules.container", "ModuleDict"): PickledModuleDict,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "dtype"): DtypeSpec,
    ("dnnlib.util", "EasyDict"): dict,
    ("builtins", "getattr"): BoundMethodPlaceholder,
    ("_codecs", "encode"): _codecs_encode,
}
CALLABLE = {id(f) for f in ALLOWED_GLOBALS.values() if f is not PickledModuleDict and f is not dict}
CONSTRUCTIBLE = {PickledModuleDict, dict}  # NEWOBJ: object.__new__ with no arguments
BUILDABLE = (PickledModuleDict, DtypeSpec)  # BUILD: our own __setstate__, which checks its input


# ---------------------------------------------------------------------------------------------
# The unpickler: Python's own, with every opcode that calls or mutates something checked.

def _refuse(what: str):
    def load(self):
        raise UnsafePickleError(f"the pickle uses {what}, which EDM snapshots never do; refusing to load")
    return load


class RestrictedUnpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file):
        super().__init__(file)
        self.globals_used: set[tuple[str, str]] = set()  # a format can then insist on its own, smaller list

    def find_class(self, module, name):
        try:
            found = ALLOWED_GLOBALS[(module, name)]
            self.globals_used.add((module, name))
            return found
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"refusing to load global '{str(module)[:MAX_NAME]}.{str(name)[:MAX_NAME]}': it is not on the EDM "
                "allow-list (the file may be malicious or not an EDM snapshot); nothing from it was executed") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("persistent ids are not used by EDM snapshots; refusing to load")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in CALLABLE or not isinstance(args, tuple):
            raise UnsafePickleError(f"refusing to call {describe(func)}: only the EDM allow-list is called")
        self.stack[-1] = func(*args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls not in CONSTRUCTIBLE or args != ():
            raise UnsafePickleError(f"refusing to create {describe(cls)}: not an EDM container")
        self.append(cls.__new__(cls))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        if kwargs != {}:
            raise UnsafePickleError("refusing NEWOBJ_EX with keyword arguments")
        self.load_newobj()

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, BUILDABLE):
            raise UnsafePickleError(f"refusing to set the state of {describe(inst)} (pickle BUILD): only EDM's "
                                    "containers and numpy dtypes take a state, and only through our checks")
        inst.__setstate__(state)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items(self.stack[-1], [key, value])

    def load_setitems(self):
        items = self.pop_mark()
        self._set_items(self.stack[-1], items)

    @staticmethod
    def _set_items(target, items):
        if type(target) not in (dict, collections.OrderedDict):
            raise UnsafePickleError(f"refusing to set items of {describe(target)}: only dicts take items")
        if len(target) + len(items) // 2 > MAX_DICT_ITEMS:
            raise EDMFormatError("a dict with more items than any EDM snapshot has")
        for i in range(0, len(items) - 1, 2):
            if not isinstance(items[i], str):
                raise EDMFormatError(f"dict key {describe(items[i])}: EDM snapshots key their dicts by name")
            target[items[i]] = items[i + 1]

    def load_append(self):
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    def load_appends(self):
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    @staticmethod
    def _extend(target, items):
        if type(target) is not list:
            raise UnsafePickleError(f"refusing to append to {describe(target)}: only lists take items")
        target.extend(items)

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set or not all(isinstance(i, str) for i in items):
            raise UnsafePickleError("refusing to add items other than names to anything but a set")
        target.update(items)

    def load_frozenset(self):
        items = self.pop_mark()
        if not all(isinstance(i, str) for i in items):
            raise UnsafePickleError("refusing a frozenset of anything but names")
        self.append(frozenset(items))

    for _opcode, _method in ((pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj),
                             (pickle.NEWOBJ_EX, load_newobj_ex), (pickle.BUILD, load_build),
                             (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
                             (pickle.APPEND, load_append), (pickle.APPENDS, load_appends),
                             (pickle.ADDITEMS, load_additems), (pickle.FROZENSET, load_frozenset),
                             (pickle.INST, _refuse("INST (protocol-0 class instantiation)")),
                             (pickle.OBJ, _refuse("OBJ (protocol-1 class instantiation)")),
                             (pickle.PUT, _refuse("PUT (a protocol-0 memo with a text index)")),
                             (pickle.GET, _refuse("GET (a protocol-0 memo with a text index)")),
                             (pickle.PERSID, _refuse("PERSID (a persistent id)"))):
        dispatch[_opcode[0]] = _method
    del _opcode, _method


class _LegacyUnpickler(RestrictedUnpickler):
    """The pickles inside a storage blob (parsed by ``_storage_from_bytes``): plain data, storage classes, and
    one persistent id per storage; every other check of the snapshot's unpickler applies."""

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        raise UnsafePickleError(f"refusing global '{module[:MAX_NAME]}.{name[:MAX_NAME]}' in a tensor storage blob")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"tensor storage reference {describe(pid)} is not a plain storage")
        _, storage_type, key, location, numel, view = pid
        if not isinstance(storage_type, StorageType) or view is not None:
            raise UnsafePickleError("tensor storage reference of an unknown type, or a view of another storage")
        if not isinstance(numel, int) or numel < 0 or not isinstance(location, str):
            raise EDMFormatError(f"tensor storage of {describe(numel)} elements at {describe(location)}")
        return (_name(key, "storage key"), storage_type.dtype, numel)


def load_edm_pickle(data, globals_used: set | None = None) -> dict:
    """Unpickle an EDM/ECT snapshot's bytes into plain data and :class:`PersistentRecord` s; the globals
    it referenced are added to ``globals_used``."""
    unpickler = RestrictedUnpickler(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    try:
        obj = unpickler.load()
    except (UnsafePickleError, EDMFormatError):
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, RuntimeError,
            AttributeError, MemoryError, OverflowError, UnicodeDecodeError, RecursionError) as exc:
        raise EDMFormatError(f"not a readable EDM snapshot (truncated or corrupt): {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from exc
    finally:
        if globals_used is not None:
            globals_used |= unpickler.globals_used
    if not isinstance(obj, dict):
        raise EDMFormatError(f"EDM snapshot must be a dict at top level, found {describe(obj)}")
    return obj


# ---------------------------------------------------------------------------------------------
# Walking the network: its state dict, bounded in depth and size, each module visited once.

MAX_DEPTH = 64
MAX_MODULES = 100_000


def _children(state: dict) -> dict:
    modules = state.get("_modules") or {}
    if not isinstance(modules, dict):
        raise EDMFormatError(f"module '_modules' is {describe(modules)}, not a dict")
    return modules


def _node_state(node) -> dict:
    if isinstance(node, (PersistentRecord, PickledModuleDict)):
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
        if not isinstance(non_persistent, (set, frozenset)):
            raise EDMFormatError("module '_non_persistent_buffers_set' is not a set")
        for kind in ("_parameters", "_buffers"):
            tensors = state.get(kind) or {}
            if not isinstance(tensors, dict):
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
