"""Everything the tests share: small datasets, teachers and configs; files in the exact formats of the
downloads (EDM snapshots, the CIFAR-10 tarball, clean-fid's Inception file); a loopback HTTP server;
and running `ect`, Snakemake and DVC in a copy of the repository.

The format writers produce, from our own code, the byte-level structure of the real files: EDM's
code and weights are not ours to ship. Each section says what it reproduces.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import http.server
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ect import networks, networks_edm2
from ect.checkpoint import save_checkpoint
from ect.data import save_dataset
from ect.networks import build_network

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's `ect`, `snakemake` and `dvc`


# ---- Small datasets, teachers and configs for trainer and sampler tests

TINY_ARCH = dict(kind="edm", img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4], dropout=0.0)


def make_dataset(path, n=64, res=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, res, res, 3), dtype=np.uint8)
    return save_dataset(path, images, rng.integers(0, 10, size=n))


def make_teacher(path, seed=0, **arch):
    torch.manual_seed(seed)
    net = randomized(build_network({**TINY_ARCH, **arch}), seed=seed, scale=0.05)
    save_checkpoint(path, {**TINY_ARCH, **arch}, net.state_dict(), {"producer": "test"})
    return path


def toy_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def write_config(path, tune=None, pretrain=None):
    """The toy preset with small 'tune' and 'pretrain' sections (replaced whole, not merged)."""
    base = dict(kimg=0.32, batch=8, lr=1e-3, tick_kimg=0.04, state_kimg=0.04, snapshot_kimg=0.04, ema_beta=0.9,
                arch={"dropout": 0.0},
                loss={"double": 10})
    cfg = {**toy_config(),
           "tune": {**base, **(tune or {})},
           "pretrain": {**base, "arch": {k: v for k, v in TINY_ARCH.items() if k not in ("kind", "img_resolution", "img_channels")},
                        "loss": {}, **(pretrain or {})}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def ect_command(*args):
    return [sys.executable, "-m", "ect.cli", *map(str, args)]


def run_ect(*args, check=True, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(ect_command(*args), capture_output=True, text=True, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"ect {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def state_dicts_equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

# ---- EDM snapshots. The byte-level structure of EDM's `torch_utils.persistence` pickles, made from our
# own networks: every EDM layer class reduces to `torch_utils.persistence._reconstruct_persistent_obj`
# with a `meta` dict (type/version/module_src/class_name/state); `enc`/`dec` are plain
# `torch.nn.ModuleDict` pickles; tensors and parameters are pickled the way torch pickles them
# (`_rebuild_tensor_v2` / `_rebuild_parameter` / `_load_from_bytes` of a legacy blob); UNetBlock's
# `skip_scale` is a numpy float64 scalar. The globals are exactly those of a pickle written by EDM's code.

MODULE_SRC = "# stand-in for EDM's training/networks.py (never executed by ect)\n"
EDM_CLASS = {networks.Linear: "Linear", networks.Conv2d: "Conv2d", networks.GroupNorm: "GroupNorm",
             networks.PositionalEmbedding: "PositionalEmbedding", networks.UNetBlock: "UNetBlock",
             networks.SongUNet: "SongUNet"}


def _reconstruct_persistent_obj(meta):  # only its name matters: it is pickled by reference
    raise AssertionError("never called")


@contextlib.contextmanager
def fake_module(dotted: str, **attrs):
    """Make ``package.module.<attr>`` importable while pickling (pickle stores globals by that name)."""
    pkg_name, mod_name = dotted.split(".")
    pkg, mod = types.ModuleType(pkg_name), types.ModuleType(dotted)
    for name, value in attrs.items():
        setattr(mod, name, value)
    setattr(pkg, mod_name, mod)
    saved = {k: sys.modules.get(k) for k in (pkg_name, dotted)}
    sys.modules.update({pkg_name: pkg, dotted: mod})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def fake_torch_utils():
    """Make ``torch_utils.persistence._reconstruct_persistent_obj`` resolvable while pickling."""
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    return fake_module("torch_utils.persistence", _reconstruct_persistent_obj=_reconstruct_persistent_obj)


class Persistent:
    """Pickles as EDM's persistent-class reduce: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name, state, module_src=MODULE_SRC, version=6):
        self.meta = dict(type="class", version=version, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return (_reconstruct_persistent_obj, (self.meta,))


def _module_state(module, init_kwargs=None, extra=None, drop=(), convert=None):
    state = {k: v for k, v in module.__dict__.items() if k not in drop}
    state["_modules"] = {name: (convert or _convert)(child) for name, child in module._modules.items()}
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
    with fake_torch_utils():
        return pickle.dumps(data, protocol=protocol)


# ---- EDM2 snapshots: the structure of NVlabs/edm2's pickles (facts: docs/imagenet.md) -------------
# A `dnnlib.util.EasyDict` with encoder, dataset_kwargs, loss_fn and ema; every EDM2 network class a
# persistent record; `enc`/`dec` plain ModuleDicts; the ema's parameters and Fourier buffers float16.

EDM2_CLASS = {networks_edm2.EDM2Precond: "Precond", networks_edm2.UNet: "UNet", networks_edm2.Block: "Block",
              networks_edm2.MPConv: "MPConv", networks_edm2.MPFourier: "MPFourier"}


class _EasyDict(dict):
    """Pickled by reference as ``dnnlib.util.EasyDict`` (a dict subclass: NEWOBJ, then SETITEMS)."""


_EasyDict.__module__, _EasyDict.__qualname__, _EasyDict.__name__ = "dnnlib.util", "EasyDict", "EasyDict"


def fake_dnnlib():
    return fake_module("dnnlib.util", EasyDict=_EasyDict)


def _edm2_convert(module, init_kwargs=None):
    if isinstance(module, torch.nn.ModuleDict):
        plain = torch.nn.ModuleDict()
        plain.__dict__["_modules"] = {name: _edm2_convert(child) for name, child in module._modules.items()}
        return plain
    state = _module_state(module, init_kwargs=init_kwargs, convert=_edm2_convert)
    return Persistent(EDM2_CLASS[type(module)], state, module_src="# stand-in for training/networks_edm2.py\n")


def edm2_snapshot_bytes(net, init_kwargs: dict, ect: bool = False, dtype=torch.float16) -> bytes:
    """Bytes of an EDM2 snapshot or post-hoc reconstruction (``ect=False``: EasyDict with encoder,
    dataset_kwargs, loss_fn, ema in float16), or of ECT's ImageNet snapshot (``ect=True``: ``dict(ema=...)``,
    float32, no log-variance head). ``init_kwargs``: the Precond's constructor kwargs."""
    net = copy.deepcopy(net).eval().requires_grad_(False).cpu().to(dtype)
    ema = _edm2_convert(net, init_kwargs)
    if ect:
        data = dict(ema=ema)
    else:
        encoder = Persistent("StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}),
                             module_src="# stand-in for training/encoders.py\n")
        loss = Persistent("EDM2Loss", dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5, _init_args=(), _init_kwargs={}),
                          module_src="# stand-in for training/training_loop.py\n")
        data = _EasyDict(encoder=encoder, dataset_kwargs=_EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                                     path="/someone/else/img64.zip", use_labels=True),
                         loss_fn=loss, ema=ema)
    with fake_torch_utils(), fake_dnnlib():
        return pickle.dumps(data, protocol=4)


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


