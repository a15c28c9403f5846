"""Tensor-parallel exactness: two gloo ranks, each holding half of the vocabulary, give the loss and
the gradient (shards concatenated) of the single-process full-vocab computation, for every method.

All cases run in ONE spawned job (starting processes costs seconds).
"""
import itertools

import pytest
import torch
import torch.distributed as dist

from megatron_rasft.config import LOSS_METHODS, GRPOConfig, LossConfig
from megatron_rasft.loss import (COEFFICIENTS, LossBatch, compute_loss, vocab_parallel_entropy, vocab_parallel_kl,
                                  vocab_parallel_logprob)
from helpers.distributed import spawn
from helpers.toy_loss import as_method, focal

B, S, V, TP = 2, 10, 16, 2
T_SAMPLE = 0.6  # a sampling temperature (GRPO)


def _batch(seed, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g) * 2
    ref_logits = logits + torch.randn(B, S, V, generator=g) * 1.5
    labels = torch.randint(0, V, (B, S), generator=g)  # ids of both halves of the vocab
    seq_id = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    loss_mask = ((seq_id >= 0) & (torch.rand(B, S, generator=g) > 0.25)).float()
    labels[seq_id < 0] = -100
    seq_weight = torch.rand(B, S, generator=g).gather(1, seq_id.clamp(min=0))
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, labels.clamp(0, V - 1)[..., None])[..., 0]
    # GRPO: π_old 0.7 nat around the policy (both clips engage), advantages of both signs and one 0.
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, labels.clamp(0, V - 1)[..., None])[..., 0]
    old_logp = logp + 0.7 * torch.randn(B, S, generator=g)
    advantage = torch.tensor([[1.2, -0.7, 0.0], [-1.1, 0.9, 0.0]]).gather(1, seq_id.clamp(min=0, max=2) % 3)
    rollout_logp = old_logp + 0.01 * torch.randn(B, S, generator=g)
    return dict(logits=logits, labels=labels, loss_mask=loss_mask, seq_id=seq_id, seq_weight=seq_weight,
                ref_logp=ref_logp, ref_logits=ref_logits, old_logp=old_logp, advantage=advantage,
                rollout_logp=rollout_logp)


def _cases():
    cases = [(LossConfig(method=m), None) for m in LOSS_METHODS if m not in ("rasft", "grpo")]
    cases += [(LossConfig(method="rasft", ratio=r, token_factor=f), None)
              for r, f in itertools.product(("sequence", "token", "none"), ("dft", "none"))]
    cases += [(LossConfig(method="grpo"), g) for g in (GRPOConfig(), GRPOConfig(eps_high=0.28, kl_coef=0.1),
                                                        GRPOConfig(loss_aggregation="seq_mean", kl_coef=0.05))]
    out = [(cfg, dict(_batch(i), grpo=g)) for i, (cfg, g) in enumerate(cases)]
    # GRPO on rollouts sampled at temperature T: every shard divides its logits by T.
    out.append((LossConfig(method="grpo"), dict(_batch(len(out), T_SAMPLE), grpo=GRPOConfig(kl_coef=0.1),
                                                            temperature=T_SAMPLE)))
    # A method registered only in the coefficient table (tests/test_loss_table.py) runs sharded too.
    out.append((as_method("focal"), dict(_batch(len(out)), grpo=None)))
    return out


def _run(batch, cfg, lo, hi, group):
    """Loss, gradient w.r.t. the logits columns [lo, hi) and metrics on one (shard of the) vocab."""
    logits = batch["logits"][..., lo:hi].clone().requires_grad_()
    lb = LossBatch(labels_BS=batch["labels"], loss_mask_BS=batch["loss_mask"], seq_id_BS=batch["seq_id"],
                   seq_weight_BS=batch["seq_weight"], ref_logp_BS=batch["ref_logp"],
                   ref_logits_BSv=batch["ref_logits"][..., lo:hi].clone(), old_logp_BS=batch["old_logp"],
                   advantage_BS=batch["advantage"], rollout_logp_BS=batch["rollout_logp"])
    loss, n, metrics = compute_loss(lb, logits, cfg=cfg, grpo=batch["grpo"], tp_group=group,
                                    temperature=batch.get("temperature", 1.0))
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), n, grad, metrics


