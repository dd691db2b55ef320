"""EDM/ECT snapshot (``ema`` network) -> our checkpoint, without executing the pickle."""
from __future__ import annotations

from pathlib import Path

from ect.checkpoint import load_state_by_name, save_checkpoint
from ect.edm.pickle_reader import EDMFormatError, PersistentRecord, find_child, load_edm_pickle, record_state_dict
from ect.fileio import verify_sha256
from ect.networks import build_network, count_parameters

PRECOND_KINDS = {"EDMPrecond": "edm", "ECMPrecond": "ect"}
# SongUNet constructor arguments we rebuild; EDM's defaults apply to any not stored in the pickle.
SONGUNET_ARGS = ("augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
                 "attn_resolutions", "dropout", "label_dropout", "channel_mult_noise", "resample_filter")
# Architecture variants EDM supports that our SongUNet does not implement.
REQUIRED_VARIANTS = {"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard"}


def _plain(value):
    """numpy scalars and tuples from the pickle -> plain Python values storable with weights_only."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


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
    for key, required in REQUIRED_VARIANTS.items():
        if unet_kwargs.get(key, required) != required:
            raise EDMFormatError(f"unsupported SongUNet {key}={unet_kwargs[key]!r} (implemented: {required!r})")
    p = ema.state
    arch = {"kind": PRECOND_KINDS[ema.class_name],
            "img_resolution": int(p["img_resolution"]), "img_channels": int(p["img_channels"]),
            "label_dim": int(p.get("label_dim", 0)), "sigma_data": float(p.get("sigma_data", 0.5)),
            "sigma_min": float(p.get("sigma_min", 0.0))}
    arch.update({k: _plain(unet_kwargs[k]) for k in SONGUNET_ARGS if k in unet_kwargs})
    info = {"precond_class": ema.class_name, "module_src_sha256": ema.module_src_sha256,
            "snapshot_keys": sorted(snapshot)}
    return arch, record_state_dict(ema), info


def convert_edm_pickle(src, dst, sha256: str | None = None, log=print) -> dict:
    """Verify (when ``sha256`` is given), parse and convert; write ``dst`` atomically."""
    src = Path(src)
    if sha256:
        verify_sha256(src, sha256)
    arch, state, info = read_edm_network(src.read_bytes())
    net = build_network(arch)
    load_state_by_name(net, state)  # all names must match: the arch came from the same file
    meta = {"source": str(src), "source_sha256": sha256 or "", "producer": "ect convert-edm", **info}
    save_checkpoint(dst, arch, net.state_dict(), meta)
    log(f"converted {src.name}: {info['precond_class']} -> kind={arch['kind']}, "
        f"{count_parameters(net):,} parameters -> {dst}")
    return arch