# ---- CIFAR-10: small archives in the format of cifar-10-python.tar.gz

def cifar_tarball(per_batch: int = 4, seed: int = 0, extra_global: bool = False) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Bytes of a .tar.gz with data_batch_1..5 (+ test_batch, batches.meta); and the NHWC images and labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(5 * per_batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5 * per_batch)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, obj):
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size, info.mtime = len(blob), 1234567890
            tar.addfile(info, io.BytesIO(blob))
        for b in range(5):
            sl = slice(b * per_batch, (b + 1) * per_batch)
            batch = {b"batch_label": b"training batch", b"labels": labels[sl].tolist(),
                     b"data": images[sl].transpose(0, 3, 1, 2).reshape(per_batch, 3072), b"filenames": []}
            if extra_global and b == 2:
                batch[b"payload"] = print  # a global that is not numpy array data
            add(f"data_batch_{b + 1}", batch)
        add("test_batch", {b"labels": [], b"data": np.zeros((0, 3072), np.uint8)})
        add("batches.meta", {b"label_names": [b"airplane"]})
    return buf.getvalue(), images, labels


# ---- Inception: a small TorchScript module with the interface of clean-fid's inception-2015-12-05.pt.
# `forward(x, return_features=True)` takes float images in [0, 255] at any size and resizes them to
# 299x299 inside (as the real file does for legacy_tensorflow); `layers` takes 299x299 images already
# normalised to [-1, 1] (clean mode). Both return 2048-d features: a random projection, not Inception.

class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.proj = nn.Linear(3 * 8 * 8, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.pool(x).flatten(1)))


class _InceptionLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


def inception_like_bytes(seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the real file's format
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(_InceptionLike().eval()), buf)
    return buf.getvalue()


def published_stats_like(tarball: bytes, inception: bytes, work) -> tuple[bytes, bytes]:
    """Stand-ins for EDM's published CIFAR-10 statistics (an .npz of mu and sigma): ours of the same images with the
    same Inception-like file (a check against them passes), and the same with mu shifted (it fails)."""
    from ect.data import prepare_dataset, save_dataset
    from ect.fid import reference_statistics
    from ect.metrics.frechet import load_stats

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "cifar.tar.gz").write_bytes(tarball)
    (work / "inception-2015-12-05.pt").write_bytes(inception)
    images, labels = prepare_dataset("cifar10", 32, work / "cifar.tar.gz", progress=False)
    save_dataset(work / "dataset.npz", images, labels)
    reference_statistics(work / "dataset.npz", work / "inception-2015-12-05.pt", "inception", None,
                         ["legacy_tensorflow"], 250, "cpu", work / "ours.npz")  # as the fid_reference rule
    mu, sigma = load_stats(work / "ours.npz")[0]["legacy_tensorflow"]
    blobs = []
    for shift in (0.0, 1.0):
        buf = io.BytesIO()
        np.savez(buf, mu=mu + shift, sigma=sigma)
        blobs.append(buf.getvalue())
    return blobs[0], blobs[1]


