import math

import pytest
import torch
from scipy.stats import norm

from ect.loss import distance, ect_loss, edm_loss, sample_t, t_to_r, weighting
from ect.networks import build_network
from ect.spec import ECTLoss, EDMLoss
from ect.typed import ConfigError, build
from tests.helpers import randomized

F64 = torch.float64


def test_sigmoid_mapping_matches_formula_in_float64():
    cfg = ECTLoss()
    t = torch.logspace(-3, 2, 200, dtype=F64)
    for stage in range(8):
        d = 2.0 ** -(stage + 1)
        want = torch.tensor([max(0.0, x * (1 - d * (1 + 8 / (1 + math.exp(x))))) for x in t.tolist()], dtype=F64)
        torch.testing.assert_close(t_to_r(t, stage, cfg), want, rtol=1e-13, atol=0)


def test_const_mapping():
    cfg = ECTLoss(mapping="const", q=4)
    t = torch.tensor([0.01, 1.0, 80.0], dtype=F64)
    torch.testing.assert_close(t_to_r(t, 1, cfg), t * (1 - 4.0**-2), rtol=1e-15, atol=0)


@pytest.mark.parametrize("stage,threshold,p_zero", [(0, math.log(7), 0.811), (1, math.log(5 / 3), 0.585)])
def test_worked_numbers_from_the_reference(stage, threshold, p_zero):
    cfg = ECTLoss()  # q = 2, k = 8, b = 1, P_mean = -1.1, P_std = 2
    eps = 1e-9
    assert t_to_r(torch.tensor([threshold - eps], dtype=F64), stage, cfg).item() == 0
    assert t_to_r(torch.tensor([threshold + 1e-6], dtype=F64), stage, cfg).item() > 0
    assert norm.cdf((math.log(threshold) - cfg.P_mean) / cfg.P_std) == pytest.approx(p_zero, abs=5e-4)
    t = sample_t(torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=F64), cfg)
    assert (t_to_r(t, stage, cfg) == 0).double().mean().item() == pytest.approx(p_zero, abs=3e-3)


def test_later_stages_never_clamp_and_ratio_bounds():
    cfg = ECTLoss()
    t = torch.logspace(-4, 3, 500, dtype=F64)
    for stage in range(2, 8):
        r = t_to_r(t, stage, cfg)
        d = 2.0 ** -(stage + 1)
        assert (r > 0).all()
        gap = (t - r) / t
        assert gap.min().item() == pytest.approx(d, rel=1e-3) and gap.max().item() < 5 * d


def test_one_hour_schedule_q256():
    cfg = ECTLoss(q=256, double=10**9)
    assert cfg.stage_at(10**6) == 0
    t = torch.logspace(-4, 3, 100, dtype=F64)
    gap = (t - t_to_r(t, 0, cfg)) / t
    assert gap.max().item() == pytest.approx(5 / 256, rel=1e-3) and gap.min().item() == pytest.approx(1 / 256, rel=1e-3)


def test_stage_advances_every_double_iterations():
    assert [ECTLoss(double=25_000).stage_at(i) for i in (0, 24_999, 25_000, 199_999)] == [0, 0, 1, 7]


def test_distance_and_weighting():
    delta = torch.randn(4, 3, 5, 5, dtype=F64)
    sq = delta.square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(distance(delta, 0.0), sq.sqrt())
    torch.testing.assert_close(distance(delta, 0.06), (sq + 0.06**2).sqrt() - 0.06)
    t, r = torch.tensor([2.0, 0.5], dtype=F64), torch.tensor([1.0, 0.0], dtype=F64)
    torch.testing.assert_close(weighting(t, r, ECTLoss()), torch.tensor([1.0, 2.0], dtype=F64))
    torch.testing.assert_close(weighting(t, r, ECTLoss(weighting="snrpk")), 1 / t**2 + 4)


def test_bad_loss_options_are_named():
    with pytest.raises(ConfigError, match="loss.mapping: 'linear' is not one of"):
        build(ECTLoss, {"mapping": "linear"}, "loss")
    with pytest.raises(ConfigError, match="loss.weighting"):
        build(ECTLoss, {"weighting": "x"}, "loss")
    with pytest.raises(ConfigError, match="loss.q: 1 is less than or equal to the minimum of 1"):
        build(ECTLoss, {"q": 1}, "loss")


def _net(dropout):
    arch = dict(kind="ect", img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4], dropout=dropout)
    return randomized(build_network(arch), scale=0.1).train()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_ect_loss_matches_manual_computation_with_shared_dropout_masks(device):
    net = _net(dropout=0.5).to(device)
    cfg = ECTLoss()
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(6, 3, 8, 8, generator=g) * 2 - 1).to(device)
    tn = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0], device=device).reshape(-1, 1, 1, 1)  # r = 0 and r > 0 at stage 0
    eps = torch.randn(6, 3, 8, 8, generator=g).to(device)
    torch.manual_seed(123)
    loss, r = ect_loss(net, net, y, tn, eps, 0, cfg)
    assert (r == 0).any() and (r > 0).any()

    t = (cfg.P_mean + cfg.P_std * tn).exp()
    r4 = t_to_r(t, 0, cfg)
    torch.manual_seed(123)
    d_t = net(y + t * eps, t.flatten())
    torch.manual_seed(123)  # the same masks for the target pass
    with torch.no_grad():
        d_r = net(y + r4 * eps, r4.flatten().clamp(min=1e-12))
    d_r = torch.where(r4 > 0, d_r, y)  # r = 0: the target is the clean image
    want = (d_t - d_r).flatten(1).norm(dim=1) / (t - r4).flatten()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)

    # Different masks for the target would change the loss: the test above can fail.
    torch.manual_seed(123)
    d_t2 = net(y + t * eps, t.flatten())
    with torch.no_grad():
        d_r2 = torch.where(r4 > 0, net(y + r4 * eps, r4.flatten().clamp(min=1e-12)), y)
    other = (d_t2 - d_r2).flatten(1).norm(dim=1) / (t - r4).flatten()
    assert not torch.allclose(other[(r4 > 0).flatten()], want[(r4 > 0).flatten()], rtol=1e-3)


def test_r_zero_everywhere_targets_clean_image_and_gradient_flows_only_through_student():
    net = _net(dropout=0.0)
    cfg = ECTLoss()
    y = torch.zeros(3, 3, 8, 8)
    tn = torch.full([3, 1, 1, 1], -3.0)  # t = exp(-7.1): r = 0 at stage 0
    eps = torch.randn(3, 3, 8, 8)
    loss, r = ect_loss(net, net, y, tn, eps, 0, cfg)
    assert (r == 0).all()
    t = math.exp(-1.1 - 6.0)
    with torch.no_grad():
        want = net(y + t * eps, torch.full([3], t)).flatten(1).norm(dim=1) / t
    torch.testing.assert_close(loss.detach(), want)
    loss.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_edm_loss_weighting():
    net = _net(dropout=0.0)
    cfg = EDMLoss()
    y, eps = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    tn = torch.tensor([-1.0, 1.0]).reshape(-1, 1, 1, 1)
    sigma = (cfg.P_mean + cfg.P_std * tn).exp()
    with torch.no_grad():
        got = edm_loss(net, y, tn, eps, cfg)
        d = net(y + sigma * eps, sigma.flatten())
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(got, (lam * (d - y) ** 2).flatten(1).mean(1))
