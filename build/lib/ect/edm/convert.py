"""EDM/ECT snapshot (``ema`` network) -> our checkpoint, without executing the pickle."""
from __future__ import annotations

from pathlib import Path

from ect.checkpoint import check_weights, load_state_by_name, save_checkpoint
from ect.edm.pickle_reader import (
    EDMFormatError,
    PersistentRecord,
    describe,
    find_child,
    load_edm_pickle,
    record_state_dict,
)
from ect.fileio import verify_sha256
from ect.networks import ArchError, build_network, check_arch, count_parameters

PRECOND_KINDS = {"EDMPrecond": "edm", "ECMPrecond": "ect"}
# SongUNet constructor arguments we rebuild; EDM's defaults apply to any not stored in the pickle.
SONGUNET_ARGS = ("augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
                 "attn_resolutions", "dropout", "label_dropout", "channel_mult_noise", "resample_filter")
# Architecture variants EDM supports that our SongUNet does not implement.
REQUIRED_VARIANTS = {"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard"}


def _plain(value):
    """A kwarg from the pickle as a plain value storable with weights_only: a number, a string, or a short
    flat list of numbers (never a walk through nested containers a hostile file could make huge)."""
    if isinstance(value, (list, tuple)) and len(value) <= 16 and all(isinstance(v, (int, float)) for v in value):
        return list(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise EDMFormatError(f"network kwarg is {describe(value)}, not a number, a string or a short list of numbers")


def read_edm_network(data: bytes) -> tuple[dict, dict, dict]:
    """Parse snapshot bytes -> (arch kwargs, state_dict, info about the pickled classes)."""
    snapshot = load_edm_pickle(data)
    ema = snapshot.get("ema")
    if not isinstance(ema, PersistentRecord):
        raise EDMFormatError("snapshot has no persistent 'ema' network")
    if ema.class_name not in PRECOND_KINDS:
        raise EDMFormatError(f"unsupported preconditioning class {ema.class_name!r}; "
                             f"supported: {', '.join(PRECOND_KINDS)}")
    unet = find_child(ema, "model")
    if not isinstance(unet, PersistentRecord) or unet.class_name != "SongUNet":
        name = getattr(unet, "class_name", type(unet).__name__)
        raise EDMFormatError(f"unsupported network class {name!r}: only EDM's SongUNet (DDPM++) is implemented")
    if unet.state.get("_init_args"):
        raise EDMFormatError("SongUNet was constructed with positional arguments; cannot recover its configuration")
    unet_kwargs = unet.state.get("_init_kwargs") or {}
    if not isinstance(unet_kwargs, dict):
        raise EDMFormatError(f"SongUNet kwargs are {describe(unet_kwargs)}, not a dict")
    for key, required in REQUIRED_VARIANTS.items():
        if unet_kwargs.get(key, required) != required:
            raise EDMFormatError(f"unsupported SongUNet {key}={describe(unet_kwargs[key])} (implemented: {required!r})")
    p = ema.state
    arch = {"kind": PRECOND_KINDS[ema.class_name],
            **{key: _plain(p.get(key, default)) for key, default in (
                ("img_resolution", None), ("img_channels", None), ("label_dim", 0), ("sigma_data", 0.5),
                ("sigma_min", 0.0))}}
    arch.update({k: _plain(unet_kwargs[k]) for k in SONGUNET_ARGS if k in unet_kwargs})
    try:
        check_arch(arch)
    except ArchError as exc:
        raise EDMFormatError(f"the snapshot's network: {exc}") from None
    info = {"precond_class": ema.class_name, "module_src_sha256": ema.module_src_sha256,
            "snapshot_keys": sorted(snapshot)}
    return arch, record_state_dict(ema), info


def convert_edm_pickle(src, dst, sha256: str | None = None, log=print) -> dict:
    """Verify (when ``sha256`` is given), parse and convert; write ``dst`` atomically."""
    src = Path(src)
    if sha256:
        verify_sha256(src, sha256)
    arch, state, info = read_edm_network(src.read_bytes())
    check_weights(arch, state, f"{src}")  # every name and shape, before a network is built
    net = build_network(arch)
    load_state_by_name(net, state)
    meta = {"source": str(src), "source_sha256": sha256 or "", "producer": "ect convert-edm", **info}
    save_checkpoint(dst, arch, net.state_dict(), meta)
    log(f"converted {src.name}: {info['precond_class']} -> kind={arch['kind']}, "
        f"{count_parameters(net):,} parameters -> {dst}")
    return arch
