import math

import numpy as np
import pytest
import torch

from ect.networks import PositionalEmbedding, Precond, build_network, count_parameters
from tests.helpers import randomized

CIFAR_UNET = dict(img_resolution=32, img_channels=3, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                  attn_resolutions=[16], dropout=0.2)


def test_cifar10_network_has_the_paper_parameter_count_and_edm_names():
    net = build_network(dict(kind="ect", **CIFAR_UNET))
    assert count_parameters(net) == 55_732_739
    sd = net.state_dict()
    assert len(sd) == 424 and len(list(net.parameters())) == 416
    expected = {"model.enc.32x32_conv.weight": (128, 3, 3, 3), "model.enc.32x32_block0.conv0.weight": (256, 128, 3, 3),
                "model.enc.16x16_down.skip.resample_filter": (1, 1, 2, 2), "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
                "model.dec.8x8_in0.proj.weight": (256, 256, 1, 1), "model.dec.32x32_block4.skip.weight": (256, 384, 1, 1),
                "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3)}
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape
    assert torch.all(sd["model.enc.16x16_down.skip.resample_filter"] == 0.25)
    # EDM's checkpoint carries the augment conditioning: one more [128, 9] weight.
    edm = build_network(dict(kind="edm", augment_dim=9, **CIFAR_UNET))
    assert count_parameters(edm) == 55_732_739 + 128 * 9
    assert tuple(edm.state_dict()["model.map_augment.weight"].shape) == (128, 9)


def test_positional_embedding_matches_formula():
    emb = PositionalEmbedding(8, endpoint=True)(torch.tensor([0.3, -1.0], dtype=torch.float64))
    freqs = [(1 / 10000) ** (j / 3) for j in range(4)]
    want = [[math.cos(c * f) for f in freqs] + [math.sin(c * f) for f in freqs] for c in (0.3, -1.0)]
    np.testing.assert_allclose(emb.numpy(), want, rtol=1e-6)  # EDM computes the frequencies in float32


@pytest.mark.parametrize("sigma", [0.003, 0.05, 0.821, 80.0])
def test_preconditioning_scalings(sigma, small_arch):
    sd, smin = 0.5, 0.003
    net = build_network(small_arch)
    s = torch.tensor(sigma, dtype=torch.float64)
    net.train()
    c_skip, c_out, c_in, c_noise = net.scalings(s)
    assert c_skip == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-12)
    assert c_out == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c_in == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c_noise == pytest.approx(math.log(sigma) / 4, rel=1e-12)
    net.eval()
    c_skip, c_out, c_in, _ = net.scalings(s)
    assert c_skip == pytest.approx(sd**2 / ((sigma - smin) ** 2 + sd**2), rel=1e-12)
    assert c_out == pytest.approx((sigma - smin) * sd / math.sqrt(sigma**2 + sd**2), rel=1e-12, abs=1e-15)
    edm = build_network({**small_arch, "kind": "edm"}).eval()
    assert edm.scalings(s)[0] == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-12)


def test_consistency_boundary_condition_in_eval_mode(small_arch):
    net = randomized(build_network(small_arch)).eval()
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(net(x, torch.full([3], 0.003)), x, rtol=0, atol=1e-6)
    assert not torch.allclose(net.train()(x, torch.full([3], 0.003)), x, atol=1e-4)


def test_forward_shapes_labels_and_scalar_sigma(small_arch):
    net = randomized(build_network({**small_arch, "label_dim": 4})).eval()
    x = torch.randn(2, 3, 8, 8)
    y = net(x, 1.5, class_labels=torch.eye(4)[:2])
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(net(x, 1.5), net(x, torch.tensor([1.5, 1.5])))


def test_bad_precond_kind():
    with pytest.raises(ValueError, match="precond kind"):
        Precond(kind="vp")
