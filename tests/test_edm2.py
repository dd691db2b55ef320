"""EDM2's network (ect/networks_edm2.py): every magnitude-preserving formula in float64 against an
independent computation, the sizes of NVIDIA's ImageNet-64 models, ECT's changes, and EDM2-format
snapshots converted and compared."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from ect.checkpoint import load_network, read_checkpoint
from ect.data import save_dataset
from ect.edm.convert import read_edm_network
from ect.edm.pickle_reader import EDMFormatError
from ect.loss import ect_loss
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
from ect.sample import SamplingError, class_labels
from ect.spec import ECTLoss
from ect.train import power_function_beta, power_function_gamma
from tests.helpers import edm2_snapshot_bytes, fake_dnnlib, fake_torch_utils, randomized, run_ect, write_config

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


def test_resample_builds_its_filter_on_the_inputs_device(monkeypatch):
    """A CPU-built filter against a CUDA input fails on a GPU; here the input is on the meta device."""
    seen = []
    for name in ("conv2d", "conv_transpose2d"):
        real = getattr(torch.nn.functional, name)

        def checked(x, w, *args, _real=real, **kwargs):
            seen.append(w.device == x.device)
            return _real(x, w, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, name, checked)
    x = torch.zeros(1, 2, 4, 4, device="meta")
    assert resample(x, mode="down").shape == (1, 2, 2, 2) and resample(x, mode="up").shape == (1, 2, 8, 8)
    assert seen == [True, True]
    with pytest.raises(ValueError, match="even filter"):
        resample(torch.zeros(1, 2, 4, 4), f=(1, 2, 1), mode="down")


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
    cfg = ECTLoss(P_mean=-0.8, P_std=1.6, q=4, c=0.06, weighting="snrpk")
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


# ---- class-conditional training and sampling ----------------------------------------------------------

def _conditional_setup(tmp_path):
    """A 10-class dataset of 8x8 images (classes 0-3 only, unevenly) and a converted EDM2 teacher."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(48, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0] * 24 + [1] * 12 + [2] * 8 + [3] * 4)
    save_dataset(tmp_path / "data.npz", images, labels)
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=10, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[], channels_per_head=8, dropout=0.0, use_fp16=True)
    torch.manual_seed(0)
    net = randomized(build_network({"kind": "edm2", **kwargs, "logvar_channels": 8}), scale=1.0)
    (tmp_path / "teacher.pkl").write_bytes(edm2_snapshot_bytes(net, kwargs))
    run_ect("convert-edm", tmp_path / "teacher.pkl", tmp_path / "teacher.pt")
    return tmp_path / "data.npz", tmp_path / "teacher.pt", labels


def test_class_labels_per_seed_follow_the_dataset_frequencies_and_any_subset_reproduces():
    dataset_labels = np.array([0] * 700 + [1] * 200 + [7] * 100)
    labels = class_labels(range(20000), 10, "dataset", dataset_labels)
    freq = np.bincount(labels, minlength=10) / len(labels)
    np.testing.assert_allclose(freq[[0, 1, 7]], [0.7, 0.2, 0.1], atol=0.015)
    assert freq[[2, 3, 4, 5, 6, 8, 9]].sum() == 0
    assert np.array_equal(class_labels([5, 17, 19999], 10, "dataset", dataset_labels), labels[[5, 17, 19999]])
    uniform = class_labels(range(20000), 10, "uniform")
    assert np.all(np.abs(np.bincount(uniform, minlength=10) / 20000 - 0.1) < 0.012)
    with pytest.raises(SamplingError, match="needs the dataset"):
        class_labels([0], 10, "dataset", None)
    with pytest.raises(SamplingError, match="only 5 classes"):
        class_labels([0], 5, "dataset", dataset_labels)


