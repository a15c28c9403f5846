"""GRPO with rollouts sampled at temperature T ≠ 1: the trainer's update is the policy gradient of
the tempered policy softmax(logits / T) that sampled them; the SFT family (rasft) trains the
untempered model whatever the rollouts' temperature (docs/loss.md, "Sampling temperature").

The GRPO check runs a real Megatron GPTModel in one spawned gloo process: π_old and the reference's
log-probs from the training stream's own π_old and reference passes (`TrainingStream._old_logp_pass`,
`_reference_pass`, on the real models and caches), the step through Megatron's schedule with the
loss function the loop builds (`train.loop.build_loss_func`), at the first step
after a round (ρ = 1) and after an optimizer step (ρ ≠ 1, both clips engaged). The expected
gradient is recomputed independently in float64 with plain torch autograd on a float64 copy of the
model, from the clipped surrogate's own formula.
"""
import pytest
import torch

from megatron_rasft.config import (GRPOConfig, LossConfig, ModelConfig, ParallelConfig, RolloutConfig, RunConfig,
                                   SamplingConfig, TrainConfig, TrainDataConfig)
from megatron_rasft.loss import LossBatch, compute_loss
from helpers.distributed import spawn

MCFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, vocab_size=100,
            seq_length=24, max_position_embeddings=64, make_vocab_size_divisible_by=64)
ADV = [1.5, -0.5, -1.0, 0.0, 0.8, -0.3]
T = 0.6
BETA = 0.1


def _run_config(method, temperature=T, **grpo):
    return RunConfig(model=ModelConfig(**MCFG), parallel=ParallelConfig(use_distributed_optimizer=False),
                     loss=LossConfig(method=method), grpo=GRPOConfig(**grpo),
                     rollout=RolloutConfig(sampling=SamplingConfig(temperature=temperature), batches_per_round=1),
                     train=TrainConfig(data=TrainDataConfig(path="problems.jsonl", tokenizer="tok")))


def _seqs():
    from megatron_rasft.data.batching import Seq

    g = torch.Generator().manual_seed(0)
    return [Seq(f"r0/p{i // 3}/{i % 3}", torch.randint(2, 100, (n,), generator=g).tolist(), 4)
            for i, n in enumerate([25, 12, 18, 9, 20, 14])]


def _float64_gradient(model64, ref64, batches, gcfg):
    """∇_θ of (1/N)·Σ_t m_t·(−min(ρ_t·A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A_t) + β·min(k3_t, k3_max)),
    ρ_t = π_T(y_t)/π_old(y_t), every log-prob of the tempered softmax(logits / T); float64, plain
    autograd. Also the mean ρ and mean k3."""
    V = MCFG["vocab_size"]
    total, den = 0.0, sum(mb["loss_mask"].sum().item() for mb in batches)
    rho_sum = k3_sum = 0.0
    for mb in batches:
        logits = model64(mb["tokens"], mb["position_ids"], None)[..., :V]
        with torch.no_grad():
            ref_logits = ref64(mb["tokens"], mb["position_ids"], None)[..., :V]
        logp = torch.log_softmax(logits / T, -1).gather(-1, mb["labels"][..., None])[..., 0]
        ref_logp = torch.log_softmax(ref_logits / T, -1).gather(-1, mb["labels"][..., None])[..., 0]
        m, a = mb["loss_mask"].double(), mb["advantage"].double()
        rho = torch.exp(logp - mb["old_logp"].double())
        surrogate = -torch.minimum(rho * a, rho.clamp(1 - gcfg.eps_low, 1 + gcfg.eps_high) * a)
        d = ref_logp - logp
        k3 = d.exp() - d - 1
        k3 = torch.where(k3 > gcfg.k3_max, torch.full_like(k3, gcfg.k3_max), k3)
        total = total + (m * (surrogate + BETA * k3)).sum() / den
        rho_sum += (m * rho).sum().item()
        k3_sum += (m * k3).sum().item()
    grads = torch.autograd.grad(total, list(model64.parameters()))
    return [g.float() for g in grads], rho_sum / den, k3_sum / den