def _worker(rank, world_size, cases):
    COEFFICIENTS["focal"] = focal  # this process's table (a fresh interpreter)
    dist.init_process_group("gloo")
    group = dist.new_group(list(range(world_size)))
    v = V // world_size
    lo, hi = rank * v, (rank + 1) * v
    out = {"cases": [_run(batch, cfg, lo, hi, group) for cfg, batch in cases]}
    batch = cases[0][1]
    x, y = batch["logits"].reshape(-1, V)[:, lo:hi], batch["ref_logits"].reshape(-1, V)[:, lo:hi]
    xg = x.clone().requires_grad_()
    kl = vocab_parallel_kl(xg, y, group)
    (kl_grad,) = torch.autograd.grad((kl * torch.arange(kl.numel())).sum(), xg)
    out["kl"], out["kl_grad"], out["entropy"] = kl.detach(), kl_grad, vocab_parallel_entropy(x, group)
    # Tempered log-prob and entropy of softmax(x / T), and the gradient of a weighted sum of log-probs.
    logp_t, ent_t = vocab_parallel_logprob(xg, batch["labels"].reshape(-1).clamp(0, V - 1), group,
                                           return_entropy=True, temperature=T_SAMPLE)
    (logp_t_grad,) = torch.autograd.grad((logp_t * torch.arange(logp_t.numel())).sum(), xg)
    out["tempered"] = (logp_t.detach(), ent_t, logp_t_grad)
    # Bad input seen by one rank only must make BOTH ranks raise (no rank left in a collective).
    errors = []
    for bad in (dict(logits=batch["logits"].clone().index_fill_(-1, torch.tensor([V - 1]), float("nan"))),
                dict(labels=batch["labels"].masked_fill(batch["loss_mask"] > 0, V))):
        try:
            _run(dict(batch, **bad), LossConfig(method="sft"), lo, hi, group)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def tp_results():
    cases = _cases()
    return cases, spawn(_worker, TP, cases, timeout_s=240)


def test_every_method_matches_single_process(tp_results, monkeypatch):
    monkeypatch.setitem(COEFFICIENTS, "focal", focal)
    cases, ranks = tp_results
    for i, (cfg, batch) in enumerate(cases):
        loss1, n1, grad1, m1 = _run(batch, cfg, 0, V, None)
        if cfg.method == "grpo":  # both sides of the clip engage in these cases
            assert m1["clip_low"] > 0 and m1["clip_high"] > 0
        for rank, out in enumerate(ranks):
            loss, n, grad, metrics = out["cases"][i]
            assert loss.item() != 0
            torch.testing.assert_close(loss, loss1, rtol=1e-5, atol=1e-6, msg=f"{cfg} rank {rank}")
            assert n.item() == n1.item()
            assert set(metrics) == set(m1)
            for name in m1:
                torch.testing.assert_close(metrics[name], m1[name], rtol=1e-5, atol=1e-5,
                                           msg=f"{cfg} metric {name}")
        grad_tp = torch.cat([out["cases"][i][2] for out in ranks], dim=-1)
        torch.testing.assert_close(grad_tp, grad1, rtol=1e-5, atol=1e-6, msg=str(cfg))


def test_kl_and_entropy_kernels_match_full_vocab(tp_results):
    cases, ranks = tp_results
    batch = cases[0][1]
    x = batch["logits"].reshape(-1, V).double().requires_grad_()
    ref_lsm = torch.log_softmax(batch["ref_logits"].reshape(-1, V).double(), -1)
    kl = (ref_lsm.exp() * (ref_lsm - torch.log_softmax(x, -1))).sum(-1)
    (kl_grad,) = torch.autograd.grad((kl * torch.arange(kl.numel())).sum(), x)
    lsm = torch.log_softmax(x.detach(), -1)
    entropy = -(lsm.exp() * lsm).sum(-1)
    for out in ranks:
        torch.testing.assert_close(out["kl"], kl.detach().float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["entropy"], entropy.float(), rtol=1e-5, atol=1e-6)
    grad_tp = torch.cat([out["kl_grad"] for out in ranks], dim=-1)
    torch.testing.assert_close(grad_tp, kl_grad.float(), rtol=1e-5, atol=1e-5)


def test_tempered_logprob_at_tp2_matches_float64(tp_results):
    """At TP = 2 the log-prob, entropy and gradient of softmax(logits / T) are the full-vocab
    float64 values (plain autograd), so GRPO's tempered π_θ is the same at TP = 1 and TP = 2."""
    cases, ranks = tp_results
    batch = cases[0][1]
    x = batch["logits"].reshape(-1, V).double().requires_grad_()
    lsm = torch.log_softmax(x / T_SAMPLE, -1)
    logp = lsm.gather(-1, batch["labels"].reshape(-1, 1).clamp(0, V - 1))[:, 0]
    (grad,) = torch.autograd.grad((logp * torch.arange(logp.numel())).sum(), x)
    entropy = -(lsm.exp() * lsm).sum(-1).detach()
    assert (logp - torch.log_softmax(x, -1).gather(-1, batch["labels"].reshape(-1, 1).clamp(0, V - 1))[:, 0]
            ).abs().max() > 0.1  # the temperature matters for this batch
    for out in ranks:
        logp_t, ent_t, _ = out["tempered"]
        torch.testing.assert_close(logp_t, logp.detach().float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ent_t, entropy.float(), rtol=1e-5, atol=1e-6)
    grad_tp = torch.cat([out["tempered"][2] for out in ranks], dim=-1)
    torch.testing.assert_close(grad_tp, grad.float(), rtol=1e-5, atol=1e-5)


def test_bad_input_raises_on_every_rank(tp_results):
    _, ranks = tp_results
    for out in ranks:
        nan_error, label_error = out["errors"]
        assert nan_error is not None and "logits contain NaN" in nan_error
        assert label_error is not None and f"labels must lie in [0, {V})" in label_error
