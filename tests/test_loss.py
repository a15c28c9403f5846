"""compute_loss against a slow float64 reference (loss, gradients, metrics); exactness; errors.

The reference below is written for clarity, not speed: full-vocab log_softmax in float64 and Python
loops over sequences and tokens, straight from the formulas in docs/loss.md.
"""
import itertools
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from megatron_rasft.config import LOSS_METHODS, LossConfig
from megatron_rasft.loss import LossBatch, compute_loss, make_loss_func, vocab_parallel_logprob

B, S, V = 3, 12, 17
# grpo takes other inputs (old log-probs, advantages): tests/test_loss_grpo.py.
METHODS = tuple(m for m in LOSS_METHODS if m != "grpo")


def reference(logits, labels, loss_mask, cfg, seq_id=None, seq_weight=None, ref_logp=None, ref_logits=None):
    """float64 loss_sum and metrics; `logits` is a float64 leaf so the caller can take gradients."""
    lsm = torch.log_softmax(logits, -1)
    p = lsm.exp()
    ref_lsm = torch.log_softmax(ref_logits.double(), -1) if ref_logits is not None else None
    total = logits.new_zeros(())
    m = dict(num_tokens=0.0, num_seqs=0.0, nll_sum=0.0, entropy_sum=0.0, weight_sum=0.0, kl_sum=0.0,
             token_factor_sum=0.0, ratio_sum=0.0, ratio_clipped=0.0)

    def clipped(log_r):
        raw = math.exp(min(max(log_r, -cfg.ratio_log_clamp), cfg.ratio_log_clamp))
        return min(max(raw, cfg.ratio_min), cfg.ratio_max), not (cfg.ratio_min <= raw <= cfg.ratio_max)

    tokens = [(b, t) for b in range(B) for t in range(S) if loss_mask[b, t]]
    logp = {bt: lsm[bt][labels[bt]] for bt in tokens}
    q = {bt: math.exp(logp[bt].item()) for bt in tokens}
    kept = [bt for bt in tokens if q[bt] > cfg.profit_threshold]
    seq_of = {bt: (bt[0], 0 if seq_id is None else int(seq_id[bt])) for bt in tokens}
    seqs = sorted(set(seq_of.values()))
    r = {bt: 1.0 for bt in tokens}
    if cfg.method == "rasft" and cfg.ratio == "sequence":
        for s in seqs:
            members = [bt for bt in tokens if seq_of[bt] == s]
            mean_ref = sum(float(ref_logp[bt]) for bt in members) / len(members)
            mean_pol = sum(logp[bt].item() for bt in members) / len(members)
            r_s, clip = clipped(mean_ref - mean_pol)
            for bt in members:
                r[bt] = r_s
            m["ratio_sum"] += r_s
            m["ratio_clipped"] += clip
    elif cfg.method == "rasft" and cfg.ratio == "token":
        for bt in tokens:
            r[bt], clip = clipped(float(ref_logp[bt]) - logp[bt].item())
            m["ratio_sum"] += r[bt]
            m["ratio_clipped"] += clip
    for bt in tokens:
        A = 1.0 if seq_weight is None else float(seq_weight[bt])
        if cfg.method in ("dft", "asft") or (cfg.method == "rasft" and cfg.token_factor == "dft"):
            phi = q[bt]
        elif cfg.method == "profit":
            phi = 1.0 if (bt in kept or not kept) else 0.0
        else:
            phi = 1.0
        w = A * r[bt] * phi
        total = total - w * logp[bt]
        if cfg.method in ("sft_kl", "asft"):
            kl = (ref_lsm[bt].exp() * (ref_lsm[bt] - lsm[bt])).sum()
            total = total + cfg.kl_coef * A * kl
            m["kl_sum"] += kl.item()
        m["num_tokens"] += 1
        m["nll_sum"] -= logp[bt].item()
        m["entropy_sum"] -= (p[bt] * lsm[bt]).sum().item()
        m["weight_sum"] += w
        m["token_factor_sum"] += phi
    m["num_seqs"] = float(len(seqs))
    return total, m


