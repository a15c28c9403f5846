"""The memory and overlap settings on real Megatron-Core ranks (CPU, gloo), each against the plain run.

- Activation recomputation (selective; full uniform and block) at TP=2 x PP=2: the step's loss and
  every gradient equal the run without recomputation; the recomputation happened (the layers'
  and core attentions' forward calls counted by hooks) and the activations kept for the backward
  pass are smaller (bytes of the tensors autograd saves during each micro-batch's forward,
  parameters excluded).
- Overlapped gradient reduce + parameter all-gather with the distributed optimizer at TP2 x DP2 and
  DP=2 (and PP2 x DP2): several buckets; a bucket's reduction was in flight before the backward
  pass reached the embedding; the parameter all-gather after a step is deferred (the parameters
  outside this rank's shard are stale until `sync_params` or the next forward); parameters after
  several steps equal the plain run's; a run saved and resumed mid-way equals the uninterrupted one.
- Reference placement `host`: the reference's log-probs and the step's loss equal `device`'s;
  between passes every reference parameter's device storage has size 0.
- A checkpoint's optimizer state is refused, naming the settings, by a run with another bucket layout.

One spawn of 4 ranks and one of 2 run every configuration, each after a fresh `init_distributed`.
"""
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rasft.config import LossConfig, ModelConfig, OptimConfig, ParallelConfig
from helpers.distributed import spawn

MCFG = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
            vocab_size=250, seq_length=32, max_position_embeddings=64, make_vocab_size_divisible_by=64,
            attention="local")
SEQ, MICRO = 32, 4  # sequence length; micro-batches per rank and step
RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),  # core attention (Megatron's default module)
    "full_uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
}
BUCKET = 6000  # parameters per bucket: several buckets for this model at every layout
STEPS, SAVE_AT = 4, 2


def _batches(step: int, n: int, offset: int = 0) -> list[dict]:
    """`n` micro-batches (one sequence each) of step `step`, uneven loss masks, rasft columns."""
    out = []
    for i in range(offset, offset + n):
        g = torch.Generator().manual_seed(1000 * step + i)
        tokens = torch.randint(0, 250, (1, SEQ), generator=g)
        loss_mask = torch.zeros(1, SEQ)
        loss_mask[0, 3:8 + (7 * i) % (SEQ - 8)] = 1.0
        out.append(dict(tokens=tokens, position_ids=torch.arange(SEQ)[None], labels=torch.roll(tokens, -1, 1),
                        loss_mask=loss_mask, seq_weight=torch.full((1, SEQ), 0.5 + 0.1 * i),
                        ref_logp=-5.5 + 0.3 * torch.randn(1, SEQ, generator=g)))
    return out


def _build(pcfg: ParallelConfig, mcfg: ModelConfig):
    from megatron_rasft.engine.step import attach_schedule_hooks, wrap_ddp
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import init_distributed

    groups = init_distributed(pcfg, seed=0)
    model = build_model(mcfg, pcfg)
    chunks = wrap_ddp([model], use_distributed_optimizer=pcfg.use_distributed_optimizer,
                      overlap_grad_reduce=pcfg.overlap_grad_reduce, overlap_param_gather=pcfg.overlap_param_gather,
                      bucket_size=pcfg.bucket_size)
    attach_schedule_hooks(chunks)
    return groups, model, chunks


def _teardown():
    from megatron.core import parallel_state as ps

    dist.barrier()
    ps.destroy_model_parallel()


# -- recomputation ------------------------------------------------------------------------------------

def _recompute_case(settings: dict) -> dict:
    """One training step at TP=2 x PP=2 with `settings`: loss, gradients, forward calls per layer and
    per core attention, and the bytes autograd saved during the micro-batches' forward passes."""
    from megatron_rasft.engine.step import forward_backward, global_metrics, make_forward_step
    from megatron_rasft.loss import make_loss_func

    pcfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, use_distributed_optimizer=False)
    mcfg = ModelConfig(**MCFG, **settings)
    groups, model, chunks = _build(pcfg, mcfg)
    layers = list(model.decoder.layers)
    layer_calls, attn_calls = [0] * len(layers), [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_, i=i: layer_calls.__setitem__(i, layer_calls[i] + 1))
        layer.self_attention.core_attention.register_forward_hook(
            lambda *_, i=i: attn_calls.__setitem__(i, attn_calls[i] + 1))
    saved = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[0] += t.numel() * t.element_size()
        return t

    inner = make_forward_step(make_loss_func(LossConfig(method="rasft"), tp_group=groups.tp), groups,
                              vocab_size=mcfg.vocab_size)

    def forward_step(data_iterator, m):  # only the forward: the backward's recomputation is not counted
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return inner(data_iterator, m)

    for c in chunks:
        c.zero_grad_buffer()
    loss = global_metrics(forward_backward(chunks, forward_step, _batches(0, MICRO), seq_length=SEQ), groups)["loss"]
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    _teardown()
    return dict(loss=loss, grads=grads, layer_calls=layer_calls, attn_calls=attn_calls, saved_bytes=saved[0])