# ---- A loopback HTTP server (127.0.0.1) serving files the tests make, with faults on demand.
# `/<name>` serves files[name] honouring Range; `/truncate/<name>` always closes the connection halfway;
# `/flaky/<name>` closes halfway on the first request only; `/stall/<name>` sends half, then stops
# talking; `/redirect/<name>` redirects to an ftp:// URL; `/norange/<name>` ignores Range (200, the whole
# file); `/badrange/<name>` answers a Range with a 206 of the whole file. Anything else is a 404. `requests` logs (path,
# Range header).

class LoopbackServer:
    def __init__(self, files: dict[str, bytes], stall_seconds: float = 5.0):
        self.files, self.requests, self.stall_seconds = files, [], stall_seconds
        self._seen: set[str] = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                fault, _, name = self.path.lstrip("/").partition("/") if self.path.count("/") > 1 else ("", "", self.path.lstrip("/"))
                data = server.files.get(name)
                if fault == "redirect":  # to another scheme: a client must not follow it
                    self.send_response(302)
                    self.send_header("Location", "ftp://127.0.0.1/etc/hostname")
                    self.end_headers()
                    return
                if data is None or fault not in ("", "truncate", "flaky", "stall", "norange", "badrange"):
                    self.send_error(404, "Not Found")
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and fault == "badrange":  # a 206 of a range that is not the one asked for
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
                elif m and fault not in ("truncate", "norange"):
                    start = int(m[1])
                    if start >= len(data):
                        self.send_error(416, "Range Not Satisfiable")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                cut = fault == "truncate" or fault == "stall" or (fault == "flaky" and name not in server._seen)
                server._seen.add(name)
                if cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if fault == "stall":
                        time.sleep(server.stall_seconds)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

# ---- Running commands in a copy of the repository

def env() -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd, cwd, check=True, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def clone_repo(dst: Path) -> Path:
    """A copy of the working tree (tracked and new files, nothing ignored) as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "snapshot"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextlib.contextmanager
def small_filesystem(path: Path, kilobytes: int):
    """A tmpfs of the given size mounted at ``path`` (a full disk on demand); the test is skipped where
    mounting is not allowed (CI runs as root and can)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


DINOV2_PATCH = 14  # every DINOv2 ViT's patch


def tiny_dinov2_state(width=128, depth=2, hidden=256, grid=4, seed=0) -> dict[str, torch.Tensor]:
    """Random weights in the official layout, scaled so attention is far from uniform and every term matters."""
    rng = np.random.default_rng(seed)
    state = {}
    for i in range(depth):
        for norm in ("norm1", "norm2"):
            state[f"blocks.{i}.{norm}.weight"] = 1 + 0.2 * rng.standard_normal(width)
            state[f"blocks.{i}.{norm}.bias"] = 0.1 * rng.standard_normal(width)
        for name, (rows, cols) in {"attn.qkv": (3 * width, width), "attn.proj": (width, width),
                                   "mlp.fc1": (hidden, width), "mlp.fc2": (width, hidden)}.items():
            state[f"blocks.{i}.{name}.weight"] = rng.standard_normal((rows, cols)) / np.sqrt(cols)
            state[f"blocks.{i}.{name}.bias"] = 0.1 * rng.standard_normal(rows)
        for scale in ("ls1", "ls2"):
            state[f"blocks.{i}.{scale}.gamma"] = rng.uniform(0.2, 1.0, width)
    state.update({
        "cls_token": rng.standard_normal((1, 1, width)), "pos_embed": rng.standard_normal((1, 1 + grid * grid, width)),
        "mask_token": rng.standard_normal((1, width)),
        "patch_embed.proj.weight": rng.standard_normal((width, 3, DINOV2_PATCH, DINOV2_PATCH)) / np.sqrt(3 * DINOV2_PATCH * DINOV2_PATCH),
        "patch_embed.proj.bias": 0.1 * rng.standard_normal(width),
        "norm.weight": 1 + 0.2 * rng.standard_normal(width), "norm.bias": 0.1 * rng.standard_normal(width)})
    return {key: torch.tensor(value, dtype=torch.float32) for key, value in state.items()}


def dinov2_like_bytes() -> bytes:
    """A tiny DINOv2 ViT in the official weights layout, as `torch.save` writes dinov2_vitl14_pretrain.pth."""
    buf = io.BytesIO()
    torch.save(tiny_dinov2_state(), buf)
    return buf.getvalue()