def make_batch(seed, packed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g) * scale
    ref_logits = logits + torch.randn(B, S, V, generator=g) * scale * 0.7
    labels = torch.randint(0, V, (B, S), generator=g)
    loss_mask = torch.ones(B, S)
    if packed:
        # Several sequences per row, prompt tokens masked, padding (-1) at the end of some rows.
        seq_id = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, -1, -1],
                               [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
                               [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, -1, -1]])
        loss_mask[0, [0, 4, 7]] = 0
        loss_mask[1, [0, 1, 6]] = 0
        loss_mask[2, [0, 3, 5, 8]] = 0
        loss_mask[seq_id < 0] = 0
        labels[seq_id < 0] = -100  # out of range, but masked out: allowed
        A_per_seq = torch.rand(B, S, generator=g) * 1.5
        seq_weight = A_per_seq.gather(1, seq_id.clamp(min=0))
    else:
        seq_id = None
        loss_mask[:, :3] = 0
        seq_weight = (torch.rand(B, 1, generator=g) * 1.5).expand(B, S).clone()
    # Reference log-probs from the reference logits: realistic magnitudes, and ratios on both sides.
    ref_logp = torch.log_softmax(ref_logits.double(), -1).gather(-1, labels.clamp(0, V - 1)[..., None])[..., 0]
    return dict(logits=logits, labels=labels, loss_mask=loss_mask, seq_id=seq_id, seq_weight=seq_weight,
                ref_logp=ref_logp.float(), ref_logits=ref_logits)


def loss_batch(batch):
    """The loss's typed micro-batch from a test batch dict (absent keys: None)."""
    return LossBatch(labels_BS=batch["labels"], loss_mask_BS=batch["loss_mask"], seq_id_BS=batch.get("seq_id"),
                     seq_weight_BS=batch.get("seq_weight"), ref_logp_BS=batch.get("ref_logp"),
                     ref_logits_BSv=batch.get("ref_logits"))


def run_ours(batch, cfg, dtype=torch.float32):
    logits = batch["logits"].to(dtype).requires_grad_()
    loss, n, metrics = compute_loss(loss_batch(batch), logits, cfg=cfg)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss, n, metrics, grad


def run_reference(batch, cfg, logits=None):
    logits = (batch["logits"] if logits is None else logits).double().requires_grad_()
    rest = {k: batch[k] for k in ("seq_id", "seq_weight", "ref_logp", "ref_logits")}
    loss, metrics = reference(logits, batch["labels"], batch["loss_mask"], cfg, **rest)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss, metrics, grad


GRID = list(itertools.product(METHODS, ("sequence", "token", "none"), ("dft", "none"), (False, True)))


@pytest.mark.parametrize("method,ratio,token_factor,packed", GRID)
def test_matches_float64_reference(method, ratio, token_factor, packed):
    cfg = LossConfig(method=method, ratio=ratio, token_factor=token_factor)
    batch = make_batch(seed=GRID.index((method, ratio, token_factor, packed)), packed=packed)
    loss, n, metrics, grad = run_ours(batch, cfg)
    ref_loss, ref_m, ref_grad = run_reference(batch, cfg)
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-5, atol=1e-6)
    assert n.item() == ref_m["num_tokens"]
    ptrs = {value.data_ptr() for value in metrics.values()} | {n.data_ptr()}
    assert len(ptrs) == len(metrics) + 1  # each can be all-reduced in place on its own
    for name, value in metrics.items():
        assert value.requires_grad is False and value.dim() == 0
        if name in ref_m:
            torch.testing.assert_close(value.double(), torch.tensor(ref_m[name], dtype=torch.float64),
                                       rtol=1e-5, atol=1e-5, msg=f"metric {name}")
    expected = {"num_tokens", "num_seqs", "nll_sum", "entropy_sum", "weight_sum"}
    expected |= {"kl_sum"} if method in ("sft_kl", "asft") else set()
    expected |= {"ratio_sum", "ratio_count", "ratio_clipped"} if method == "rasft" and ratio != "none" else set()
    expected |= {"token_factor_sum"} if method in ("dft", "asft", "profit", "rasft") else set()
    expected |= {"profit_kept", "profit_fallback"} if method == "profit" else set()
    assert set(metrics) == expected