# -- overlapped reduce / gather and resume -----------------------------------------------------------

def _overlap_run(tp: int, pp: int, overlap: bool, ckpt: str, mode: str) -> dict:
    """STEPS Adam steps with the distributed optimizer. mode: "all" (uninterrupted), "save" (stop
    after SAVE_AT steps with a checkpoint in `ckpt`), "resume" (load it, run the rest)."""
    from megatron_rasft.engine import checkpoint
    from megatron_rasft.engine.optim import build_optimizer
    from megatron_rasft.engine.step import forward_backward, global_metrics, make_forward_step, sync_params
    from megatron_rasft.loss import make_loss_func

    pcfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          use_distributed_optimizer=True, overlap_grad_reduce=overlap,
                          overlap_param_gather=overlap, bucket_size=BUCKET if overlap else None)
    mcfg = ModelConfig(**MCFG)
    groups, model, chunks = _build(pcfg, mcfg)
    ddp = chunks[0]
    optimizer, scheduler = build_optimizer(chunks, OptimConfig(lr=3e-3, clip_grad=1.0), pcfg, total_steps=STEPS)
    step_fn = make_forward_step(make_loss_func(LossConfig(method="rasft"), tp_group=groups.tp), groups,
                                vocab_size=mcfg.vocab_size)
    in_flight = []  # per backward through the embedding: was some bucket's reduction already issued?
    if model.pre_process:
        def on_embedding(_module, _inputs, out):
            if out.requires_grad:
                out.register_hook(lambda g: in_flight.append(
                    any(bg.grad_reduce_handle is not None for bg in ddp.bucket_groups)))
        model.embedding.register_forward_hook(on_embedding)
    start, losses, stale, loaded = 0, [], None, None
    if mode == "resume":
        start = checkpoint.load(Path(ckpt) / f"iter_{SAVE_AT:07d}", chunks, optimizer, scheduler)["step"]
        loaded = {n: p.detach().clone() for n, p in model.named_parameters()}  # the checkpoint's model/
    end = SAVE_AT if mode == "save" else STEPS
    for step in range(start, end):
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        batches = _batches(step, MICRO, offset=groups.dp_rank * MICRO)
        m = global_metrics(forward_backward(chunks, step_fn, batches, seq_length=SEQ), groups)
        losses.append(m["loss"])
        optimizer.step()
        scheduler.step(1)
        if step == start and overlap:  # the all-gather is deferred: some parameters are still the old ones
            before = [p.detach().clone() for p in model.parameters()]
            sync_params(chunks)
            stale = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    if mode == "save":  # the last step's all-gather is still pending here: save must finish it
        checkpoint.save(Path(ckpt), end, chunks, optimizer, scheduler, {"step": end}, groups, model_config=mcfg,
                        hf_config=None, keep_last=1)
    sync_params(chunks)
    out = dict(losses=losses, params={n: p.detach().clone() for n, p in model.named_parameters()},
               buckets=sum(len(b.buckets) for b in ddp.buffers), bucket_groups=len(ddp.bucket_groups),
               in_flight=in_flight, stale=stale, first_stage=model.pre_process, loaded=loaded)
    _teardown()
    return out


def _overlap_suite(layouts: dict, ckpt_root: str) -> dict:
    out = {}
    for name, (tp, pp) in layouts.items():
        ckpt = str(Path(ckpt_root) / name)
        out[name] = dict(plain=_overlap_run(tp, pp, False, ckpt, "all"), overlap=_overlap_run(tp, pp, True, ckpt, "all"))
        out[name]["saved"] = _overlap_run(tp, pp, True, ckpt, "save")
        out[name]["resumed"] = _overlap_run(tp, pp, True, ckpt, "resume")
    return out


