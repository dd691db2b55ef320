"""EDM2's network (ect/networks_edm2.py): every magnitude-preserving formula in float64 against an
independent computation, the sizes of NVIDIA's ImageNet-64 models, ECT's changes, and EDM2-format
snapshots converted and compared."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from ect.checkpoint import load_network, read_checkpoint
from ect.edm.convert import read_edm_network
from ect.edm.pickle_reader import EDMFormatError
from ect.loss import ECTLossConfig, ect_loss
from ect.networks import build_network, student_arch
from ect.networks_edm2 import (
    MPConv,
    MPFourier,
    forced_weight_norm,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    resample,
)
from tests.helpers import edm2_snapshot_bytes, fake_dnnlib, fake_torch_utils, randomized, run_ect

F64 = torch.float64
TINY = dict(kind="edm2", img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[8], channels_per_head=16, dropout=0.0, logvar_channels=16)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomized(build_network({**TINY, **overrides}), seed=seed, scale=1.0)


# ---- the primitives, in float64 ---------------------------------------------------------------------

def test_normalize_divides_by_eps_plus_rms_over_all_but_the_first_dim():
    x = torch.randn(5, 3, 2, 2, dtype=F64)
    rms = np.sqrt((x.numpy() ** 2).reshape(5, -1).mean(axis=1))
    expected = x.numpy() / (1e-4 + rms)[:, None, None, None]
    np.testing.assert_allclose(normalize(x).numpy(), expected, rtol=1e-6)  # the norm is taken in float32
    pixel = normalize(x, dim=1).numpy()  # pixel norm: RMS over channels at each position
    np.testing.assert_allclose(pixel, x.numpy() / (1e-4 + np.sqrt((x.numpy() ** 2).mean(axis=1, keepdims=True))),
                               rtol=1e-6)


def test_mp_sum_cat_silu_match_their_formulas_and_keep_unit_magnitude():
    a, b = torch.randn(4000, 6, dtype=F64), torch.randn(4000, 10, dtype=F64)
    t = 0.3
    np.testing.assert_allclose(mp_sum(a, a.flip(0), t).numpy(),
                               ((1 - t) * a + t * a.flip(0)).numpy() / math.sqrt((1 - t) ** 2 + t**2))
    c = math.sqrt(16 / ((1 - t) ** 2 + t**2))
    expected = np.concatenate([a.numpy() * c * (1 - t) / math.sqrt(6), b.numpy() * c * t / math.sqrt(10)], axis=1)
    cat = mp_cat(a, b, t=t)
    np.testing.assert_allclose(cat.numpy(), expected)
    assert abs(cat.square().mean().item() - 1) < 0.03  # unit-variance inputs give a unit-variance output
    assert abs(mp_sum(a[:, :6], b[:, :6], t).square().mean().item() - 1) < 0.03
    x = torch.linspace(-5, 5, 101, dtype=F64)
    np.testing.assert_allclose(mp_silu(x).numpy(), (x / (1 + torch.exp(-x))).numpy() / 0.596)


def test_resample_down_is_a_box_average_and_up_is_nearest_neighbour():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    down = resample(x, mode="down")
    np.testing.assert_allclose(down.numpy(), x.numpy().reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5)))
    up = resample(x, mode="up")
    np.testing.assert_allclose(up.numpy(), x.numpy().repeat(2, axis=2).repeat(2, axis=3))
    assert resample(x, mode="keep") is x


def test_fourier_features_and_mpconv_in_eval_and_forced_training():
    fourier = MPFourier(8).to(F64)
    c = torch.tensor([0.3, -1.2], dtype=F64)
    expected = np.sqrt(2) * np.cos(np.outer(c.numpy(), fourier.freqs.numpy()) + fourier.phases.numpy())
    np.testing.assert_allclose(fourier(c).numpy(), expected, rtol=1e-5, atol=1e-6)  # computed in float32

    conv = MPConv(3, 4, kernel=[3, 3]).to(F64).eval()
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.5, 3, 4, dtype=F64)[:, None, None, None])  # rows of different norms
    w0 = conv.weight.detach().clone()
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    w = w0.numpy().reshape(4, -1)
    w_eff = w / (1e-4 + np.sqrt((w**2).mean(axis=1, keepdims=True))) * 0.7 / math.sqrt(27)
    expected = torch.nn.functional.conv2d(x, torch.from_numpy(w_eff.reshape(w0.shape)), padding=1)
    np.testing.assert_allclose(conv(x, gain=0.7).detach().numpy(), expected.numpy(), rtol=1e-6, atol=1e-9)
    assert torch.equal(conv.weight, w0)  # eval mode leaves the stored weight alone

    conv.train()
    y = conv(x)
    renormed = normalize(w0)
    assert torch.allclose(conv.weight, renormed)  # forced weight normalisation rewrote the stored weight
    twice = torch.nn.functional.conv2d(x, normalize(renormed) / math.sqrt(27), padding=1)
    np.testing.assert_allclose(y.detach().numpy(), twice.numpy(), rtol=1e-6, atol=1e-9)
    before = conv.weight.detach().clone()
    with forced_weight_norm(conv, False):
        conv(x)
    assert torch.equal(conv.weight, before) and conv.force_wn  # off for the block, restored after

    fc = MPConv(6, 2, kernel=[]).to(F64).eval()
    v = torch.randn(3, 6, dtype=F64)
    wf = fc.weight.detach().numpy()
    wf = wf / (1e-4 + np.sqrt((wf**2).mean(axis=1, keepdims=True))) / math.sqrt(6)
    np.testing.assert_allclose(fc(v).detach().numpy(), v.numpy() @ wf.T, rtol=1e-6)


def _attention_reference(x, qkv_w, proj_w, heads):
    """Cosine attention written out per head and pixel in numpy (float64)."""
    n, c, h, w = x.shape
    fc = lambda t, weight: np.einsum("nchw,oc->nohw", t, weight)  # noqa: E731 (1x1 convolution)
    qkv = fc(x, qkv_w).reshape(n, heads, c // heads, 3, h * w)
    qkv = qkv / (1e-4 + np.sqrt((qkv**2).mean(axis=2, keepdims=True)))
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    logits = np.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(c // heads)
    weights = np.exp(logits - logits.max(axis=3, keepdims=True))
    weights /= weights.sum(axis=3, keepdims=True)
    y = np.einsum("nhqk,nhck->nhcq", weights, v).reshape(n, c, h, w)
    return fc(y, proj_w)


def test_block_forward_matches_the_written_out_formulas():
    from ect.networks_edm2 import Block

    torch.manual_seed(1)
    block = randomized(Block(8, 16, 12, flavor="enc", resample_mode="down", attention=True, channels_per_head=8),
                       seed=3, scale=1.0).to(F64).eval()
    x, emb = torch.randn(2, 8, 8, 8, dtype=F64), torch.randn(2, 12, dtype=F64)

    def eff(conv, gain=1.0):
        w = conv.weight.detach().numpy()
        flat = w.reshape(w.shape[0], -1)
        return (flat / (1e-4 + np.sqrt((flat**2).mean(axis=1, keepdims=True)))).reshape(w.shape) * gain \
            / math.sqrt(flat.shape[1])

    conv = lambda t, w: torch.nn.functional.conv2d(torch.from_numpy(t), torch.from_numpy(w),  # noqa: E731
                                                   padding=w.shape[-1] // 2).numpy()
    silu = lambda t: t / (1 + np.exp(-t)) / 0.596  # noqa: E731
    h = x.numpy().reshape(2, 8, 4, 2, 4, 2).mean(axis=(3, 5))  # down
    h = conv(h, eff(block.conv_skip))
    h = h / (1e-4 + np.sqrt((h**2).mean(axis=1, keepdims=True)))  # pixel norm
    y = conv(silu(h), eff(block.conv_res0))
    cmod = emb.numpy() @ eff(block.emb_linear, block.emb_gain.item()).T + 1
    y = conv(silu(y * cmod[:, :, None, None]), eff(block.conv_res1))
    h = (0.7 * h + 0.3 * y) / math.sqrt(0.7**2 + 0.3**2)
    a = _attention_reference(h, eff(block.attn_qkv)[:, :, 0, 0], eff(block.attn_proj)[:, :, 0, 0], heads=2)
    h = np.clip((0.7 * h + 0.3 * a) / math.sqrt(0.7**2 + 0.3**2), -256, 256)
    np.testing.assert_allclose(block(x, emb).detach().numpy(), h, rtol=1e-5, atol=1e-7)


@torch.no_grad()
def test_preconditioning_scalings_and_labels():
    net = tiny().eval()
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.01, 1.0, 50.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 4, 9]), 10).float()
    d = net(x, sigma, labels).double()
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (0.25 + s**2).sqrt()
    f = net.unet((c_in * x.double()).float(), (s.flatten().log() / 4).float(), labels).double()
    np.testing.assert_allclose(d.numpy(), (c_skip * x.double() + c_out * f).numpy(), rtol=1e-5, atol=1e-5)
    # No labels: EDM2's single zero row, the same as an all-zero one-hot for every sample.
    np.testing.assert_allclose(net(x, sigma).numpy(), net(x, sigma, torch.zeros(3, 10)).numpy(), atol=1e-6)
    assert not torch.allclose(net(x, sigma, labels), net(x, sigma, labels.roll(1, 0)))  # the label matters
    # ECT's ImageNet preconditioning is EDM2's in train mode too (no σ_min shift); a fresh net outputs F = 0.
    fresh = build_network({**TINY, "dropout": 0.0})
    np.testing.assert_allclose(fresh.train()(x, sigma, labels).detach().numpy(), (c_skip.float() * x).numpy(),
                               rtol=1e-6, atol=1e-6)
    _, logvar = net(x, sigma, labels, return_logvar=True)
    assert logvar.shape == (3, 1, 1, 1)


# ---- sizes and ECT's changes -------------------------------------------------------------------------

@pytest.mark.parametrize("size, channels, with_logvar, without", [
    ("S", 192, 280_209_381, 280_209_253), ("M", 256, 497_803_173, 497_803_045),
    ("L", 320, 777_492_325, 777_492_197), ("XL", 384, 1_119_276_837, 1_119_276_709)])
def test_imagenet64_sizes_have_the_published_parameter_counts(size, channels, with_logvar, without):
    arch = dict(kind="edm2", img_resolution=64, img_channels=3, label_dim=1000, model_channels=channels)
    with torch.device("meta"):
        teacher, student = build_network(arch), build_network(student_arch(arch, {}))
    assert sum(p.numel() for p in teacher.parameters()) == with_logvar
    assert sum(p.numel() for p in student.parameters()) == without
    assert len(teacher.state_dict()) == 203 and len(student.state_dict()) == 200
    if size == "S":
        shapes = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
        assert shapes["unet.emb_noise.weight"] == (768, 192) and shapes["unet.emb_label.weight"] == (768, 1000)
        assert shapes["unet.enc.64x64_conv.weight"] == (192, 4, 3, 3)
        assert shapes["unet.enc.32x32_block0.conv_skip.weight"] == (384, 192, 1, 1)
        assert shapes["unet.enc.16x16_block0.attn_qkv.weight"] == (1728, 576, 1, 1)
        assert shapes["unet.dec.8x8_block0.conv_res0.weight"] == (768, 1536, 3, 3)
        assert shapes["unet.out_conv.weight"] == (3, 192, 3, 3) and shapes["logvar_linear.weight"] == (1, 128)
        assert list(shapes)[:3] == ["unet.out_gain", "unet.emb_fourier.freqs", "unet.emb_fourier.phases"]


def test_dropout_only_at_resolutions_up_to_dropout_res():
    with torch.device("meta"):
        net = build_network(dict(kind="edm2", img_resolution=64, img_channels=3, label_dim=0, model_channels=8,
                                 channels_per_head=8, dropout=0.4, dropout_res=16))
    dropout = {f"{part}.{name}": blk.dropout for part in ("enc", "dec")
               for name, blk in getattr(net.unet, part).items() if hasattr(blk, "dropout")}
    assert dropout["enc.16x16_down"] == dropout["dec.16x16_up"] == dropout["enc.8x8_block2"] == 0.4
    assert dropout["enc.32x32_down"] == dropout["dec.32x32_up"] == dropout["dec.64x64_block3"] == 0.0
    assert {k for k, v in dropout.items() if v} == {k for k in dropout if k.split(".")[1].split("x")[0] in ("16", "8")}


def test_ect_loss_on_an_edm2_student_leaves_the_weights_to_the_student_pass():
    """The target pass runs with forced weight normalisation off: backward works (no in-place change to a
    weight the student's graph saved) and the weights are those the student pass normalised."""
    net = tiny(dropout=0.2).train()
    y = torch.rand(4, 3, 16, 16) * 2 - 1
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 3, 7]), 10).float()
    cfg = ECTLossConfig(P_mean=-0.8, P_std=1.6, q=4, c=0.06, weighting="snrpk")
    loss, r = ect_loss(net, net, y, torch.randn(4, 1, 1, 1), torch.randn(4, 3, 16, 16), 0, cfg, labels)
    after_student = {k: v.clone() for k, v in net.state_dict().items()}
    loss.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in net.named_parameters()
               if not n.startswith("logvar"))
    assert all(torch.equal(after_student[k], v) for k, v in net.state_dict().items())
    w = net.unet.enc["16x16_conv"].weight
    rms = w.detach().flatten(1).square().mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)  # normalised once by the student pass


