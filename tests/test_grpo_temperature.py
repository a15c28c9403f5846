"""GRPO with rollouts sampled at temperature T ≠ 1: the trainer's update is the policy gradient of
the tempered policy softmax(logits / T) that sampled them (docs/loss.md, "Sampling temperature").

A real Megatron GPTModel in one spawned gloo process: π_old and the reference's log-probs from the
forward-only scoring pass (`train.refpass.score`, as the stream calls it), the step through
Megatron's schedule with the loss function the loop builds. Checked against the policy gradient
recomputed independently in float64 with plain torch autograd on a float64 copy of the model.
"""
import math

import torch

from megatron_rasft.testing.distributed import spawn

MCFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, vocab_size=100,
            seq_length=24, max_position_embeddings=64, make_vocab_size_divisible_by=64)
ADV = [1.5, -0.5, -1.0, 0.0, 0.8, -0.3]
T = 0.6
BETA = 0.1


def _seqs():
    from megatron_rasft.data.batching import Seq

    g = torch.Generator().manual_seed(0)
    return [Seq(f"r0/p{i // 3}/{i % 3}", torch.randint(2, 100, (n,), generator=g).tolist(), 4)
            for i, n in enumerate([25, 12, 18, 9, 20, 14])]


def _float64_gradient(model64, ref64, batches):
    """∇_θ of (1/N)·Σ_t m_t·(−A_t·log π_T(y_t) + β·k3_t) at π_old = π_θ (ρ = 1), every log-prob of
    the tempered softmax(logits / T), in float64 with plain autograd."""
    V = MCFG["vocab_size"]
    params = list(model64.parameters())
    total = 0.0
    den = sum(mb["loss_mask"].sum().item() for mb in batches)
    for mb in batches:
        logits = model64(mb["tokens"], mb["position_ids"], None)[..., :V]
        with torch.no_grad():
            ref_logits = ref64(mb["tokens"], mb["position_ids"], None)[..., :V]
        logp = torch.log_softmax(logits / T, -1).gather(-1, mb["labels"][..., None])[..., 0]
        ref_logp = torch.log_softmax(ref_logits / T, -1).gather(-1, mb["labels"][..., None])[..., 0]
        d = ref_logp - logp
        k3 = d.exp() - d - 1
        m, a = mb["loss_mask"].double(), mb["advantage"].double()
        total = total + (m * (-a * logp + BETA * k3)).sum() / den
    return [g.float() for g in torch.autograd.grad(total, params)]


def _worker(rank, world):
    from dataclasses import replace

    from megatron_rasft.config import (GRPOConfig, LossConfig, ModelConfig, ParallelConfig, RolloutConfig,
                                       RunConfig, SamplingConfig, ScheduleConfig, TrainConfig)
    from megatron_rasft.data.batching import make_rows, stack_microbatches
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.train.refpass import score
    from megatron_rasft.train.step import attach_schedule_hooks, forward_backward, global_metrics, \
        make_forward_step, wrap_ddp

    cfg = RunConfig(model=ModelConfig(**MCFG), parallel=ParallelConfig(use_distributed_optimizer=False),
                    loss=LossConfig(method="grpo"), grpo=GRPOConfig(kl_coef=BETA),
                    rollout=RolloutConfig(sampling=SamplingConfig(temperature=T)),
                    train=TrainConfig(schedule=ScheduleConfig(refresh_interval=1)))
    pgs = init_distributed(cfg.parallel, seed=0)
    model = build_model(cfg.model, cfg.parallel)
    reference = build_model(cfg.model, cfg.parallel)  # other weights: a non-zero KL
    model64, ref64 = build_model(cfg.model, cfg.parallel), build_model(cfg.model, cfg.parallel)
    for copy, orig in ((model64, model), (ref64, reference)):
        copy.load_state_dict(orig.state_dict())
        copy.double()
    chunks = wrap_ddp([model], use_distributed_optimizer=False)
    attach_schedule_hooks(chunks)
    seqs = _seqs()
    kw = dict(micro_batch_size=2, seq_length=cfg.model.seq_length, pad_id=0, vocab_size=cfg.model.vocab_size)
    # As TrainingStream scores π_old (the policy at the round boundary) and the reference.
    old = score([model], seqs, pgs, **kw, temperature=cfg.policy_temperature)
    ref = score([reference], seqs, pgs, **kw, temperature=cfg.policy_temperature)
    grpo_seqs = [replace(s, old_logp=old[s.key], ref_logp=ref[s.key], advantage=a) for s, a in zip(seqs, ADV)]
    batches = stack_microbatches(make_rows(grpo_seqs, cfg.model.seq_length, 0, pack=False), 2,
                                 cfg.model.seq_length, 0)
    # As the loop builds its loss function.
    step = make_forward_step(make_loss_func(cfg.loss, tp_group=pgs.tp, grpo=cfg.grpo,
                                            temperature=cfg.policy_temperature), pgs, vocab_size=cfg.model.vocab_size)
    for c in chunks:
        c.zero_grad_buffer()
    metrics = global_metrics(forward_backward(chunks, step, batches, seq_length=cfg.model.seq_length), pgs)
    grads = [p.main_grad.detach().clone() for p in model.parameters()]
    return {"metrics": metrics, "grads": grads, "expected": _float64_gradient(model64, ref64, batches)}


def test_grpo_update_is_the_tempered_policy_gradient():
    out = spawn(_worker, 1, timeout_s=240)[0]
    g = torch.cat([x.reshape(-1) for x in out["grads"]]).double()
    e = torch.cat([x.reshape(-1) for x in out["expected"]]).double()
    scale, cosine = (g.norm() / e.norm()).item(), torch.nn.functional.cosine_similarity(g, e, dim=0).item()
    assert out["metrics"]["ratio"] == 1.0 or abs(out["metrics"]["ratio"] - 1) < 1e-6, out["metrics"]["ratio"]
    assert abs(scale - 1) < 1e-4 and cosine > 1 - 1e-8, f"|g|/|g_true| = {scale:.6f}, cosine {cosine:.6f}"
    for got, want in zip(out["grads"], out["expected"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
