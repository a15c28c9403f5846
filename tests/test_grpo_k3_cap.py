"""GRPO's k3 KL penalty is capped per token (`grpo.k3_max`, default 10, as verl): value and
gradient below, around and beyond the cap against an independent float64 recomputation with plain
torch autograd (docs/loss.md, "grpo")."""
import pytest
import torch

from megatron_rasft.config import GRPOConfig, LossConfig
from megatron_rasft.loss import LossBatch, compute_loss

V = 11
BETA = 0.1
# d = log π_ref − log π_θ per token: well below the cap, just below / just above k3 = 10 on both
# sides (k3 = 10 at d ≈ 2.61087 and d ≈ −10.99998), far beyond, and beyond the ±20 log-ratio clamp.
D = [0.3, -0.7, 2.609, 2.613, -10.997, -11.003, 8.0, -15.0, 19.5, 25.0, -30.0]


def _batch(d_targets):
    g = torch.Generator().manual_seed(3)
    S = len(d_targets)
    logits = torch.randn(1, S, V, generator=g) * 2
    labels = torch.randint(0, V, (1, S), generator=g)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0]
    ref_logp = (logp + torch.tensor(d_targets, dtype=torch.float64)).float()
    return logits, labels, ref_logp


def _ours(logits, labels, ref_logp, gcfg):
    x = logits.clone().requires_grad_()
    mask = torch.ones(labels.shape)
    batch = LossBatch(labels_BS=labels, loss_mask_BS=mask, ref_logp_BS=ref_logp, old_logp_BS=torch.zeros(labels.shape),
                      advantage_BS=torch.zeros(labels.shape))
    loss, _, metrics = compute_loss(batch, x, cfg=LossConfig(method="grpo"), grpo=gcfg)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().double(), grad.double(), metrics


def _float64(logits, labels, ref_logp, cap):
    """β·Σ_t min(k3_t, cap) and its gradient: k3 = e^d − d − 1, d clamped to ±20; a token whose k3
    exceeds the cap contributes the constant cap (no gradient)."""
    x = logits.double().requires_grad_()
    logp = torch.log_softmax(x, -1).gather(-1, labels[..., None])[..., 0]
    d = (ref_logp.double() - logp).clamp(-20, 20)
    k3 = d.exp() - d - 1
    capped = torch.where(k3 > cap, torch.full_like(k3, cap), k3)
    loss = BETA * capped.sum()
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, capped.detach()[0], (k3 > cap).detach()[0]


@pytest.mark.parametrize("cap", [10.0, 3.0])
def test_k3_value_and_gradient_at_and_beyond_the_cap(cap):
    logits, labels, ref_logp = _batch(D)
    loss, grad, metrics = _ours(logits, labels, ref_logp, GRPOConfig(kl_coef=BETA, k3_max=cap))
    want_loss, want_grad, want_k3, beyond = _float64(logits, labels, ref_logp, cap)
    assert beyond.any() and (~beyond).any()
    if cap == 10.0:  # the straddling pairs sit on both sides of the cap
        assert beyond.tolist() == [False, False, False, True, False, True, True, True, True, True, True]
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert loss.item() <= BETA * cap * len(D)
    torch.testing.assert_close(metrics["kl_sum"].double(), want_k3.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    # Beyond the cap the token's gradient is exactly zero; below it, it is not.
    assert (grad[0][beyond] == 0).all()
    assert (grad[0][~beyond].abs().sum(-1) > 0).all()


def test_k3_cap_must_be_positive():
    with pytest.raises(ValueError, match="grpo.k3_max must be > 0"):
        GRPOConfig(k3_max=0.0)
