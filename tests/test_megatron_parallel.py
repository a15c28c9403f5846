"""A Megatron GPTModel step at TP=2, PP=2 (micro-batches) and DP=2 equals the single-process step.

Same weights (loaded from the single-process model), same global batch with uneven sequence lengths,
the `rasft` loss with per-sequence weights and reference log-probs. Compared: the reduced loss, every
parameter's gradient (after the schedule's 1/num_tokens scaling and DP/tied-embedding reductions), and
every parameter after one Adam step (distributed optimizer on at DP=2).
"""
import torch
import torch.distributed as dist

from megatron_rasft.config import LossConfig, ModelConfig, OptimConfig, ParallelConfig
from helpers.distributed import spawn

MCFG = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
            vocab_size=250, seq_length=16, max_position_embeddings=64, tie_embeddings=True,
            add_qkv_bias=True, qk_layernorm=True, make_vocab_size_divisible_by=64)
LOSS = dict(method="rasft", ratio="sequence", token_factor="dft")
GLOBAL_BATCH, SEQ = 4, 16
LAYOUTS = {  # name: (tp, pp, dp, distributed optimizer)
    "tp2": (2, 1, 1, False),
    "pp2": (1, 2, 1, False),
    "dp2": (1, 1, 2, False),
    "dp2_distopt": (1, 1, 2, True),
}


def _global_batch():
    """Four sequences with different numbers of loss tokens (prompt masked, right padding)."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 250, (GLOBAL_BATCH, SEQ), generator=g)
    lengths = [16, 9, 5, 12]
    loss_mask = torch.zeros(GLOBAL_BATCH, SEQ)
    for i, n in enumerate(lengths):
        loss_mask[i, 3:n] = 1.0
    labels = torch.roll(tokens, -1, dims=1)
    seq_weight = torch.tensor([1.0, 0.3, 0.0, 0.7])[:, None].expand(GLOBAL_BATCH, SEQ).contiguous()
    # Reference log-probs around the untrained model's (≈ -log 256), so the ratio clips on some rows.
    ref_logp = -torch.log(torch.tensor(256.0)) + torch.tensor([0.5, -0.5, 0.1, -1.5])[:, None] \
        + 0.05 * torch.randn(GLOBAL_BATCH, SEQ, generator=g)
    pos = torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).contiguous()
    micro = []
    for i in range(GLOBAL_BATCH):
        micro.append({k: v[i:i + 1] for k, v in dict(tokens=tokens, position_ids=pos, labels=labels,
                                                     loss_mask=loss_mask, seq_weight=seq_weight,
                                                     ref_logp=ref_logp).items()})
    return micro


def _run_layout(tp, pp, dp, distopt, full_state=None):
    """Build the model for one layout, load `full_state` (or keep the seeded init), run one step.
    Returns this rank's loss, gradients and updated parameters under global (TP=1, PP=1) names."""
    from megatron.core import parallel_state as ps

    from megatron_rasft.convert import layout
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed
    from megatron_rasft.engine.optim import build_optimizer
    from megatron_rasft.engine.step import attach_schedule_hooks, forward_backward, make_forward_step, \
        global_metrics, wrap_ddp

    pcfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          use_distributed_optimizer=distopt)
    pgs = init_distributed(pcfg, seed=0)
    mcfg = ModelConfig(**MCFG)
    model = build_model(mcfg, pcfg)
    names = layout.local_to_global_names(model)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), tp
    if full_state is not None:
        with torch.no_grad():
            for local, p in model.named_parameters():
                g = names[local]
                if g == "output_layer.weight" and mcfg.tie_embeddings:
                    g = "embedding.word_embeddings.weight"  # last stage's copy of the tied embedding
                p.copy_(layout.shard(g, full_state[g], tp_rank, tp_size))
    chunks = wrap_ddp([model], use_distributed_optimizer=distopt)
    attach_schedule_hooks(chunks)
    optimizer, _ = build_optimizer(chunks, OptimConfig(lr=1e-3, clip_grad=0.0, adam_eps=1e-6), pcfg, total_steps=1)

    batches = _global_batch()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    per_rank = len(batches) // dp_size
    batches = batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    loss_func = make_loss_func(LossConfig(**LOSS), tp_group=pgs.tp)
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    reports = forward_backward(chunks, make_forward_step(loss_func, pgs, vocab_size=mcfg.vocab_size), batches,
                               seq_length=SEQ)
    loss = global_metrics(reports, pgs)["loss"]  # collective: every pipeline stage gets the last stage's value
    grads, init = {}, {}
    for local, p in model.named_parameters():
        grads[names[local]] = p.main_grad.detach().clone()
        init[names[local]] = p.detach().clone()
    optimizer.step()
    params = {names[local]: p.detach().clone() for local, p in model.named_parameters()}
    return dict(tp=tp_rank, pp=ps.get_pipeline_model_parallel_rank(), dp=dp_rank, loss=loss,
                grads=grads, params=params, init=init)


