"""The loss seam: the coefficient table (a new method is one function and one entry) and the typed
micro-batch built from `data.batching`'s micro-batches.

The toy method registered here (tests/helpers/toy_loss.py) is the focal loss's modulating factor
(Lin et al. 2017, eq. 5, γ = 2) as a detached coefficient: Σ_t m_t·A_t·sg((1 − q_t)²)·(−log q_t),
q_t = π_θ(label). It runs through
`compute_loss` (the vocab-parallel log-prob kernel, validation, aggregation) and `make_loss_func`,
and is checked against a float64 recomputation from the `Seq`s themselves (full-vocab log_softmax,
loops over each sequence's response tokens), not from the batch tensors; tests/test_loss_tp.py runs
it at TP = 2 against one process.
"""
import pytest
import torch

from megatron_rasft.config import LOSS_METHODS, LossConfig
from megatron_rasft.data.batching import Seq, make_rows, stack_microbatches
from megatron_rasft.loss import COEFFICIENTS, LossBatch, compute_loss, make_loss_func
from helpers.toy_loss import as_method as _as_method, focal

S, V, PAD = 16, 23, 0


def _seqs():
    g = torch.Generator().manual_seed(0)
    lengths = [(3, 7), (2, 5), (4, 9), (1, 6), (3, 4)]  # (prompt_len, total tokens)
    return [Seq(key=f"s{i}", tokens=torch.randint(1, V, (n,), generator=g).tolist(), prompt_len=p,
                weight=0.25 + 0.5 * i) for i, (p, n) in enumerate(lengths)]


def test_table_has_one_entry_per_configurable_method():
    assert set(COEFFICIENTS) == set(LOSS_METHODS)


def test_toy_method_registered_through_the_table(monkeypatch):
    monkeypatch.setitem(COEFFICIENTS, "focal", focal)
    seqs = _seqs()
    where = []
    rows = make_rows(seqs, S, PAD, pack=True, placements=where)
    (mb,) = stack_microbatches(rows, len(rows) + 1, S, PAD)  # one empty row too
    B = mb["tokens"].shape[0]
    logits = torch.randn(B, S, V, generator=torch.Generator().manual_seed(1)) * 2
    batch = LossBatch.from_microbatch(mb)
    x = logits.clone().requires_grad_()
    loss, n, metrics = compute_loss(batch, x, cfg=_as_method("focal"))
    (grad,) = torch.autograd.grad(loss, x)

    # float64 from the sequences: position t of a sequence predicts tokens[t + 1]; the response's.
    x64 = logits.double().requires_grad_()
    lsm = torch.log_softmax(x64, -1)
    ref = x64.new_zeros(())
    tokens = weight = factor = 0.0
    for seq, (row, start) in zip(seqs, where):
        for t in range(seq.prompt_len - 1, len(seq.tokens) - 1):
            logp = lsm[row, start + t, seq.tokens[t + 1]]
            f = (1 - logp.exp().item()) ** 2
            ref = ref - seq.weight * f * logp
            tokens, weight, factor = tokens + 1, weight + seq.weight * f, factor + f
    (ref_grad,) = torch.autograd.grad(ref, x64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert n.item() == tokens == metrics["num_tokens"].item()
    assert metrics["num_seqs"].item() == len(seqs)
    torch.testing.assert_close(metrics["weight_sum"].double(), torch.tensor(weight, dtype=torch.float64))
    torch.testing.assert_close(metrics["token_factor_sum"].double(), torch.tensor(factor, dtype=torch.float64))
    # The Megatron wrapper reports the registered method's metric like a shipped one's.
    loss2, n2, report = make_loss_func(_as_method("focal"))(batch, logits)
    assert torch.equal(loss2.detach(), loss.detach()) and n2.item() == tokens
    torch.testing.assert_close(report["token_factor"], torch.tensor([factor, tokens], dtype=torch.float32))


def test_unknown_method_names_the_table():
    batch = LossBatch(labels_BS=torch.zeros(1, 4, dtype=torch.long), loss_mask_BS=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"loss.method='focal' has no coefficient function .*'grpo'"):
        compute_loss(batch, torch.randn(1, 4, V), cfg=_as_method("focal"))


def test_loss_refuses_a_batch_that_is_not_a_loss_batch():
    with pytest.raises(ValueError, match="batch must be a LossBatch, got dict"):
        compute_loss({"labels": torch.zeros(1, 4, dtype=torch.long)}, torch.randn(1, 4, V), cfg=LossConfig())


@pytest.mark.parametrize("grpo_columns", [False, True])
def test_loss_batch_from_microbatch(grpo_columns):
    seqs = _seqs()
    if grpo_columns:
        for s in seqs:
            s.old_logp, s.advantage = [-1.0] * (len(s.tokens) - 1), 0.5
    (mb,) = stack_microbatches(make_rows(seqs, S, PAD, pack=True), 4, S, PAD)
    ref_logits = torch.zeros(4, S, V)
    batch = LossBatch.from_microbatch(mb, ref_logits)
    for field, key in (("labels_BS", "labels"), ("loss_mask_BS", "loss_mask"), ("seq_id_BS", "seq_id"),
                       ("seq_weight_BS", "seq_weight"), ("ref_logp_BS", "ref_logp")):
        assert getattr(batch, field) is mb[key], field
    assert batch.ref_logits_BSv is ref_logits
    if grpo_columns:
        assert batch.old_logp_BS is mb["old_logp"] and batch.advantage_BS is mb["advantage"]
    else:
        assert batch.old_logp_BS is None and batch.advantage_BS is None
    assert batch.rollout_logp_BS is None
    with pytest.raises(KeyError, match="loss_mask"):
        LossBatch.from_microbatch({"labels": mb["labels"]})