def test_bf16_logits_computed_in_fp32():
    cfg = LossConfig(method="asft")
    batch = make_batch(seed=7, packed=True)
    loss, _, _, grad = run_ours(batch, cfg, dtype=torch.bfloat16)
    ref_loss, _, ref_grad = run_reference(batch, cfg, logits=batch["logits"].bfloat16())
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("packed", [False, True])
def test_rasft_degenerate_is_bitwise_sft(packed):
    batch = make_batch(seed=11, packed=packed)
    sft_loss, _, _, sft_grad = run_ours(dict(batch, seq_weight=None), LossConfig(method="sft"))
    ones = dict(batch, seq_weight=torch.ones(B, S))
    loss, _, _, grad = run_ours(ones, LossConfig(method="rasft", ratio="none", token_factor="none"))
    assert torch.equal(loss, sft_loss) and torch.equal(grad, sft_grad)
    # With the reference equal to the policy the ratio is exp(0) = 1 exactly, at both granularities.
    # ref_logp comes from our own kernel so that it is bit-identical to the policy's log-prob.
    own = vocab_parallel_logprob(batch["logits"].reshape(-1, V), batch["labels"].reshape(-1)).view(B, S)
    for ratio in ("sequence", "token"):
        cfg = LossConfig(method="rasft", ratio=ratio, token_factor="none")
        loss, _, metrics, grad = run_ours(dict(ones, ref_logp=own.detach()), cfg)
        assert torch.equal(loss, sft_loss) and torch.equal(grad, sft_grad), ratio
        assert metrics["ratio_clipped"].item() == 0


@pytest.mark.parametrize("method", METHODS)
def test_zero_seq_weight_gives_zero_gradient(method):
    # profit with threshold 0 keeps every token, so every other token must still get a gradient.
    cfg = LossConfig(method=method, profit_threshold=0.0)
    batch = make_batch(seed=3, packed=True)
    loss, _, _, grad = run_ours(dict(batch, seq_weight=torch.zeros(B, S)), cfg)
    assert loss.item() == 0 and torch.count_nonzero(grad) == 0
    # Zero weight on one packed sequence only: exactly its tokens get no gradient.
    sw = batch["seq_weight"].clone()
    zero = (batch["seq_id"] == 1) & (torch.arange(B)[:, None] == 0)
    sw[zero] = 0
    _, _, _, grad = run_ours(dict(batch, seq_weight=sw), cfg)
    assert torch.count_nonzero(grad[zero]) == 0
    live = (batch["loss_mask"] > 0) & ~zero
    assert torch.count_nonzero(grad[live].abs().sum(-1)) == int(live.sum())


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_ratio_clipping_engages_at_both_bounds(granularity):
    cfg = LossConfig(method="rasft", ratio=granularity, token_factor="none")
    logits = torch.randn(1, 6, V)
    labels = torch.randint(0, V, (1, 6))
    mask = torch.ones(1, 6)
    seq_id = torch.tensor([[0, 0, 1, 1, 2, 2]])
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    # log π_ref − log π_θ: +3 (ratio e³ → r_max), −3 (e⁻³ → r_min), +50 (log-clamped, then r_max), +0.1 (inside).
    shift = torch.tensor([[3.0, 3.0, -3.0, -3.0, 50.0, 0.1]])
    if granularity == "sequence":
        shift[0, 5] = 50.0  # sequence 2 is all +50
    loss, _, m, _ = run_ours(dict(logits=logits, labels=labels, loss_mask=mask, seq_id=seq_id, seq_weight=None,
                                  ref_logp=logp + shift, ref_logits=None), cfg)
    if granularity == "sequence":
        r = torch.tensor([1.2, 1.2, 0.4, 0.4, 1.2, 1.2])
        assert m["ratio_clipped"].item() == 3 and m["ratio_count"].item() == 3
    else:
        r = torch.tensor([1.2, 1.2, 0.4, 0.4, 1.2, math.exp(0.1)])
        assert m["ratio_clipped"].item() == 5 and m["ratio_count"].item() == 6
    torch.testing.assert_close(m["ratio_sum"], (r.sum() if granularity == "token" else r[::2].sum()))
    torch.testing.assert_close(loss, -(r * logp[0]).sum(), rtol=1e-5, atol=1e-6)