def test_tune_from_an_edm2_teacher_uses_labels_drops_the_logvar_head_and_keeps_pf_emas(tmp_path):
    data, teacher, _ = _conditional_setup(tmp_path)
    config = write_config(tmp_path / "c.yaml", tune=dict(
        kimg=0.08, batch=8, optimizer="adam", betas=[0.9, 0.99], lr_schedule="isqrt", lr_decay_iters=2, grad_posinf=0,
        pf_ema_stds=[0.05, 0.1], output_ema_std=0.05, arch={"dropout": 0.2, "dropout_res": 4},
        loss={"P_mean": -0.8, "P_std": 1.6, "q": 4, "c": 0.06, "weighting": "snrpk", "double": 5}),
        pretrain={"arch": {"kind": "edm2", "label_dim": 10, "model_channels": 8, "channel_mult": [1, 2],
                           "attn_resolutions": [], "channels_per_head": 8}})  # the teacher's network
    proc = run_ect("tune", "--config", config, "--data", data, "--teacher", teacher, "--state-dir", tmp_path / "st",
                   "--out", tmp_path / "tuned.pt", "--threads", "1", "--no-progress")
    assert "logvar_fourier.freqs" in proc.stderr  # the teacher's log-variance head is reported as not used
    tuned = read_checkpoint(tmp_path / "tuned.pt")
    assert tuned["arch"]["logvar_channels"] == 0 and not tuned["arch"]["use_fp16"]
    assert not any(k.startswith("logvar") for k in tuned["state_dict"])
    assert tuned["meta"]["ema_std"] == 0.05 and "power function" in tuned["meta"]["ema"]
    emas = {p.name: read_checkpoint(p) for p in (tmp_path / "st" / "emas").glob("*.pt")}
    assert set(emas) == {"classic.pt", "pf-0.050.pt", "pf-0.100.pt"}
    assert all(torch.equal(emas["pf-0.050.pt"]["state_dict"][k], v) for k, v in tuned["state_dict"].items())
    assert not torch.equal(emas["pf-0.100.pt"]["state_dict"]["unet.out_gain"], tuned["state_dict"]["unet.out_gain"])


def test_power_function_ema_matches_edm2s_exponents_and_starts_from_the_run():
    assert [round(power_function_gamma(s), 2) for s in (0.010, 0.050, 0.100)] == [96.99, 16.97, 6.94]
    for std in (0.01, 0.05, 0.1):
        g = power_function_gamma(std)
        assert abs(g**3 + 7 * g**2 + (16 - std**-2) * g + (12 - std**-2)) < 1e-6 * std**-2
        assert power_function_beta(std, 0) == 0  # the first update replaces the average: it covers this run only
        assert power_function_beta(std, 99) == pytest.approx((99 / 100) ** (g + 1))


def test_conditional_samples_carry_their_labels_through_sampling_and_merging(tmp_path):
    data, teacher, labels = _conditional_setup(tmp_path)
    for name, seeds in (("a", "0-9"), ("b", "10-19")):
        run_ect("sample", "--checkpoint", teacher, "--seeds", seeds, "--batch", "4", "--dataset", data,
                "--out", tmp_path / f"{name}.npz", "--grid", tmp_path / f"{name}.png", "--no-progress")
    run_ect("merge-samples", tmp_path / "all.npz", tmp_path / "b.npz", tmp_path / "a.npz")
    run_ect("sample", "--checkpoint", teacher, "--seeds", "0-19", "--batch", "7", "--dataset", data,
            "--out", tmp_path / "one.npz", "--no-progress")
    merged, one = np.load(tmp_path / "all.npz"), np.load(tmp_path / "one.npz")
    assert np.array_equal(merged["labels"], one["labels"]) and np.array_equal(merged["images"], one["images"])
    assert np.array_equal(one["labels"], class_labels(range(20), 10, "dataset", labels))
    assert json.loads(str(one["meta"]))["class_labels"] == "dataset"
    # The label changes the image: the same seeds drawn uniformly give other classes and other images.
    run_ect("sample", "--checkpoint", teacher, "--seeds", "0-19", "--class-labels", "uniform",
            "--out", tmp_path / "u.npz", "--no-progress")
    uniform = np.load(tmp_path / "u.npz")
    differ = uniform["labels"] != one["labels"]
    assert differ.any() and not np.array_equal(uniform["images"][differ], one["images"][differ])
    assert np.array_equal(uniform["images"][~differ], one["images"][~differ])
    proc = run_ect("sample", "--checkpoint", teacher, "--seeds", "0-3", "--out", tmp_path / "x.npz", check=False)
    assert proc.returncode == 2 and "--dataset" in proc.stderr and not (tmp_path / "x.npz").exists()
