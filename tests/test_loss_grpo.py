"""`loss.method = "grpo"` against a float64 reference written here from the formulas (PPO's clipped
surrogate with autograd, the k3 KL, group advantages by torch.std), plus its degenerate cases:
ρ = 1 is the plain policy gradient −Σ A·log π, and a group with equal rewards has exactly zero gradient.
"""
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from megatron_rasft.methods.advantages import group_advantages
from megatron_rasft.config import GRPOConfig, LossConfig
from megatron_rasft.loss import LossBatch, compute_loss, make_loss_func

B, S, V = 4, 10, 13
C = LossConfig().ratio_log_clamp

# Packed layout: seq_id per row (−1 = padding); sequences are (row, seq_id) pairs, in this order.
SEQ_ID = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
                       [0, 0, 0, 0, 0, 0, 0, -1, -1, -1],
                       [0, 0, 0, 0, 1, 1, 1, 2, 2, 2],
                       [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
PACKED_SEQS = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2), (3, 0)]
PACKED_GROUPS = {"g0": [0, 1, 2], "g1": [3, 4], "g2": [5, 6]}  # group → indices into PACKED_SEQS
ROW_SEQS = [(b, 0) for b in range(B)]
ROW_GROUPS = {"g0": [0, 1], "g1": [2, 3]}


def make_batch(seed, packed, rewards):
    """Logits, labels, mask, per-token advantage (from `rewards` by group_advantages), old log-probs
    0.4-nat-noisy around the policy's (ρ on both sides of both clips), reference and rollout log-probs."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g) * 2
    labels = torch.randint(0, V, (B, S), generator=g)
    seq_id = SEQ_ID.clone() if packed else torch.zeros(B, S, dtype=torch.long)
    loss_mask = (seq_id >= 0).float()
    starts = (seq_id != torch.roll(seq_id, 1, dims=1)) | (torch.arange(S) == 0)
    loss_mask[starts] = 0  # each sequence's first position is prompt
    labels[seq_id < 0] = -100
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old_logp = (logp + 0.4 * torch.randn(B, S, generator=g, dtype=torch.float64)).float()
    ref_logp = (logp + 0.6 * torch.randn(B, S, generator=g, dtype=torch.float64)).float()
    rollout_logp = old_logp + 0.01 * torch.randn(B, S, generator=g)
    rollout_logp[:, 1::3] = float("nan")  # not every token's server log-prob is known
    seqs, groups = (PACKED_SEQS, PACKED_GROUPS) if packed else (ROW_SEQS, ROW_GROUPS)
    return dict(logits=logits, labels=labels, loss_mask=loss_mask, seq_id=seq_id if packed else None,
                old_logp=old_logp, ref_logp=ref_logp, rollout_logp=rollout_logp, seqs=seqs, groups=groups,
                rewards=rewards)


def per_token(batch, values_per_seq):
    out = torch.zeros(B, S)
    seq_id = batch["seq_id"] if batch["seq_id"] is not None else torch.zeros(B, S, dtype=torch.long)
    for (b, s), val in zip(batch["seqs"], values_per_seq):
        out[b][seq_id[b] == s] = val
    return out


def our_advantages(batch, gcfg):
    adv = group_advantages(batch["rewards"], gcfg).advantages
    per_seq = [0.0] * len(batch["seqs"])
    for name, members in batch["groups"].items():
        for j, i in enumerate(members):
            per_seq[i] = adv[name][j]
    return per_token(batch, per_seq)


def loss_batch(labels, loss_mask, **per_token):
    """The loss's typed micro-batch; each `name=` given is its `[B, S]` field `name_BS`."""
    return LossBatch(labels_BS=labels, loss_mask_BS=loss_mask, **{f"{k}_BS": v for k, v in per_token.items()})