def _refused_resume(ckpt: str) -> str:
    """The error of loading the overlapped run's checkpoint into the plain (one-bucket) layout."""
    from megatron_rasft.engine import checkpoint
    from megatron_rasft.engine.optim import build_optimizer

    pcfg = ParallelConfig(use_distributed_optimizer=True)
    _, _, chunks = _build(pcfg, ModelConfig(**MCFG))
    optimizer, scheduler = build_optimizer(chunks, OptimConfig(lr=3e-3), pcfg, total_steps=STEPS)
    try:
        checkpoint.load(Path(ckpt) / f"iter_{SAVE_AT:07d}", chunks, optimizer, scheduler)
        message = "loaded"
    except ValueError as e:
        message = str(e)
    _teardown()
    return message


# -- reference placement --------------------------------------------------------------------------------

def _placement_case(placement: str) -> dict:
    """Build policy + reference with `placement`, two reference passes, one training step on their
    log-probs; returns the log-probs, the loss and the reference's storage sizes around the passes."""
    from megatron_rasft.data.batching import Seq, make_rows, stack_microbatches
    from megatron_rasft.engine.model import build_policy_and_reference
    from megatron_rasft.engine.refpass import score
    from megatron_rasft.engine.step import forward_backward, global_metrics, make_forward_step
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.parallel.groups import init_distributed

    pcfg = ParallelConfig(use_distributed_optimizer=True)
    mcfg = ModelConfig(**MCFG, reference_placement=placement)
    groups = init_distributed(pcfg, seed=0)
    models = build_policy_and_reference(mcfg, pcfg, None, groups, reference=True, kl_reference=False)
    ref_params = [p for c in models.reference for p in c.parameters()]

    def sizes():
        return [p.untyped_storage().size() for p in ref_params]

    g = torch.Generator().manual_seed(5)
    seqs = [Seq(f"s{i}", torch.randint(0, 250, (n,), generator=g).tolist(), 3) for i, n in enumerate([20, 9, 31, 14])]
    storage = {"built": sizes()}
    passes = []
    for _ in range(2):
        with models.reference_on_device() as reference:
            storage["in_pass"] = sizes()
            passes.append(score(reference, seqs, groups, micro_batch_size=2, seq_length=SEQ, pad_id=0,
                                vocab_size=mcfg.vocab_size))
        storage.setdefault("between", []).append(sizes())
    seqs = [Seq(s.key, s.tokens, s.prompt_len, weight=0.7, ref_logp=passes[0][s.key]) for s in seqs]
    mine = seqs[groups.dp_rank::groups.dp_size]
    batches = stack_microbatches(make_rows(mine, SEQ, 0, pack=False), 1, SEQ, 0)
    step = make_forward_step(make_loss_func(LossConfig(method="rasft"), tp_group=groups.tp), groups,
                             vocab_size=mcfg.vocab_size)
    for c in models.policy:
        c.zero_grad_buffer()
    loss = global_metrics(forward_backward(models.policy, step, batches, seq_length=SEQ), groups)["loss"]
    _teardown()
    return dict(passes=passes, loss=loss, storage=storage)


# -- the spawned workers -------------------------------------------------------------------------------------

def _four_ranks(rank, world, ckpt_root):
    out = {name: _recompute_case(s) for name, s in RECOMPUTE.items()}
    out["overlap"] = _overlap_suite({"tp2dp2": (2, 1), "pp2dp2": (1, 2)}, ckpt_root)
    return out


def _two_ranks(rank, world, ckpt_root):
    out = {"overlap": _overlap_suite({"dp2": (1, 1)}, ckpt_root)}
    out["refused"] = _refused_resume(str(Path(ckpt_root) / "dp2"))
    out.update({p: _placement_case(p) for p in ("device", "host")})
    return out


# -- the tests ---------------------------------------------------------------------------------------------

def _assert_same_params(a: dict, b: dict, what: str):
    assert set(a) == set(b), what
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=lambda m, n=n: f"{what}: {n}: {m}")