def test_profit_falls_back_to_all_tokens():
    batch = make_batch(seed=5, packed=True)
    sft_loss, _, _, sft_grad = run_ours(batch, LossConfig(method="sft"))
    loss, _, m, grad = run_ours(batch, LossConfig(method="profit", profit_threshold=1.0))
    assert m["profit_fallback"].item() == 1 and m["profit_kept"].item() == 0
    assert torch.equal(loss, sft_loss) and torch.equal(grad, sft_grad)
    loss, _, m, _ = run_ours(batch, LossConfig(method="profit", profit_threshold=0.1))
    assert m["profit_fallback"].item() == 0 and 0 < m["profit_kept"].item() < m["num_tokens"].item()
    assert loss < sft_loss


def test_callers_logits_untouched():
    batch = make_batch(seed=9, packed=True)
    logits = batch["logits"].clone().requires_grad_()
    ref = batch["ref_logits"].clone()
    lb = LossBatch(labels_BS=batch["labels"], loss_mask_BS=batch["loss_mask"], ref_logits_BSv=ref)
    loss, _, _ = compute_loss(lb, logits, cfg=LossConfig(method="asft"))
    loss.backward()
    assert torch.equal(logits.detach(), batch["logits"]) and torch.equal(ref, batch["ref_logits"])


def _bad(**changes):
    batch = make_batch(seed=1, packed=True)
    cfg = changes.pop("cfg", LossConfig(method="rasft"))
    batch.update(changes)
    compute_loss(loss_batch(batch), batch["logits"], cfg=cfg)


def _with(name, index, value):
    t = make_batch(seed=1, packed=True)[name].clone()
    t[index] = value
    return t


@pytest.mark.parametrize("changes,match", [
    (dict(logits=torch.randn(B * S, V)), "logits must be"),
    (dict(logits=torch.randint(0, 3, (B, S, V))), "logits must be floating"),
    (dict(labels=torch.zeros(B, S + 1, dtype=torch.long)), "labels must have shape"),
    (dict(labels=torch.zeros(B, S)), "labels must be an integer"),
    (dict(loss_mask=torch.ones(B, 1)), "loss_mask must have shape"),
    (dict(seq_id=torch.zeros(B + 1, S, dtype=torch.long)), "seq_id must have shape"),
    (dict(seq_weight=torch.ones(S)), "seq_weight must have shape"),
    (dict(ref_logp=torch.zeros(B, S, 1)), "ref_logp must have shape"),
    (dict(ref_logits=torch.zeros(B, S, V + 1), cfg=LossConfig(method="sft_kl")), "ref_logits must have the shape"),
    (dict(labels=_with("labels", (1, 3), V)), r"labels must lie in \[0, 17\)"),
    (dict(labels=_with("labels", (1, 3), -1)), r"labels must lie in \[0, 17\)"),
    (dict(ref_logp=None), "ref_logp is required"),
    (dict(ref_logits=None, cfg=LossConfig(method="sft_kl")), "ref_logits is required"),
    (dict(ref_logits=None, cfg=LossConfig(method="asft")), "ref_logits is required"),
    (dict(logits=_with("logits", (0, 1, 2), float("nan"))), "logits contain NaN or Inf"),
    (dict(logits=_with("logits", (2, 9, 0), float("inf"))), "logits contain NaN or Inf"),
    (dict(logits=_with("logits", (2, 9, 0), float("-inf"))), "logits contain NaN or Inf"),
    (dict(ref_logits=_with("ref_logits", (0, 1, 2), float("nan")), cfg=LossConfig(method="asft")),
     "ref_logits contain NaN or Inf"),
    (dict(loss_mask=_with("loss_mask", (0, 1), 2.0)), "loss_mask must contain only 0 and 1"),
    (dict(seq_id=_with("seq_id", (0, 1), -1)), "seq_id must be in"),
    (dict(seq_id=_with("seq_id", (0, 1), S)), "seq_id must be in"),
    (dict(ref_logp=_with("ref_logp", (0, 1), float("nan"))), "ref_logp must be finite"),
    (dict(seq_weight=_with("seq_weight", (0, 1), float("inf"))), "seq_weight must be finite"),
    (dict(cfg=dict(method="sft")), "cfg must be a LossConfig"),
])
def test_bad_input_raises_naming_the_argument(changes, match):
    with pytest.raises(ValueError, match=match):
        _bad(**changes)


