"""Our checkpoint format: ``torch.save`` of ``{"arch", "state_dict", "meta"}`` (plain data only).

``arch`` holds the kwargs of :func:`ect.networks.build_network` (including the preconditioning
``kind``), ``state_dict`` the tensors under EDM's names, ``meta`` where the weights came from.
Everything loads with ``torch.load(path, weights_only=True)``.
"""
from __future__ import annotations

import io

import torch

from ect.fileio import write_bytes_atomic
from ect.networks import Precond, build_network


class CheckpointError(ValueError):
    pass


def save_checkpoint(path, arch: dict, state_dict: dict, meta: dict) -> None:
    buf = io.BytesIO()
    torch.save({"arch": dict(arch), "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
                "meta": dict(meta)}, buf)
    write_bytes_atomic(path, buf.getvalue())


def read_checkpoint(path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt zips / pickles
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or not {"arch", "state_dict", "meta"} <= set(ckpt):
        raise CheckpointError(f"{path} is not an ect checkpoint (expected keys arch, state_dict, meta)")
    return ckpt


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
    """The preconditioned network D(x; σ) stored at ``path``, in eval mode."""
    ckpt = read_checkpoint(path)
    net = build_network({**ckpt["arch"], **arch_overrides})
    load_state_by_name(net, ckpt["state_dict"])
    return net.eval().requires_grad_(False).to(device)
