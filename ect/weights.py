"""Checks of weights read from a file, before anything is built from them (a leaf: torch tensors only).

A saved tensor may be a view, and views may overlap: a file can describe gigabytes of weights with one small
storage (every tensor a view of it, or strides of zero). Building a network from such weights would allocate
what the shapes claim, not what the file holds, so every loader refuses claims beyond the storages first.
"""
from __future__ import annotations


def layout_mismatch(state_dict: dict, shapes: dict) -> tuple | None:
    """How weights differ from the names and shapes a network needs, for the caller to word: ("keys", missing,
    unexpected), both sorted, or ("shape", name, its shape, the needed shape) for the first wrong shape; None
    when they match."""
    missing, extra = sorted(set(shapes) - set(state_dict)), sorted(set(state_dict) - set(shapes))
    if missing or extra:
        return "keys", missing, extra
    for name, shape in shapes.items():
        if tuple(state_dict[name].shape) != tuple(shape):
            return "shape", name, tuple(state_dict[name].shape), shape
    return None


def nonfinite_weight(state_dict: dict) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, or None."""
    return next((name for name, t in state_dict.items() if t.is_floating_point() and not t.isfinite().all()), None)


def bytes_beyond_held(state_dict: dict) -> tuple[int, int] | None:
    """(bytes the tensors claim, bytes their storages hold) when the claim is larger, else None."""
    claimed = sum(t.numel() * t.element_size() for t in state_dict.values())
    storages = {}
    for t in state_dict.values():
        storage = t.untyped_storage()
        storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
    held = sum(storages.values())
    return (claimed, held) if claimed > held else None