# ---- EDM2-format snapshots ---------------------------------------------------------------------------

PRECOND_KWARGS = {k: v for k, v in TINY.items() if k not in ("kind", "logvar_channels")}


def test_edm2_snapshot_converts_upcast_from_float16_and_reproduces_d(tmp_path):
    net = tiny(seed=2)
    src = tmp_path / "edm2-img16-xs-0000100-0.100.pkl"
    src.write_bytes(edm2_snapshot_bytes(net, {**PRECOND_KWARGS, "use_fp16": True}))
    proc = run_ect("convert-edm", str(src), str(tmp_path / "teacher.pt"))
    assert "log-variance head present" in proc.stdout + proc.stderr
    ckpt = read_checkpoint(tmp_path / "teacher.pt")
    assert ckpt["arch"]["kind"] == "edm2" and ckpt["arch"]["logvar_channels"] == 16 and ckpt["arch"]["use_fp16"]
    for name, t in net.state_dict().items():  # float16 on disk, float32 here: exactly the upcast values
        assert ckpt["state_dict"][name].dtype == torch.float32
        assert torch.equal(ckpt["state_dict"][name], t.half().float()), name
    loaded = load_network(tmp_path / "teacher.pt")
    reference = tiny(seed=2).eval()
    reference.load_state_dict({k: v.half().float() for k, v in reference.state_dict().items()})
    x, sigma = torch.randn(4, 3, 16, 16), torch.tensor([0.002, 0.5, 2.0, 80.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 9]), 10).float()
    assert torch.equal(loaded(x, sigma, labels), reference(x, sigma, labels))
    assert torch.equal(loaded(x, sigma), reference(x, sigma, None))


