"""The ECT objective (and EDM's denoising loss for training a small teacher).

Formulas: docs/method.md, "The objective". Pure functions of tensors; randomness is passed
in explicitly so that the trainer controls (and can resume) every random stream.
"""
from __future__ import annotations

import contextlib

import torch

from ect.networks_edm2 import forced_weight_norm
from ect.spec import ECTLoss, EDMLoss


def t_to_r(t: torch.Tensor, stage: int, cfg: ECTLoss) -> torch.Tensor:
    """r = max(0, t·(1 − d·n(t))), d = q^−(stage+1); n = 1 + k·sigmoid(−b·t) ('sigmoid') or 1 ('const')."""
    d = cfg.q ** -(stage + 1)
    n = 1 + cfg.k * torch.sigmoid(-cfg.b * t) if cfg.mapping == "sigmoid" else torch.ones_like(t)
    return (t * (1 - d * n)).clamp(min=0)


def sample_t(normal: torch.Tensor, cfg) -> torch.Tensor:
    """t = exp(P_mean + P_std·n) from standard normals ``n`` (shape [B,1,1,1])."""
    return (cfg.P_mean + cfg.P_std * normal).exp()


def distance(delta: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample sqrt(‖Δ‖² + c²) − c over C·H·W (c = 0: the un-squared L2 norm)."""
    sq = delta.flatten(1).square().sum(dim=1)
    return (sq + c * c).sqrt() - c if c > 0 else sq.sqrt()


def weighting(t: torch.Tensor, r: torch.Tensor, cfg: ECTLoss) -> torch.Tensor:
    if cfg.weighting == "ect":
        return 1 / (t - r)
    return 1 / t**2 + 1 / cfg.sigma_data**2


@contextlib.contextmanager
def forked_rng(device: torch.device):
    """Run a block, then rewind the RNG of ``device`` (and the CPU's) to where it was before it."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def ect_loss(net, target_net, y, t_normal, eps, stage: int, cfg: ECTLoss, class_labels=None):
    """Per-sample ECT loss for clean images ``y``.

    ``net`` is the (possibly DDP-wrapped) student, in train mode; ``target_net`` the same weights
    unwrapped, used under no_grad. Both passes see identical dropout masks: the RNG is rewound
    after the student pass, so the target pass draws the same masks. An EDM2 network's forced weight
    normalisation is off in the target pass: the student's graph holds the weights it normalised, and
    the target must see those same weights, not a second normalisation. Returns (loss [B], r [B]).
    """
    t = sample_t(t_normal, cfg)
    r = t_to_r(t, stage, cfg)
    x_t, x_r = y + t * eps, y + r * eps
    with forked_rng(y.device):
        d_t = net(x_t, t.flatten(), class_labels=class_labels)
    live = r.flatten() > 0
    d_r = y  # r = 0: the target is the clean image (and the target pass is skipped if r = 0 everywhere)
    if live.any():
        with torch.no_grad(), forced_weight_norm(target_net, False):
            # r is clamped only to keep ln(r) finite for the r = 0 rows, which are replaced by y.
            d_r = torch.nan_to_num(target_net(x_r, r.flatten().clamp(min=1e-12), class_labels=class_labels))
        d_r = torch.where(live.reshape(-1, 1, 1, 1), d_r, y)
    loss = distance(d_t - d_r, cfg.c) * weighting(t, r, cfg).flatten()
    return loss, r.flatten()


def edm_loss(net, y, sigma_normal, eps, cfg: EDMLoss, class_labels=None, uncertainty: bool = False):
    """EDM's denoising loss: λ(σ)·‖D(y + σε, σ) − y‖² with λ = (σ² + σ_d²)/(σ·σ_d)², per sample (mean
    over pixels). ``uncertainty``: EDM2's form for a network with a log-variance head u(σ):
    λ/e^u·(D − y)² + u, which learns to even out the loss across noise levels."""
    sigma = sample_t(sigma_normal, cfg)
    weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2
    if not uncertainty:
        d = net(y + sigma * eps, sigma.flatten(), class_labels=class_labels)
        return (weight * (d - y).square()).flatten(1).mean(dim=1)
    d, logvar = net(y + sigma * eps, sigma.flatten(), class_labels=class_labels, return_logvar=True)
    return (weight / logvar.exp() * (d - y).square() + logvar).flatten(1).mean(dim=1)