def _single(rank, world):
    out = _run_layout(1, 1, 1, False)
    out["packing"] = _packed_vs_padded()
    return out


def _packed_vs_padded():
    """Per-sequence logits of a packed row (block-diagonal mask, positions restarting) against the
    same sequences each in its own padded row."""
    from megatron.core import parallel_state as ps

    from megatron_rasft.data.batching import Seq, make_rows, stack_microbatches
    from megatron_rasft.model.provider import build_model

    ps.destroy_model_parallel()
    ps.initialize_model_parallel()
    model = build_model(ModelConfig(**MCFG), ParallelConfig()).eval()
    g = torch.Generator().manual_seed(3)
    seqs = [Seq(str(i), torch.randint(0, 250, (n,), generator=g).tolist(), 2) for i, n in enumerate([6, 5, 4])]
    diffs = []
    with torch.no_grad():
        packed = stack_microbatches(make_rows(seqs, SEQ, 0, pack=True), 1, SEQ, 0)[0]
        lp = model(packed["tokens"], packed["position_ids"], packed["attention_mask"])[0]
        start = 0
        for seq in seqs:
            row = stack_microbatches(make_rows([seq], SEQ, 0, pack=False), 1, SEQ, 0)[0]
            lu = model(row["tokens"], row["position_ids"], None)[0]
            n = len(seq.tokens) - 1
            diffs.append((lp[start:start + n] - lu[:n]).abs().max().item())
            start += n
    return max(diffs)


def _parallel(rank, world, full_state):
    from megatron_rasft.parallel.groups import destroy_distributed

    results = {}
    for name, (tp, pp, dp, distopt) in LAYOUTS.items():
        results[name] = _run_layout(tp, pp, dp, distopt, full_state)
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.barrier()
    destroy_distributed()
    return results


def _merge(rank_results, key, dp):
    """DP replica `dp`'s full tensors under global names from its ranks' pieces (TP shards
    concatenated, PP merged). A tensor replicated over TP must be the same on every TP rank."""
    from megatron_rasft.convert import layout

    pieces = {}
    for r in rank_results:
        if r["dp"] != dp:
            continue
        for name, t in r[key].items():
            pieces.setdefault(name, {})[r["tp"]] = t
    out = {}
    for n, d in pieces.items():
        shards = [d[i] for i in sorted(d)]
        if layout.split_kind(n) == "replicated":
            for i, t in enumerate(shards[1:], 1):
                torch.testing.assert_close(t, shards[0], rtol=1e-5, atol=1e-7,
                                           msg=lambda m, n=n, i=i: f"{key} of {n}: TP rank {i} vs 0: {m}")
        out[n] = layout.unshard(n, shards)
    return out


def test_tp_pp_dp_step_matches_single_process():
    ref = spawn(_single, 1, timeout_s=300)[0]
    assert ref["packing"] < 1e-5, ref["packing"]
    full_state = ref["init"]
    assert "output_layer.weight" not in full_state  # tied embeddings
    per_rank = spawn(_parallel, 2, full_state, timeout_s=600)
    for name in LAYOUTS:
        results = [r[name] for r in per_rank]
        losses = [r["loss"] for r in results if r["loss"] is not None]
        assert losses, name
        for loss in losses:
            torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref["loss"]), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}: loss: {m}")
        # The distributed optimizer reduce-scatters: each DP rank holds only its slice of the grads.
        for key in (("params",) if LAYOUTS[name][3] else ("grads", "params")):
            dps = sorted({r["dp"] for r in results})
            assert dps == list(range(LAYOUTS[name][2])), (name, dps)
            for dp in dps:  # every data-parallel replica, each against the single process
                got = _merge(results, key, dp)
                tied = got.pop("output_layer.weight", None)
                assert (tied is not None) == (LAYOUTS[name][1] > 1), name  # only a separate last stage has it
                if tied is not None:  # the last stage's copy of the tied embedding: same grads, same update
                    got["tied output_layer copy"] = tied
                want = {**ref[key], **({"tied output_layer copy": ref[key]["embedding.word_embeddings.weight"]}
                                       if tied is not None else {})}
                assert set(got) == set(want), (name, key, set(got) ^ set(want))
                # Adam's first step is ~lr·sign(g); eps = 1e-6 keeps it smooth where |g| is tiny.
                atol = 1e-6 if key == "grads" else 1e-5
                for n, t in want.items():
                    torch.testing.assert_close(got[n], t, rtol=1e-4, atol=atol,
                                               msg=lambda m, n=n, dp=dp: f"{name}: DP replica {dp}: {key} of {n}: {m}")
        # The grads are not trivially zero.
        assert sum(g.abs().sum() for g in ref["grads"].values()) > 0