def test_masked_out_tokens_may_carry_anything():
    cfg = LossConfig(method="rasft", ratio="sequence")
    batch = make_batch(seed=2, packed=True)
    loss, _, _, grad = run_ours(batch, cfg)
    pad = batch["seq_id"] < 0
    dirty = dict(batch, ref_logp=batch["ref_logp"].masked_fill(pad, float("nan")),
                 seq_weight=batch["seq_weight"].masked_fill(pad, float("nan")))
    loss2, _, _, grad2 = run_ours(dirty, cfg)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    _bad(ref_logp=None, cfg=LossConfig(method="rasft", ratio="none"))  # ratio none needs no reference


def _megatron_calc_loss(loss_func, logits, per_token):
    """Megatron-Core's own last-stage loss step, as the schedule runs it."""
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    store = []
    config = SimpleNamespace(calculate_per_token_loss=per_token, timers=None)
    out, num_tokens = forward_step_calc_loss(SimpleNamespace(), logits, loss_func, config, None, False,
                                             2, store, cp_group_size=1, is_last_stage=True)
    return out, num_tokens, store[0]


@pytest.mark.parametrize("per_token", [True, False])
def test_make_loss_func_follows_megatron_contract(per_token):
    cfg = LossConfig(method="rasft")
    batch = make_batch(seed=4, packed=True)
    loss_func = make_loss_func(cfg)
    bound = partial(loss_func, loss_batch(dict(batch, ref_logits=None)))
    logits = batch["logits"].clone().requires_grad_()
    out, num_tokens, report = _megatron_calc_loss(bound, logits, per_token)
    ref_loss, _, ref_m = compute_loss(loss_batch(dict(batch, ref_logits=None)), batch["logits"], cfg=cfg)
    assert num_tokens.dtype == torch.int and num_tokens.item() == int(ref_m["num_tokens"])
    expected = ref_loss if per_token else ref_loss / ref_m["num_tokens"] / 2
    torch.testing.assert_close(out.detach(), expected.detach())
    out.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) > 0
    # The report is untouched by the schedule's in-place division and holds [sum, count] pairs.
    torch.testing.assert_close(report["loss"], torch.stack([ref_loss.detach(), ref_m["num_tokens"]]))
    torch.testing.assert_close(report["ratio"], torch.stack([ref_m["ratio_sum"], ref_m["ratio_count"]]))
    assert set(report) == {"loss", "nll", "entropy", "weight", "token_factor", "ratio", "ratio_clip_frac",
                           "seqs_per_microbatch"}
    assert all(t.shape == (2,) and not t.requires_grad for t in report.values())
