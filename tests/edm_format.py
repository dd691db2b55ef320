"""Test helper: write pickles with the exact structure of EDM's ``torch_utils.persistence`` snapshots.

EDM's code is not ours to ship, so this helper produces the same byte-level structure from our own
networks: every EDM layer class reduces to ``torch_utils.persistence._reconstruct_persistent_obj``
with a ``meta`` dict (type/version/module_src/class_name/state), ``enc``/``dec`` are plain
``torch.nn.ModuleDict`` pickles, tensors and parameters are pickled the way torch pickles them
(``_rebuild_tensor_v2`` / ``_rebuild_parameter`` / ``_load_from_bytes`` of a legacy blob), and
UNetBlock's ``skip_scale`` is a numpy float64 scalar. The globals this produces are exactly those
of a pickle written by EDM's own code (checked when the helper was written).
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import types

import numpy as np
import torch

from ect import networks

MODULE_SRC = "# stand-in for EDM's training/networks.py (never executed by ect)\n"
EDM_CLASS = {networks.Linear: "Linear", networks.Conv2d: "Conv2d", networks.GroupNorm: "GroupNorm",
             networks.PositionalEmbedding: "PositionalEmbedding", networks.UNetBlock: "UNetBlock",
             networks.SongUNet: "SongUNet"}


def _reconstruct_persistent_obj(meta):  # only its name matters: it is pickled by reference
    raise AssertionError("never called")


@contextlib.contextmanager
def _fake_torch_utils():
    """Make ``torch_utils.persistence._reconstruct_persistent_obj`` resolvable while pickling."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": mod})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Persistent:
    """Pickles as EDM's persistent-class reduce: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name, state, module_src=MODULE_SRC, version=6):
        self.meta = dict(type="class", version=version, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return (_reconstruct_persistent_obj, (self.meta,))


def _module_state(module, init_kwargs=None, extra=None, drop=()):
    state = {k: v for k, v in module.__dict__.items() if k not in drop}
    state["_modules"] = {name: _convert(child) for name, child in module._modules.items()}
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(init_kwargs or {})
    state.update(extra or {})
    return state


def _convert(module):
    if isinstance(module, torch.nn.ModuleDict):
        plain = torch.nn.ModuleDict()  # pickled the ordinary way, as EDM's non-persistent containers are
        plain.__dict__["_modules"] = {name: _convert(child) for name, child in module._modules.items()}
        return plain
    extra = {}
    if isinstance(module, networks.UNetBlock):
        extra = dict(emb_channels=module.affine.in_features, skip_scale=np.sqrt(0.5), adaptive_scale=False)
    if isinstance(module, networks.Conv2d):
        extra = dict(fused_resample=False)
    return Persistent(EDM_CLASS[type(module)], _module_state(module, extra=extra))


def edm_network(net: networks.Precond, unet_kwargs: dict, class_name="EDMPrecond") -> Persistent:
    """An EDMPrecond (or ECT's ECMPrecond) persistent record around ``net.model``."""
    common = dict(img_resolution=net.img_resolution, label_dim=net.label_dim)
    unet_init = dict(common, in_channels=net.img_channels, out_channels=net.img_channels,
                     embedding_type="positional", encoder_type="standard", decoder_type="standard", **unet_kwargs)
    unet = Persistent("SongUNet", _module_state(net.model, init_kwargs=unet_init))
    precond_init = dict(common, img_channels=net.img_channels, use_fp16=False, model_type="SongUNet",
                        embedding_type="positional", encoder_type="standard", decoder_type="standard", **unet_kwargs)
    sigma_min = 0.003 if class_name == "ECMPrecond" else 0.0
    state = _module_state(net, init_kwargs=precond_init,
                          drop=("kind", "sigma_min", "sigma_data", "img_resolution", "img_channels", "label_dim"),
                          extra=dict(img_resolution=net.img_resolution, img_channels=net.img_channels,
                                     label_dim=net.label_dim, use_fp16=False, sigma_min=sigma_min,
                                     sigma_max=float("inf"), sigma_data=0.5))
    state["_modules"] = {"model": unet}
    return Persistent(class_name, state)


def edm_snapshot_bytes(net: networks.Precond, unet_kwargs: dict, class_name="EDMPrecond", protocol=4) -> bytes:
    """Bytes of ``pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))``."""
    net = net.eval().requires_grad_(False).cpu()
    if class_name == "ECMPrecond":
        loss_state = dict(P_mean=-1.1, P_std=2.0, sigma_data=0.5, q=2.0, k=8.0, b=1.0, c=0.0)
        loss = Persistent("ECMLoss", loss_state)
        loss_state["t_to_r"] = _BoundMethod(loss, "t_to_r_sigmoid")  # ECT pickles a bound method of itself
        augment = None
    else:
        loss = Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))
        augment = Persistent("AugmentPipe", dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
                                                  aniso=1, translate_frac=1, _init_args=(), _init_kwargs={}),
                             module_src="# stand-in for EDM's training/augment.py\n")
    data = dict(ema=edm_network(net, unet_kwargs, class_name), loss_fn=loss, augment_pipe=augment,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="datasets/x.zip",
                                    use_labels=False, xflip=False, cache=True, resolution=net.img_resolution,
                                    max_size=50000))
    with _fake_torch_utils():
        return pickle.dumps(data, protocol=protocol)


class _BoundMethod:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return (getattr, (self.obj, self.name))


def malicious_pickle(callable_, *args) -> bytes:
    """A pickle whose loading would call ``callable_(*args)``."""

    class Evil:
        def __reduce__(self):
            return (callable_, args)

    return pickle.dumps({"ema": Evil()}, protocol=4)


def small_unet_kwargs(**overrides):
    kwargs = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
    kwargs.update(overrides)
    return kwargs


def randomized(net: torch.nn.Module, seed=0, scale=0.05) -> torch.nn.Module:
    """Fill every parameter with noise so zero-initialised layers take part in comparisons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net