def run_ours(batch, gcfg, advantage=None, old_logp=None):
    logits = batch["logits"].clone().requires_grad_()
    advantage = our_advantages(batch, gcfg) if advantage is None else advantage
    lb = loss_batch(batch["labels"], batch["loss_mask"], seq_id=batch["seq_id"], ref_logp=batch["ref_logp"],
                    advantage=advantage, old_logp=batch["old_logp"] if old_logp is None else old_logp,
                    rollout_logp=batch["rollout_logp"])
    loss, n, m = compute_loss(lb, logits, cfg=LossConfig(method="grpo"), grpo=gcfg)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), n, m, grad


def reference(batch, gcfg):
    """float64: the surrogate objective's gradient w.r.t. the logits, the loss value (the coefficient
    form Σ sg(c_t)·ℓ_t + β·Σ k3_t, scaled by 1/|s| under seq_mean), the normaliser, metric sums."""
    logits = batch["logits"].double().requires_grad_()
    lsm = torch.log_softmax(logits, -1)
    seq_id = batch["seq_id"] if batch["seq_id"] is not None else torch.zeros(B, S, dtype=torch.long)
    adv_seq = {}
    for name, members in batch["groups"].items():
        r = torch.tensor(batch["rewards"][name], dtype=torch.float64)
        if bool((r == r[0]).all()):
            a = torch.zeros_like(r)
        elif gcfg.scale_by_std:
            a = (r - r.mean()) / (r.std() + gcfg.eps)
        else:
            a = r - r.mean()
        for j, i in enumerate(members):
            adv_seq[batch["seqs"][i]] = a[j].item()
    objective = logits.new_zeros(())
    value = 0.0
    m = dict(clip_low=0, clip_high=0, ratio_sum=0.0, weight_sum=0.0, surrogate_sum=0.0, kl_sum=0.0, mismatch_sum=0.0,
             mismatch_count=0, adv_sum=0.0, zero_adv_seqs=0)
    live = []
    for (b, s) in batch["seqs"]:
        toks = [t for t in range(S) if seq_id[b, t] == s and batch["loss_mask"][b, t] > 0]
        if not toks:
            continue
        live.append((b, s))
        A = adv_seq[(b, s)]
        m["adv_sum"] += A
        m["zero_adv_seqs"] += A == 0
        scale = 1.0 / len(toks) if gcfg.loss_aggregation == "seq_mean" else 1.0
        for t in toks:
            logp = lsm[b, t, batch["labels"][b, t]]
            old = float(batch["old_logp"][b, t])
            rho = torch.exp(torch.clamp(logp - old, -C, C))
            rho_clip = torch.clamp(rho, 1 - gcfg.eps_low, 1 + gcfg.eps_high)
            surr = -(rho * A if (rho * A).item() <= (rho_clip * A).item() else rho_clip * A)
            d = float(batch["ref_logp"][b, t]) - logp
            k3 = torch.exp(d) - d - 1
            objective = objective + scale * (surr + gcfg.kl_coef * k3)
            low = A < 0 and rho.item() < 1 - gcfg.eps_low
            high = A > 0 and rho.item() > 1 + gcfg.eps_high
            coef = 0.0 if (low or high) else A * rho.item()
            value += scale * (coef * -logp.item() + gcfg.kl_coef * k3.item())
            m["clip_low"] += low
            m["weight_sum"] += coef
            m["clip_high"] += high
            m["ratio_sum"] += rho.item()
            m["surrogate_sum"] += surr.item()
            m["kl_sum"] += k3.item()
            roll = float(batch["rollout_logp"][b, t])
            if not math.isnan(roll):
                m["mismatch_sum"] += abs(old - roll)
                m["mismatch_count"] += 1
    m["num_tokens"] = float(batch["loss_mask"].sum())
    m["num_seqs"] = len(live)
    norm = m["num_seqs"] if gcfg.loss_aggregation == "seq_mean" else m["num_tokens"]
    (grad,) = torch.autograd.grad(objective, logits)
    return grad, value, norm, m


