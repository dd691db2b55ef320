"""Read EDM / ECT training snapshots (``*.pkl``) without executing anything from them.

EDM pickles its networks through ``torch_utils.persistence``: each layer reduces to
``_reconstruct_persistent_obj(meta)`` whose ``meta['module_src']`` is Python source that EDM's
loader would ``exec``. We never do: a restricted unpickler resolves only an allow-list of globals,
turns every persistent object into a :class:`PersistentRecord` (class name, version, a hash of the
source, and the pickled ``__dict__``), and anything else is refused by name before it can run.
Format facts: ``shared/reference/ect-method.md`` §1g.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch

PERSISTENCE_VERSION = 6


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list; nothing from it was run."""


class EDMFormatError(ValueError):
    """The file is not a readable EDM snapshot (truncated, corrupt, or an unexpected layout)."""


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
        raise EDMFormatError(f"persistent object meta is not an EDM class record: {type(meta).__name__}")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise EDMFormatError(f"EDM persistence version {meta.get('version')!r}, expected {PERSISTENCE_VERSION}")
    src = meta.get("module_src") or ""
    state = meta.get("state")
    if not isinstance(state, dict):
        raise EDMFormatError(f"persistent object {meta.get('class_name')!r} has no state dict")
    return PersistentRecord(str(meta.get("class_name")), meta["version"],
                            hashlib.sha256(src.encode("utf-8")).hexdigest(), state)


class PickledModuleDict:
    """Stand-in for ``torch.nn.ModuleDict``, pickled the ordinary way: NEWOBJ creates it, BUILD
    hands it the module's ``__dict__``."""

    state: dict = {}  # replaced (never mutated) by __setstate__

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise EDMFormatError("ModuleDict state is not a dict")
        self.state = state


class BoundMethodPlaceholder:
    """ECT snapshots pickle a bound method of the loss via ``getattr``; we keep only its name."""

    def __init__(self, obj, name):
        self.name = str(name)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _storage_from_bytes(blob):
    # A complete legacy-format torch.save of one storage: the weights-only loader accepts it and
    # refuses anything that is not plain tensor data.
    return torch.load(io.BytesIO(blob), weights_only=True)


def _scalar(dtype, data=None):
    # numpy's own ``multiarray.scalar`` would also accept object dtypes (arbitrary payloads).
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy scalar of an object dtype is not allowed")
    if data is None:
        return dtype.type()
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise EDMFormatError("corrupt numpy scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): PickledModuleDict,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "dtype"): np.dtype,
    ("dnnlib.util", "EasyDict"): dict,
    ("builtins", "getattr"): BoundMethodPlaceholder,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': it is not on the EDM allow-list "
                "(the file may be malicious or not an EDM snapshot); nothing from it was executed") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("persistent ids are not used by EDM snapshots; refusing to load")


def load_edm_pickle(data: bytes) -> dict:
    """Unpickle an EDM/ECT snapshot's bytes into plain data and :class:`PersistentRecord` s."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, RuntimeError,
            AttributeError, MemoryError, OverflowError, UnicodeDecodeError) as exc:
        raise EDMFormatError(f"not a readable EDM snapshot (truncated or corrupt): {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise EDMFormatError(f"EDM snapshot must be a dict at top level, found {type(obj).__name__}")
    return obj


def _children(state: dict) -> dict:
    modules = state.get("_modules") or {}
    if not isinstance(modules, dict):
        raise EDMFormatError("module '_modules' is not a dict")
    return modules


def _node_state(node) -> dict:
    if isinstance(node, (PersistentRecord, PickledModuleDict)):
        return node.state
    raise EDMFormatError(f"unexpected module object in the network tree: {type(node).__name__}")


def record_state_dict(root) -> dict[str, torch.Tensor]:
    """Reproduce ``module.state_dict()`` from a pickled module tree, by walking its states."""
    out: dict[str, torch.Tensor] = {}

    def walk(node, prefix):
        state = _node_state(node)
        non_persistent = state.get("_non_persistent_buffers_set") or set()
        for kind in ("_parameters", "_buffers"):
            for name, value in (state.get(kind) or {}).items():
                if value is None or (kind == "_buffers" and name in non_persistent):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise EDMFormatError(f"{prefix}{name} is not a tensor")
                out[prefix + name] = value.detach()
        for name, child in _children(state).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(root, "")
    return out


def find_child(root, name: str):
    child = _children(_node_state(root)).get(name)
    if child is None:
        raise EDMFormatError(f"network has no submodule {name!r}")
    return child