def _worker(rank, world, tmp):
    from dataclasses import replace
    from pathlib import Path
    from types import SimpleNamespace

    from megatron_rasft.config import OptimConfig
    from megatron_rasft.data.batching import make_rows, stack_microbatches
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.train.loop import build_loss_func
    from megatron_rasft.engine.model import Models
    from megatron_rasft.engine.optim import build_optimizer
    from megatron_rasft.engine.refpass import RefCache
    from megatron_rasft.engine.step import attach_schedule_hooks, forward_backward, global_metrics, \
        make_forward_step, wrap_ddp
    from megatron_rasft.train.stream import TrainingStream

    cfg = _run_config("grpo", kl_coef=BETA, eps_high=0.28)
    pgs = init_distributed(cfg.parallel, seed=0)
    model = build_model(cfg.model, cfg.parallel)
    reference = build_model(cfg.model, cfg.parallel)  # other weights: a non-zero KL
    model64, ref64 = build_model(cfg.model, cfg.parallel), build_model(cfg.model, cfg.parallel)
    ref64.load_state_dict(reference.state_dict())
    ref64.double()
    chunks = wrap_ddp([model], use_distributed_optimizer=False)
    attach_schedule_hooks(chunks)
    optimizer, _ = build_optimizer(chunks, OptimConfig(lr=3e-2, clip_grad=0.0), cfg.parallel, total_steps=10)
    seqs = _seqs()
    new = {s.key: s for s in seqs}
    # The stream's own π_old pass (the policy at the round boundary) and reference pass, on a stream
    # holding only what those two passes read.
    stream = SimpleNamespace(cfg=cfg, groups=pgs, models=Models(chunks, [reference], None, cfg.model, None, 0),
                             data=SimpleNamespace(pad_id=0, experts={}), times={"old_logp": 0.0, "reference": 0.0},
                             old_cache=RefCache(Path(tmp) / "old_logp", temperature=cfg.policy_temperature), old_logp={},
                             ref_cache=RefCache(Path(tmp) / "ref_logp", temperature=cfg.policy_temperature), ref_logp={})
    TrainingStream._old_logp_pass(stream, 0, new)
    TrainingStream._reference_pass(stream, 0, [], new)
    grpo_seqs = [replace(s, old_logp=stream.old_logp[s.key], ref_logp=stream.ref_logp[s.key], advantage=a)
                 for s, a in zip(seqs, ADV)]
    batches = stack_microbatches(make_rows(grpo_seqs, cfg.model.seq_length, 0, pack=False), 2,
                                 cfg.model.seq_length, 0)
    step = make_forward_step(build_loss_func(cfg, pgs), pgs, vocab_size=cfg.model.vocab_size)
    out = []
    for _ in range(2):  # the first step after the round (ρ = 1), then after one update (ρ ≠ 1)
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        metrics = global_metrics(forward_backward(chunks, step, batches, seq_length=cfg.model.seq_length), pgs)
        grads = [p.main_grad.detach().clone() for p in model.parameters()]
        model64.load_state_dict(model.state_dict())
        model64.double()
        out.append({"metrics": metrics, "grads": grads, "expected": _float64_gradient(model64, ref64, batches, cfg.grpo)})
        optimizer.step()
    return out


def test_grpo_update_is_the_tempered_policy_gradient(tmp_path):
    for i, step in enumerate(spawn(_worker, 1, str(tmp_path), timeout_s=240)[0]):
        metrics, (grads64, rho64, k3_64) = step["metrics"], step["expected"]
        g = torch.cat([x.reshape(-1) for x in step["grads"]]).double()
        e = torch.cat([x.reshape(-1) for x in grads64]).double()
        scale, cosine = (g.norm() / e.norm()).item(), torch.nn.functional.cosine_similarity(g, e, dim=0).item()
        assert abs(scale - 1) < 1e-4 and cosine > 1 - 1e-8, f"step {i}: |g|/|g_true| = {scale:.6f}, cosine {cosine:.6f}"
        for got, want in zip(step["grads"], grads64):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert abs(metrics["ratio"] - rho64) < 1e-5 and abs(metrics["kl"] - k3_64) < 1e-5 * max(1.0, k3_64)
        assert k3_64 > 1e-3  # the reference differs: the KL term is in the gradient
        if i == 0:  # π_old scored at T by the same weights: ρ = 1 exactly enough
            assert abs(metrics["ratio"] - 1) < 1e-6 and metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0
        else:
            assert abs(rho64 - 1) > 1e-3 and metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0


def test_policy_temperature_is_the_sampling_temperature_under_grpo_only():
    assert _run_config("grpo").policy_temperature == T
    assert _run_config("rasft").policy_temperature == 1.0
    assert _run_config("grpo", temperature=1.3).policy_temperature == 1.3
    with pytest.raises(ValueError, match="loss.method = 'grpo' needs rollout.sampling.temperature > 0"):
        _run_config("grpo", temperature=0.0)
    _run_config("rasft", temperature=0.0)  # greedy rollouts are fine for RASFT: they are only data


def _tiny_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=g)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    return logits, labels, torch.ones(2, 6)


@pytest.mark.parametrize("method", ["sft", "dft", "rasft"])
def test_sft_family_refuses_a_temperature(method):
    logits, labels, mask = _tiny_batch()
    with pytest.raises(ValueError, match=f"applies to loss.method='grpo' only; loss.method='{method}'"):
        compute_loss(LossBatch(labels_BS=labels, loss_mask_BS=mask), logits, cfg=LossConfig(method=method, ratio="none"),
                     temperature=0.6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature_raises(bad):
    logits, labels, mask = _tiny_batch()
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        compute_loss(LossBatch(labels_BS=labels, loss_mask_BS=mask, old_logp_BS=torch.zeros(2, 6),
                               advantage_BS=torch.ones(2, 6)), logits, cfg=LossConfig(method="grpo"), temperature=bad)


def test_ref_cache_refuses_values_scored_at_another_temperature(tmp_path):
    """RefCache records the temperature of its first saved group; reopening it at another one raises
    StaleRunDir naming the folder and both temperatures; a cache from before the record is taken."""
    from megatron_rasft.engine.refpass import RefCache
    from megatron_rasft.rundir import StaleRunDir

    root = tmp_path / "old_logp"
    RefCache(root, temperature=0.7).save("round_000", {"k": torch.tensor([-1.0, -2.0])})
    assert RefCache(root, temperature=0.7).load_all()["k"].tolist() == [-1.0, -2.0]
    with pytest.raises(StaleRunDir, match=rf"{root}: log-probs scored at temperature 0.7, this run's policy temperature is 1 "):
        RefCache(root, temperature=1.0)
    (root / RefCache.META).unlink()  # written by a version that did not record it
    assert RefCache(root, temperature=1.0).load("round_000")["k"].tolist() == [-1.0, -2.0]
