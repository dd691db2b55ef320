"""EDM, EDM2 and ECT snapshots (their ``ema`` network) -> our checkpoint, without executing the pickle."""
from __future__ import annotations

from pathlib import Path

from ect.checkpoint import check_weights, load_state_by_name, save_checkpoint
from ect.edm.pickle_reader import (
    EDM2_GLOBALS,
    EDMFormatError,
    PersistentRecord,
    describe,
    find_child,
    load_edm_pickle,
    record_state_dict,
)
from ect.fileio import verify_sha256
from ect.networks import (
    ArchError,
    SongUNet,
    arch_options,
    build_network,
    check_arch,
    constructor_options,
    count_parameters,
)
from ect.safepickle import read_file_limited
from ect.untrusted import MAX_SOURCE_BYTES, check_source, parse
from ect.weights import nonfinite_weight

PRECOND_KINDS = {"EDMPrecond": "edm", "ECMPrecond": "ect"}
# SongUNet's options we rebuild (its constructor's annotated parameters); EDM's defaults apply to any not
# stored in the pickle.
SONGUNET_ARGS = tuple(constructor_options(SongUNet))
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


# EDM2 (and ECT's ImageNet branch): the Precond/UNet kwargs we rebuild (its network's options); EDM2's
# defaults apply to the rest.
EDM2_ARGS = tuple(name for name in arch_options("edm2") if name != "kind")


def read_edm2_network(ema: PersistentRecord, globals_used: set) -> tuple[dict, dict]:
    """EDM2's Precond (or ECT's ImageNet one, without the log-variance head) -> (arch, float32 state dict)."""
    extra = sorted(f"{m}.{n}" for m, n in globals_used - EDM2_GLOBALS)
    if extra:
        raise EDMFormatError(f"an EDM2 snapshot references only EDM2's globals; this one also {extra[:3]}")
    unet = find_child(ema, "unet")
    if not isinstance(unet, PersistentRecord) or unet.class_name != "UNet":
        raise EDMFormatError(f"unsupported EDM2 network class {describe(getattr(unet, 'class_name', unet))}")
    kwargs = ema.state.get("_init_kwargs") or {}
    if ema.state.get("_init_args") or not isinstance(kwargs, dict):
        raise EDMFormatError("EDM2 Precond was not constructed with keyword arguments; cannot recover its configuration")
    unknown = sorted(str(k)[:40] for k in kwargs if k not in EDM2_ARGS)
    if unknown:
        raise EDMFormatError(f"unsupported EDM2 network option(s) {unknown[:5]}")
    state = record_state_dict(ema)  # float16 on disk: upcast by the load into the float32 network, after the
    # shape check (tensors that share one storage would otherwise each be upcast first)
    logvar = state.get("logvar_fourier.freqs")
    arch = {"kind": "edm2", **{k: _plain(v) for k, v in kwargs.items()},
            "logvar_channels": int(logvar.shape[0]) if logvar is not None and logvar.ndim == 1 else 0}
    return arch, state


def _check_snapshot_arch(arch: dict) -> None:
    try:
        check_arch(arch)
    except ArchError as exc:
        raise EDMFormatError(f"the snapshot's network: {exc}") from None


def read_edm_network(data: bytes) -> tuple[dict, dict, dict]:
    """Parse snapshot bytes -> (arch kwargs, state_dict, info about the pickled classes)."""
    globals_used: set = set()
    snapshot = load_edm_pickle(data, globals_used)
    ema = snapshot.get("ema")
    if not isinstance(ema, PersistentRecord):
        raise EDMFormatError("snapshot has no persistent 'ema' network")
    if ema.class_name == "Precond":
        arch, state = read_edm2_network(ema, globals_used)
        _check_snapshot_arch(arch)
        info = {"precond_class": "Precond (EDM2)", "module_src_sha256": ema.module_src_sha256,
                "snapshot_keys": sorted(snapshot),
                "logvar_head": "present (EDM2's loss weighting; not used by the ECT student)"
                if arch["logvar_channels"] else "absent"}
        return arch, state, info
    if ema.class_name not in PRECOND_KINDS:
        raise EDMFormatError(f"unsupported preconditioning class {ema.class_name!r}; "
                             f"supported: {', '.join(PRECOND_KINDS)}, Precond (EDM2)")
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
    _check_snapshot_arch(arch)
    info = {"precond_class": ema.class_name, "module_src_sha256": ema.module_src_sha256,
            "snapshot_keys": sorted(snapshot)}
    return arch, record_state_dict(ema), info


def parse_snapshot(path) -> dict:
    """In the parsing child (``ect/untrusted.py``): a snapshot file's network as plain data and tensors."""
    arch, state, info = read_edm_network(read_file_limited(path, MAX_SOURCE_BYTES["edm-snapshot"]))
    return {"arch": arch, "state": state, "info": info}


def convert_edm_pickle(src, dst, sha256: str | None = None, log=print) -> dict:
    """Verify (when ``sha256`` is given), parse in a limited child process, check and convert; write ``dst``
    atomically."""
    src = Path(src)
    check_source(src, MAX_SOURCE_BYTES["edm-snapshot"])
    if sha256:
        verify_sha256(src, sha256)
    parsed = parse("edm-snapshot", src)
    arch, state, info = parsed["arch"], parsed["state"], parsed["info"]
    check_weights(arch, state, f"{src}")  # every name and shape, before a network is built
    bad = nonfinite_weight(state)
    if bad is not None:
        raise EDMFormatError(f"{src}: weight {bad} holds NaN or infinite values; nothing was written")
    net = build_network(arch)
    load_state_by_name(net, state)
    meta = {"source": str(src), "source_sha256": sha256 or "", "producer": "ect convert-edm", **info}
    save_checkpoint(dst, arch, net.state_dict(), meta)
    log(f"converted {src.name}: {info['precond_class']} -> kind={arch['kind']}, "
        f"{count_parameters(net):,} parameters" + (f", log-variance head {info['logvar_head']}" if "logvar_head" in info
                                                   else "") + f" -> {dst}")
    return arch