def test_ect_imagenet_snapshot_has_no_logvar_head_and_converts(tmp_path):
    net = tiny(seed=4, logvar_channels=0, dropout_res=8, dropout=0.3)
    arch, state, _ = read_edm_network(edm2_snapshot_bytes(net, {**PRECOND_KWARGS, "dropout_res": 8, "dropout": 0.3},
                                                          ect=True, dtype=torch.float32))
    assert arch["logvar_channels"] == 0 and arch["dropout_res"] == 8 and len(state) == len(net.state_dict())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_edm2_snapshot_with_a_global_outside_edm2s_list_is_refused(tmp_path):
    import numpy

    from tests.helpers import Persistent, _EasyDict, _edm2_convert

    # A snapshot whose loss_fn state carries a numpy scalar: on EDM's allow-list, never in an EDM2 file.
    net = tiny(seed=5)
    with fake_torch_utils(), fake_dnnlib():
        payload = pickle.dumps(_EasyDict(ema=_edm2_convert(net.eval().half(), PRECOND_KWARGS),
                                         loss_fn=Persistent("EDM2Loss", dict(P_mean=numpy.float64(-0.4)))),
                               protocol=4)
    with pytest.raises(EDMFormatError, match="only EDM2's globals"):
        read_edm_network(payload)
    (tmp_path / "x.pkl").write_bytes(payload)
    proc = run_ect("convert-edm", str(tmp_path / "x.pkl"), str(tmp_path / "x.pt"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "x.pt").exists()


def test_edm2_snapshot_with_unknown_network_options_is_refused():
    with pytest.raises(EDMFormatError, match="unsupported EDM2 network option"):
        read_edm_network(edm2_snapshot_bytes(tiny(), {**PRECOND_KWARGS, "model_type": "SomethingElse"}))
    with pytest.raises(EDMFormatError, match="model_channels"):
        read_edm_network(edm2_snapshot_bytes(tiny(), {**PRECOND_KWARGS, "model_channels": 100_000}))