def _check_overlap(per_rank: list, layouts: list):
    for name in layouts:
        for r, res in enumerate(per_rank):
            plain, over, resumed = (res["overlap"][name][k] for k in ("plain", "overlap", "resumed"))
            where = f"{name} rank {r}"
            # Megatron buckets the first pipeline stage only (the others reduce in the pipeline's drain).
            if over["first_stage"]:
                assert over["buckets"] >= 2 and over["bucket_groups"] >= 2, (where, over["buckets"])
            assert plain["buckets"] == 1, where
            # Parameters after STEPS steps: the overlapped run is the plain one (same reductions,
            # issued earlier); fp32 sums in the same order per bucket.
            _assert_same_params(over["params"], plain["params"], f"{where}: overlap vs plain")
            torch.testing.assert_close(torch.tensor(over["losses"]), torch.tensor(plain["losses"]), rtol=0, atol=1e-6)
            # Resume: the run saved after SAVE_AT steps and resumed ends where the uninterrupted one does.
            _assert_same_params(resumed["params"], over["params"], f"{where}: resumed vs uninterrupted")
            torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(over["losses"][SAVE_AT:]),
                                       rtol=0, atol=1e-6)
            # The checkpoint's weights (model/, what mcore-to-hf exports) are those trained, although
            # the last step's all-gather was still pending when it was saved.
            _assert_same_params(resumed["loaded"], res["overlap"][name]["saved"]["params"], f"{where}: checkpoint")
            # The all-gather after a step waits for the next forward (or sync_params).
            assert over["stale"] > 0, where
            if over["first_stage"]:
                # One backward per micro-batch reaches the embedding; the reductions start in the last
                # micro-batch's, from the second step on (Megatron learns the bucket order in the first).
                last_mb = over["in_flight"][MICRO - 1::MICRO]
                assert len(last_mb) == STEPS, (where, over["in_flight"])
                assert not last_mb[0] and all(last_mb[1:]), (where, last_mb)
                assert not any(plain["in_flight"]), where


def test_recompute_and_overlap_at_four_ranks(tmp_path):
    per_rank = spawn(_four_ranks, 4, str(tmp_path), timeout_s=600)
    for r, res in enumerate(per_rank):
        base = res["none"]
        n_layers = len(base["layer_calls"])
        assert base["layer_calls"] == [MICRO] * n_layers and base["attn_calls"] == [MICRO] * n_layers, base
        for name in ("selective", "full_uniform", "full_block"):
            got = res[name]
            # Recomputation changes what is kept, not what is computed: the same loss and gradients
            # (fp32; the recomputed forward repeats the same kernels on the same inputs).
            if base["loss"] is not None:
                torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(base["loss"]), rtol=0, atol=1e-6)
            for n, g in base["grads"].items():
                torch.testing.assert_close(got["grads"][n], g, rtol=0, atol=1e-6,
                                           msg=lambda m, n=n, name=name: f"rank {r} {name}: grad of {n}: {m}")
            assert got["saved_bytes"] < base["saved_bytes"], (r, name, got["saved_bytes"], base["saved_bytes"])
        # Each forward that was recomputed ran twice: the core attention of every layer (selective),
        # every layer (full uniform), the first layer of this pipeline stage (full block, 1 layer).
        assert res["selective"]["attn_calls"] == [2 * MICRO] * n_layers, res["selective"]
        assert res["selective"]["layer_calls"] == [MICRO] * n_layers, res["selective"]
        assert res["full_uniform"]["layer_calls"] == [2 * MICRO] * n_layers, res["full_uniform"]
        assert res["full_block"]["layer_calls"] == [2 * MICRO] + [MICRO] * (n_layers - 1), res["full_block"]
        # Full recomputation keeps only each layer's input: far less than selective's.
        assert res["full_uniform"]["saved_bytes"] < res["selective"]["saved_bytes"], r
    _check_overlap(per_rank, ["tp2dp2", "pp2dp2"])


def test_overlap_at_dp2_and_host_reference(tmp_path):
    per_rank = spawn(_two_ranks, 2, str(tmp_path), timeout_s=600)
    _check_overlap(per_rank, ["dp2"])
    # The distributed optimizer's state is saved per bucket: another bucket layout is refused up front
    # (Megatron itself would fail deep in dist_checkpointing with a shape mismatch).
    for res in per_rank:
        assert "saved with another gradient-bucket layout" in res["refused"], res["refused"]
        assert "parallel.overlap_grad_reduce and parallel.bucket_size" in res["refused"], res["refused"]
    for r, res in enumerate(per_rank):
        dev, host = res["device"], res["host"]
        # Log-probs and the loss that uses them: identical (the same weights, copied bit for bit).
        for p in (0, 1):
            assert host["passes"][p] == dev["passes"][0], (r, p)
        assert host["loss"] == dev["loss"], r
        # Device placement: the reference's storages never leave. Host: released after the build and
        # after every pass, allocated during a pass.
        assert all(s > 0 for s in dev["storage"]["built"] + dev["storage"]["in_pass"]), r
        assert all(s == 0 for s in host["storage"]["built"]), r
        assert all(s > 0 for s in host["storage"]["in_pass"]), r
        assert all(s == 0 for between in host["storage"]["between"] for s in between), r
