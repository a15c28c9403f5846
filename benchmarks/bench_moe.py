"""Step time of a mixture-of-experts model at expert parallelism 2 vs 1, and the share of it spent in
token dispatch.

    .venv/bin/python benchmarks/bench_moe.py [--repeats 3] [--layers 4 --hidden 256 --experts 8
        --topk 2 --moe-ffn 256 --seq 256 --global-batch 8 --micro-batch 2] [--smoke]

Two gloo processes (CPU) in both layouts, the same global batch split the same way over the two
data-parallel ranks: EP = 1 holds every expert on both ranks (expert gradients all-reduced), EP = 2
holds half the experts on each and sends each token to its experts by all-to-all (Megatron's
alltoall dispatcher). A step = zero grads + forward/backward of the global batch through Megatron's
schedule (`rasft` loss, aux coefficient 0.01) + optimizer step; the median of `--repeats` after one
warm-up, rank 0's wall clock.

Dispatch share: the time inside the token dispatcher's six calls of every MoE layer (permute,
all-to-all, sort by expert; and back: unsort, all-to-all, unpermute), forward and backward, over the
step time. Forward: wall time of each call. Backward: the time between the gradient reaching a
call's output and leaving through its input (autograd marks around each call); on CPU autograd runs
one node at a time in dependency order, so other independent work scheduled in between is counted
too: an upper bound.
--smoke: tiny shapes, one repeat (checks that the script runs; the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

DISPATCH_CALLS = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess",
                  "token_combine", "combine_postprocess")


class _Clock:
    """Seconds spent in the dispatcher's calls (forward and backward) since `reset`."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.fwd = 0.0
        self.bwd = 0.0
        self.open: list = []


class _Mark(torch.autograd.Function):
    """Identity; in backward, stamps the gradient's passage at a dispatcher call's boundary: at its
    output (`entering=True`: the gradient enters the call) or at its input (it leaves the call)."""

    @staticmethod
    def forward(ctx, x, clock, entering):
        ctx.clock, ctx.entering = clock, entering
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.entering:
            ctx.clock.open.append(time.perf_counter())
        elif ctx.clock.open:
            ctx.clock.bwd += time.perf_counter() - ctx.clock.open.pop()
        return g, None, None


def _timed(fn, clock: _Clock):
    def wrapped(x, *args, **kwargs):
        track = torch.is_tensor(x) and x.requires_grad
        if track:
            x = _Mark.apply(x, clock, False)
        t0 = time.perf_counter()
        out = fn(x, *args, **kwargs)
        clock.fwd += time.perf_counter() - t0
        if track:
            if isinstance(out, tuple) and torch.is_tensor(out[0]) and out[0].requires_grad:
                out = (_Mark.apply(out[0], clock, True), *out[1:])
            elif torch.is_tensor(out) and out.requires_grad:
                out = _Mark.apply(out, clock, True)
        return out

    return wrapped


def instrument(model, clock: _Clock) -> int:
    """Wrap the dispatcher calls of every MoE layer of `model`; returns the number of layers."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    n = 0
    for m in model.modules():
        if isinstance(m, MoELayer):
            for name in DISPATCH_CALLS:
                setattr(m.token_dispatcher, name, _timed(getattr(m.token_dispatcher, name), clock))
            n += 1
    return n


def _layout(ep: int, args) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_step import batches_of, synthetic_seqs

    from megatron.core import parallel_state as ps

    from megatron_rasft.config import LossConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_rasft.engine.moe_routing import MoERouting
    from megatron_rasft.engine.optim import build_optimizer
    from megatron_rasft.engine.step import attach_schedule_hooks, forward_backward, make_forward_step, wrap_ddp
    from megatron_rasft.loss import LossBatch, loss_normaliser, make_loss_func
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import device, init_distributed

    pcfg = ParallelConfig(expert_model_parallel_size=ep, use_distributed_optimizer=False)
    pgs = init_distributed(pcfg, seed=0)
    mcfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.moe_ffn,
                       num_attention_heads=args.heads, num_query_groups=args.kv_heads, vocab_size=args.vocab,
                       seq_length=args.seq, max_position_embeddings=max(args.seq, 512), num_moe_experts=args.experts,
                       moe_router_topk=args.topk, moe_ffn_hidden_size=args.moe_ffn, moe_aux_loss_coeff=0.01)
    model = build_model(mcfg, pcfg)
    chunks = wrap_ddp([model], use_distributed_optimizer=False)
    attach_schedule_hooks(chunks)
    optimizer, _ = build_optimizer(chunks, OptimConfig(lr=1e-4, clip_grad=1.0), pcfg, total_steps=1000)
    clock = _Clock()
    instrument(model, clock)
    lcfg = LossConfig(method="rasft", ratio="none")
    routing = MoERouting(chunks, 0.01, lambda mb: loss_normaliser(LossBatch.from_microbatch(mb), lcfg), pgs)
    seqs = synthetic_seqs(args.global_batch, args.seq, args.vocab, seed=0)
    dp, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    batches = batches_of(seqs[dp::dp_size], None, args.seq, args.micro_batch, False, device())
    step = make_forward_step(make_loss_func(lcfg, tp_group=pgs.tp), pgs, vocab_size=args.vocab)
    times, shares = [], []
    for i in range(args.repeats + 1):
        torch.distributed.barrier()
        clock.reset()
        t0 = time.perf_counter()
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        routing.begin_step(batches)
        forward_backward(chunks, step, batches, seq_length=args.seq)
        optimizer.step()
        dt = time.perf_counter() - t0
        if i:  # the first is a warm-up
            times.append(dt)
            shares.append((clock.fwd + clock.bwd) / dt)
    metrics = routing.metrics()
    routing.close()
    return dict(step_s=statistics.median(times), dispatch_share=statistics.median(shares),
                imbalance=metrics["moe_load_imbalance"])


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    from megatron.core import parallel_state as ps

    from megatron_rasft.parallel import cpu
    from megatron_rasft.parallel.groups import destroy_distributed

    cpu.enable()
    out = {}
    for ep in (1, 2):
        out[ep] = _layout(ep, args)
        ps.destroy_model_parallel()
        torch.distributed.barrier()
    destroy_distributed()
    if rank == 0:
        queue.put(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--moe-ffn", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (2 ranks)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (the numbers mean nothing)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(layers=1, hidden=64, experts=4, moe_ffn=32, vocab=256, seq=32, global_batch=4,
                          micro_batch=2, repeats=1)
    import torch.multiprocessing as mp

    from megatron_rasft.parallel.net import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        out = queue.get(timeout=1800)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    if any(proc.exitcode for proc in procs):
        raise SystemExit(f"a rank failed (exit codes {[proc.exitcode for proc in procs]})")
    print(f"MoE step, 2 ranks (DP 2), {args.layers} layers, hidden {args.hidden}, {args.experts} experts of "
          f"{args.moe_ffn}, top-{args.topk}, {args.global_batch} × {args.seq} tokens per step, "
          f"{args.threads} thread(s) per rank, median of {args.repeats}:")
    for ep in (1, 2):
        r = out[ep]
        print(f"  EP={ep}: step {r['step_s'] * 1e3:8.1f} ms   dispatch {r['dispatch_share']:6.1%} of the step   "
              f"load max/mean {r['imbalance']:.2f}")
    print(f"  step time EP=2 / EP=1: {out[2]['step_s'] / out[1]['step_s']:.2f}")


if __name__ == "__main__":
    main()