REWARDS_PACKED = {"g0": [1.0, 0.0, 0.0], "g1": [0.25, 1.0], "g2": [1.0, 1.0]}
REWARDS_ROWS = {"g0": [0.0, 1.0], "g1": [0.7, 0.2]}
CASES = [
    ("defaults", GRPOConfig()),
    ("dr_grpo", GRPOConfig(scale_by_std=False)),
    ("dapo_clip_higher", GRPOConfig(eps_high=0.28)),
    ("seq_mean_kl", GRPOConfig(loss_aggregation="seq_mean", kl_coef=0.1)),
    ("dr_grpo_kl", GRPOConfig(scale_by_std=False, kl_coef=0.05, eps_low=0.1, eps_high=0.3)),
]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
@pytest.mark.parametrize("name,gcfg", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_reference(name, gcfg, packed):
    batch = make_batch(seed=len(name), packed=packed, rewards=REWARDS_PACKED if packed else REWARDS_ROWS)
    loss, n, m, grad = run_ours(batch, gcfg)
    ref_grad, value, norm, ref_m = reference(batch, gcfg)
    # Both sides of the clip, and negative advantages, are exercised.
    assert ref_m["clip_low"] > 0 and ref_m["clip_high"] > 0
    torch.testing.assert_close(loss.double(), torch.tensor(value, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(grad) > 0
    assert n.item() == norm
    for key in ("clip_low", "clip_high", "num_seqs", "num_tokens", "zero_adv_seqs", "mismatch_count"):
        assert m[key].item() == ref_m[key], key
    for key in ("ratio_sum", "weight_sum", "surrogate_sum", "adv_sum", "mismatch_sum") + (("kl_sum",) if gcfg.kl_coef else ()):
        torch.testing.assert_close(m[key].double(), torch.tensor(float(ref_m[key]), dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5, msg=key)
    if not gcfg.kl_coef:
        assert "kl_sum" not in m


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
def test_dapo_clip_higher_tells_the_two_bounds_apart(packed):
    """DAPO's decoupled bounds (ε_low = 0.2, ε_high = 0.28) on tokens placed between them: every
    other loss token with A > 0 has ρ = 1.24 ∈ (1 + ε_low, 1 + ε_high), so it keeps its gradient (a
    single bound 0.2 would clip it), and every other one with A < 0 has ρ = 0.76 ∈ (1 − ε_high, 1 − ε_low),
    so it loses its gradient (a single bound 0.28 would keep it). Loss, gradient and clip counts
    equal the float64 reference; the same batch with ε_high = ε_low = 0.2 differs in the gradient."""
    gcfg = GRPOConfig(eps_low=0.2, eps_high=0.28)
    batch = make_batch(seed=11, packed=packed, rewards=REWARDS_PACKED if packed else REWARDS_ROWS)
    adv = our_advantages(batch, gcfg)
    logp = torch.log_softmax(batch["logits"].double(), -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    on = batch["loss_mask"] > 0
    pick = on & (torch.arange(B * S).reshape(B, S) % 2 == 0)
    between_high, between_low = pick & (adv > 0), pick & (adv < 0)
    assert between_high.sum() >= 2 and between_low.sum() >= 2
    old = batch["old_logp"].double()
    old = torch.where(between_high, logp - math.log(1.24), old)
    old = torch.where(between_low, logp - math.log(0.76), old)
    batch["old_logp"] = old.float()
    loss, n, m, grad = run_ours(batch, gcfg)
    ref_grad, value, norm, ref_m = reference(batch, gcfg)
    torch.testing.assert_close(loss.double(), torch.tensor(value, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-5, atol=1e-6)
    assert m["clip_low"].item() == ref_m["clip_low"] >= between_low.sum().item()
    assert m["clip_high"].item() == ref_m["clip_high"]
    # The tokens between the bounds: the high ones still carry A·ρ·∇ℓ, the low ones nothing.
    rows = on.nonzero()
    grad_rows = grad.reshape(B * S, V)[(rows[:, 0] * S + rows[:, 1])]
    for (b, t), g in zip(rows.tolist(), grad_rows):
        if between_high[b, t]:
            assert g.abs().sum() > 1e-6, (b, t)
        if between_low[b, t]:
            assert g.abs().sum() == 0, (b, t)
    single = run_ours(batch, GRPOConfig(eps_low=0.2, eps_high=0.2))[3]
    assert (single - grad).abs().max() > 1e-3


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
def test_rho_one_is_the_plain_policy_gradient(packed):
    """π_old = π_θ (the first step after a round): loss and gradient of −Σ A·log π, in float64."""
    batch = make_batch(seed=7, packed=packed, rewards=REWARDS_PACKED if packed else REWARDS_ROWS)
    gcfg = GRPOConfig()
    adv = our_advantages(batch, gcfg)
    exact_old = torch.log_softmax(batch["logits"].double(), -1).gather(
        -1, batch["labels"].clamp(min=0)[..., None])[..., 0].float()
    loss, n, m, grad = run_ours(batch, gcfg, old_logp=exact_old)
    assert m["clip_low"].item() == 0 and m["clip_high"].item() == 0
    x = batch["logits"].double().requires_grad_()
    logp = torch.log_softmax(x, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    pg = -(adv.double() * batch["loss_mask"].double() * logp).sum()
    (pg_grad,) = torch.autograd.grad(pg, x)
    torch.testing.assert_close(loss.double(), pg.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, pg_grad.float(), rtol=1e-5, atol=1e-6)
    # And with ρ exactly 1 (π_old the kernel's own fp32 log-prob) it is bit for bit `sft` weighted by A.
    from megatron_rasft.loss import vocab_parallel_logprob

    own = vocab_parallel_logprob(batch["logits"].reshape(B * S, V), batch["labels"].reshape(-1)).view(B, S).detach()
    loss1, _, _, grad1 = run_ours(batch, gcfg, old_logp=own)
    logits = batch["logits"].clone().requires_grad_()
    sft, _, _ = compute_loss(loss_batch(batch["labels"], batch["loss_mask"], seq_id=batch["seq_id"], seq_weight=adv),
                             logits, cfg=LossConfig(method="sft"))
    (sft_grad,) = torch.autograd.grad(sft, logits)
    assert torch.equal(loss1, sft.detach()) and torch.equal(grad1, sft_grad)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_equal_rewards_give_exactly_zero_gradient(aggregation):
    gcfg = GRPOConfig(loss_aggregation=aggregation)
    # g0 (rows 0 and 1) has equal rewards whose float mean is not exactly 0.1; the others differ.
    batch = make_batch(seed=3, packed=True, rewards={"g0": [0.1, 0.1, 0.1], "g1": [0.0, 1.0], "g2": [1.0, 0.0]})
    _, _, m, grad = run_ours(batch, gcfg)
    assert torch.equal(grad[:2], torch.zeros(2, S, V))
    assert torch.count_nonzero(grad[2]) > 0 and torch.count_nonzero(grad[3]) > 0
    assert m["zero_adv_seqs"].item() == 3
    # Every group flat: the whole gradient is exactly zero, whatever the ratios.
    flat = make_batch(seed=3, packed=True, rewards={"g0": [1.0] * 3, "g1": [0.0] * 2, "g2": [0.3] * 2})
    loss, _, m, grad = run_ours(flat, gcfg)
    assert torch.equal(grad, torch.zeros_like(grad)) and loss.item() == 0
    assert m["zero_adv_seqs"].item() == m["num_seqs"].item() == 7


def test_huge_ratios_stay_finite():
    batch = make_batch(seed=5, packed=True, rewards=REWARDS_PACKED)
    far = batch["old_logp"] - 300 * (torch.arange(S) % 2)  # ρ = e^300 unless clamped
    _, _, m, grad = run_ours(batch, GRPOConfig(), old_logp=far)
    assert torch.isfinite(grad).all() and all(torch.isfinite(t) for t in m.values())


def _megatron_calc_loss(loss_func, logits, per_token):
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    store = []
    config = SimpleNamespace(calculate_per_token_loss=per_token, timers=None)
    out, num_tokens = forward_step_calc_loss(SimpleNamespace(), logits, loss_func, config, None, False,
                                             2, store, cp_group_size=1, is_last_stage=True)
    return out, num_tokens, store[0]


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_make_loss_func_binds_grpo_inputs_as_megatron_expects(aggregation):
    gcfg = GRPOConfig(loss_aggregation=aggregation, kl_coef=0.1)
    batch = make_batch(seed=11, packed=True, rewards=REWARDS_PACKED)
    adv = our_advantages(batch, gcfg)
    lb = loss_batch(batch["labels"], batch["loss_mask"], seq_id=batch["seq_id"], ref_logp=batch["ref_logp"],
                    old_logp=batch["old_logp"], advantage=adv, rollout_logp=batch["rollout_logp"])
    bound = partial(make_loss_func(LossConfig(method="grpo"), grpo=gcfg), lb)
    logits = batch["logits"].clone().requires_grad_()
    out, num, report = _megatron_calc_loss(bound, logits, per_token=True)
    _, value, norm, ref_m = reference(batch, gcfg)
    assert num.dtype == torch.int and num.item() == norm
    torch.testing.assert_close(out.detach().double(), torch.tensor(value, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert set(report) == {"loss", "nll", "entropy", "weight", "ratio", "kl", "seqs_per_microbatch", "clip_frac_low",
                           "clip_frac_high", "surrogate", "advantage", "zero_adv_frac", "logp_mismatch"}
    expect = {"clip_frac_low": ("clip_low", "num_tokens"), "advantage": ("adv_sum", "num_seqs"),
              "logp_mismatch": ("mismatch_sum", "mismatch_count"), "zero_adv_frac": ("zero_adv_seqs", "num_seqs")}
    for name, (num_key, den_key) in expect.items():
        torch.testing.assert_close(report[name], torch.tensor([float(ref_m[num_key]), float(ref_m[den_key])]),
                                   rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(report["loss"][1], torch.tensor(float(norm)))


def _bad(**changes):
    batch = make_batch(seed=1, packed=True, rewards=REWARDS_PACKED)
    gcfg = changes.pop("grpo", GRPOConfig())
    args = dict(seq_id=batch["seq_id"], ref_logp=batch["ref_logp"], old_logp=batch["old_logp"],
                advantage=our_advantages(batch, GRPOConfig()), rollout_logp=batch["rollout_logp"])
    args.update(changes)
    compute_loss(loss_batch(batch["labels"], batch["loss_mask"], **args), batch["logits"],
                 cfg=LossConfig(method="grpo"), grpo=gcfg)


NAN_ON_LOSS_TOKEN = torch.zeros(B, S).index_put_((torch.tensor([0]), torch.tensor([3])), torch.tensor(float("nan")))


@pytest.mark.parametrize("changes,match", [
    (dict(old_logp=None), "old_logp is required for loss.method='grpo'"),
    (dict(advantage=None), "advantage is required"),
    (dict(ref_logp=None, grpo=GRPOConfig(kl_coef=0.1)), "ref_logp is required for loss.method='grpo' with grpo.kl_coef"),
    (dict(old_logp=torch.zeros(B, S + 1)), r"old_logp must have shape \(4, 10\)"),
    (dict(advantage=NAN_ON_LOSS_TOKEN), "advantage must be finite where loss_mask is set"),
    (dict(old_logp=NAN_ON_LOSS_TOKEN), "old_logp must be finite"),
    (dict(rollout_logp=torch.full((B, S), float("-inf"))), "rollout_logp must be finite"),
    (dict(grpo="grpo"), "grpo must be a GRPOConfig"),
])
def test_bad_input_raises_naming_the_argument(changes, match):
    with pytest.raises(ValueError, match=match):
        _bad(**changes)


def test_reference_not_needed_without_kl_and_nan_off_loss_tokens_ignored():
    _bad(ref_logp=None)  # kl_coef = 0: no reference
    pad = SEQ_ID < 0
    _bad(old_logp=torch.zeros(B, S).masked_fill(pad, float("nan")),
         advantage=torch.ones(B, S).masked_fill(pad, float("nan")))
