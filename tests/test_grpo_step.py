"""`grpo` through the trainer's step path with a real Megatron GPTModel (one spawned gloo process):
π_old from the forward-only scoring pass (`engine.refpass.score`, what a round will call), the GRPO
columns carried by `make_rows` and bound by `make_forward_step`, Megatron's schedule and its global
1/num_tokens. Checked against a float64 recomputation from the model's logits, before and after an
optimizer step (ρ = 1, then ρ ≠ 1 with both clips engaged).
"""
import torch

from helpers.distributed import spawn

MCFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, vocab_size=100,
            seq_length=24, max_position_embeddings=64, make_vocab_size_divisible_by=64)
ADV = [1.5, -0.5, -1.0, 0.0, 0.8, -0.3]


def _seqs():
    from megatron_rasft.data.batching import Seq

    g = torch.Generator().manual_seed(0)
    return [Seq(f"r0/p{i // 3}/{i % 3}", torch.randint(2, 100, (n,), generator=g).tolist(), 4)
            for i, n in enumerate([25, 12, 18, 9, 20, 14])]


def _reference(model, batches, gcfg):
    """float64: Σ c_t·ℓ_t / N from the model's logits (eval mode, the same weights), and mean ρ."""
    num = den = rho_sum = 0.0
    with torch.no_grad():
        for mb in batches:
            logits = model(mb["tokens"], mb["position_ids"], None)[..., :MCFG["vocab_size"]].double()
            logp = torch.log_softmax(logits, -1).gather(-1, mb["labels"][..., None])[..., 0]
            m, a = mb["loss_mask"].double(), mb["advantage"].double()
            rho = torch.exp(logp - mb["old_logp"].double())
            clipped = ((a > 0) & (rho > 1 + gcfg.eps_high)) | ((a < 0) & (rho < 1 - gcfg.eps_low))
            num += (m * torch.where(clipped, 0.0, a * rho) * -logp).sum().item()
            den += m.sum().item()
            rho_sum += (m * rho).sum().item()
    return num / den, rho_sum / den


def _worker(rank, world):
    from dataclasses import replace

    from megatron_rasft.config import GRPOConfig, LossConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_rasft.data.batching import make_rows, stack_microbatches
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.engine.optim import build_optimizer
    from megatron_rasft.engine.refpass import score
    from megatron_rasft.engine.step import (attach_schedule_hooks, forward_backward, global_metrics,
                                           make_forward_step, wrap_ddp)

    pcfg = ParallelConfig(use_distributed_optimizer=False)
    pgs = init_distributed(pcfg, seed=0)
    mcfg = ModelConfig(**MCFG)
    model = build_model(mcfg, pcfg)
    chunks = wrap_ddp([model], use_distributed_optimizer=False)
    attach_schedule_hooks(chunks)
    optimizer, _ = build_optimizer(chunks, OptimConfig(lr=3e-2, clip_grad=0.0), pcfg, total_steps=10)
    gcfg = GRPOConfig(eps_high=0.28)
    seqs = _seqs()
    old = score([model], seqs, pgs, micro_batch_size=2, seq_length=mcfg.seq_length, pad_id=0,
                vocab_size=mcfg.vocab_size)
    grpo_seqs = [replace(s, old_logp=old[s.key], advantage=a, rollout_logp=[x + 0.01 for x in old[s.key]])
                 for s, a in zip(seqs, ADV)]
    rows = make_rows(grpo_seqs, mcfg.seq_length, 0, pack=False)
    batches = stack_microbatches(rows, 2, mcfg.seq_length, 0)
    grpo_step = make_forward_step(make_loss_func(LossConfig(method="grpo"), tp_group=pgs.tp, grpo=gcfg),
                                  pgs, vocab_size=mcfg.vocab_size)

    def step(forward_step, batches, update):
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        metrics = global_metrics(forward_backward(chunks, forward_step, batches, seq_length=mcfg.seq_length), pgs)
        grads = [p.main_grad.detach().clone() for p in model.parameters()]
        if update:
            optimizer.step()
        return metrics, grads

    out = {"ref0": _reference(model, batches, gcfg)}
    # The same step as `sft` with seq_weight = A: the ρ = 1 identity through the whole path.
    sft_rows = make_rows([replace(s, weight=a) for s, a in zip(seqs, ADV)], mcfg.seq_length, 0, pack=False)
    sft_step = make_forward_step(make_loss_func(LossConfig(method="sft"), tp_group=pgs.tp), pgs, vocab_size=mcfg.vocab_size)
    out["sft"], out["sft_grads"] = step(sft_step, stack_microbatches(sft_rows, 2, mcfg.seq_length, 0), False)
    out["first"], out["first_grads"] = step(grpo_step, batches, True)
    out["ref1"] = _reference(model, batches, gcfg)  # after the update: ρ ≠ 1
    out["second"], _ = step(grpo_step, batches, False)
    return out


def test_grpo_step_through_megatron_matches_float64():
    out = spawn(_worker, 1, timeout_s=240)[0]
    first, second = out["first"], out["second"]
    (loss0, rho0), (loss1, rho1) = out["ref0"], out["ref1"]
    # ρ = 1: π_old is the scoring pass of the same weights.
    assert abs(first["ratio"] - 1) < 1e-6 and first["clip_frac_low"] == first["clip_frac_high"] == 0
    assert abs(first["loss"] - loss0) < 1e-5 * max(1, abs(loss0))
    assert abs(first["loss"] - out["sft"]["loss"]) < 1e-6
    for g, gs in zip(out["first_grads"], out["sft_grads"]):
        torch.testing.assert_close(g, gs, rtol=1e-5, atol=1e-7)
    assert abs(first["logp_mismatch"] - 0.01) < 1e-4  # the rollout log-probs were π_old + 0.01
    assert abs(first["advantage"] - sum(ADV) / len(ADV)) < 1e-6
    assert abs(first["zero_adv_frac"] - 1 / 6) < 1e-6
    # After one optimizer step: ρ moves, both clips engage, and the loss still matches float64.
    assert abs(second["ratio"] - rho1) < 1e-5 and abs(rho1 - 1) > 1e-3
    assert second["clip_frac_low"] > 0 and second["clip_frac_high"] > 0
    assert abs(second["loss"] - loss1) < 1e-5 * max(1, abs(loss1))
