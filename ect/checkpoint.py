"""Our checkpoint format: ``torch.save`` of ``{"arch", "state_dict", "meta"}`` (plain data only).

``arch`` holds the kwargs of :func:`ect.networks.build_network` (including the preconditioning
``kind``), ``state_dict`` the tensors under EDM's names, ``meta`` where the weights came from.
Everything loads with ``torch.load(path, weights_only=True)``.
"""
from __future__ import annotations

import io

import torch

from ect.errors import BadInput
from ect.fileio import verify_zip, write_bytes_atomic
from ect.networks import ArchError, Precond, build_network, parameter_shapes
from ect.weights import bytes_beyond_held, layout_mismatch, nonfinite_weight


class CheckpointError(BadInput):
    pass


def save_checkpoint(path, arch: dict, state_dict: dict, meta: dict) -> None:
    buf = io.BytesIO()
    torch.save({"arch": dict(arch), "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
                "meta": dict(meta)}, buf)
    write_bytes_atomic(path, buf.getvalue())


def read_checkpoint(path) -> dict:
    """One of our checkpoints, its zip CRCs verified first (a bit-flipped file is refused, not used)."""
    verify_zip(path, CheckpointError)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt zips / pickles
        raise CheckpointError(f"cannot read checkpoint {path}: {' '.join(str(exc).split())[:300]}") from exc
    if not isinstance(ckpt, dict) or not {"arch", "state_dict", "meta"} <= set(ckpt):
        raise CheckpointError(f"{path} is not an ect checkpoint (expected keys arch, state_dict, meta)")
    state = ckpt["state_dict"]
    if not isinstance(ckpt["arch"], dict) or not isinstance(ckpt["meta"], dict) or not isinstance(state, dict) \
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} is not an ect checkpoint (arch, meta and a state_dict of named tensors)")
    return ckpt


def check_weights(arch: dict, state_dict: dict, where="checkpoint") -> None:
    """Every weight the network ``arch`` describes is in ``state_dict`` with its shape, none is left over,
    and the file holds the bytes the weights claim: checked before a network is built (a file cannot make
    us allocate more than it holds, ect/weights.py)."""
    try:
        shapes = parameter_shapes(arch)
    except (ArchError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    mismatch = layout_mismatch(state_dict, shapes)
    if mismatch and mismatch[0] == "keys":
        _, missing, extra = mismatch
        raise CheckpointError(f"{where}: the weights do not match the network its kwargs describe "
                              f"({len(missing)} missing, e.g. {missing[:3]}; {len(extra)} unexpected, e.g. {extra[:3]})")
    if mismatch:
        _, name, got, shape = mismatch
        raise CheckpointError(f"{where}: {name} has shape {got}, the network's is {shape}")
    beyond = bytes_beyond_held(state_dict)
    if beyond:
        raise CheckpointError(f"{where}: its weights claim {beyond[0]:,} bytes but the file holds {beyond[1]:,} "
                              "(overlapping views of one storage): refusing to build a network that large")


def load_state_by_name(net: torch.nn.Module, source: dict, allow_missing: bool = False) -> list[str]:
    """Copy tensors from ``source`` into ``net`` by dotted name; return the source-only names skipped.

    A name present in ``net`` but not in ``source`` is an error unless ``allow_missing``; a shape
    mismatch is always an error.
    """
    target = net.state_dict()
    missing = sorted(set(target) - set(source))
    if missing and not allow_missing:
        raise CheckpointError(f"{len(missing)} weights missing from the source, e.g. {missing[:5]}")
    for name in sorted(set(target) & set(source)):
        if tuple(source[name].shape) != tuple(target[name].shape):
            raise CheckpointError(f"shape mismatch for {name}: source {tuple(source[name].shape)}, "
                                  f"network {tuple(target[name].shape)}")
    net.load_state_dict({k: v for k, v in source.items() if k in target}, strict=False)
    return sorted(set(source) - set(target))


def load_network(path, device="cpu", **arch_overrides) -> Precond:
    """The preconditioned network D(x; σ) stored at ``path``, in eval mode. Its weights must match its
    kwargs exactly and be finite."""
    ckpt = read_checkpoint(path)
    arch = {**ckpt["arch"], **arch_overrides}
    check_weights(arch, ckpt["state_dict"], str(path))
    bad = nonfinite_weight(ckpt["state_dict"])
    if bad is not None:
        raise CheckpointError(f"{path}: weight {bad} holds NaN or infinite values; the checkpoint is unusable")
    net = build_network(arch)
    load_state_by_name(net, ckpt["state_dict"])
    return net.eval().requires_grad_(False).to(device)
