"""Step time of an MoE model at EP=2 against EP=1 (two ranks, DP=2 both), and the share of the step
spent dispatching tokens to the experts.

    .venv/bin/python benchmarks/bench_moe_step.py [--repeats 5] [--layers 2 --hidden 256 --experts 8
        --moe-ffn 256 --topk 2 --vocab 4096 --seq 256 --batch 4] [--threads 1] [--smoke]

Two spawned ranks (gloo on CPU, NCCL on a GPU) run the same model (every layer MoE, Qwen3-MoE
routing, model/provider.py) in Megatron DDP, first at EP=1 (each rank holds every expert) then at
EP=2 (each rank half of them; the tokens travel by all-to-all). A step = zero grads, forward and
backward of this rank's batch (`--batch` sequences of `--seq` tokens, loss = mean log-sum-exp of the
logits), `finalize_model_grads`, the Adam step. Reported per layout: the median over `--repeats`
steps after one warm-up, of the wall time and of the process's CPU time (rank 0), and two shares of
the wall time: `dispatch` = the token dispatcher's forward (permutation, all-to-all, un-permutation
on the way in and back: MoEAlltoAllTokenDispatcher's dispatch_preprocess, token_dispatch,
dispatch_postprocess, combine_preprocess, token_combine, combine_postprocess) and `a2a` = the
all-to-all alone, forward and backward (tensor_parallel.mappings._AllToAll). At EP=1 there is no
all-to-all (one rank per expert group), only the permutation. The ratio EP=2 / EP=1 is of the same
run. --smoke: tiny shapes, one repeat (checks that the script runs; numbers meaningless).
On a shared CPU box run with --threads 1: each rank's CPU time then measures its own work.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

_DISPATCH = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess",
             "token_combine", "combine_postprocess")


class Timers:
    """Wall seconds spent inside wrapped functions, by label (nested calls are not double counted:
    the wrapped methods do not call each other)."""

    def __init__(self):
        self.total = {}

    def wrap(self, owner, name: str, label: str, static: bool = False):
        fn = getattr(owner, name)
        timers = self

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers.total[label] = timers.total.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, name, staticmethod(timed) if static else timed)

    def reset(self):
        self.total = {}


def _install_timers() -> Timers:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    t = Timers()
    for name in _DISPATCH:
        t.wrap(MoEAlltoAllTokenDispatcher, name, "dispatch")
    t.wrap(mappings._AllToAll, "forward", "a2a", static=True)
    t.wrap(mappings._AllToAll, "backward", "a2a", static=True)
    return t


def _layout(args, ep: int, timers: Timers) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from megatron_rasft.config import ModelConfig, OptimConfig, ParallelConfig
    from megatron_rasft.engine.optim import build_optimizer
    from megatron_rasft.engine.step import attach_schedule_hooks, wrap_ddp
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.groups import device, init_distributed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    pcfg = ParallelConfig(expert_model_parallel_size=ep, use_distributed_optimizer=False)
    pgs = init_distributed(pcfg, seed=0)
    mcfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.moe_ffn,
                       num_attention_heads=args.heads, vocab_size=args.vocab, seq_length=args.seq,
                       max_position_embeddings=max(args.seq, 512), num_moe_experts=args.experts,
                       moe_ffn_hidden_size=args.moe_ffn, moe_router_topk=args.topk)
    model = build_model(mcfg, pcfg).to(device())
    chunks = wrap_ddp([model], use_distributed_optimizer=False)
    attach_schedule_hooks(chunks)
    optimizer, _ = build_optimizer(chunks, OptimConfig(lr=1e-4, clip_grad=1.0), pcfg, total_steps=1000)
    g = torch.Generator().manual_seed(1 + pgs.dp_rank)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device())
    pos = torch.arange(args.seq, device=device()).expand(args.batch, args.seq).contiguous()

    def step():
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        logits = chunks[0](tokens, pos, None)
        logits.float().logsumexp(-1).mean().backward()
        finalize_model_grads(chunks)
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    step()  # warm-up
    walls, cpus, dispatch, a2a = [], [], [], []
    for _ in range(args.repeats):
        timers.reset()
        torch.distributed.barrier()
        w, c = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        dispatch.append(timers.total.get("dispatch", 0.0) / walls[-1])
        a2a.append(timers.total.get("a2a", 0.0) / walls[-1])
    med = statistics.median
    return dict(wall=med(walls), cpu=med(cpus), dispatch=med(dispatch), a2a=med(a2a),
                experts_here=len(model.decoder.layers[0].mlp.experts.local_experts))


def _rank(rank: int, world: int, port: int, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.simplefilter("ignore")
    from megatron_rasft.parallel.groups import destroy_distributed

    timers = _install_timers()
    try:
        out = {ep: _layout(args, ep, timers) for ep in (1, 2)}
        results.put((rank, out))
    finally:
        destroy_distributed()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--moe-ffn", type=int, default=256)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per rank")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (numbers meaningless)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(layers=1, hidden=64, experts=4, moe_ffn=32, vocab=256, seq=16, batch=2, repeats=1)

    import torch.multiprocessing as mp

    from megatron_rasft.parallel.net import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, args, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    got = {}
    try:
        while len(got) < 2:
            rank, out = results.get(timeout=1800)
            got[rank] = out
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    if any(proc.exitcode for proc in procs):
        raise SystemExit(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
    r = got[0]
    print(f"MoE step, 2 ranks (DP=2), {args.layers} MoE layers, hidden {args.hidden}, {args.experts} experts of "
          f"{args.moe_ffn}, top-{args.topk}, {args.batch}x{args.seq} tokens per rank, vocab {args.vocab}, "
          f"threads {args.threads or torch.get_num_threads()}; median of {args.repeats} (rank 0)")
    print(f"{'layout':8} {'experts/rank':>12} {'wall s':>8} {'cpu s':>8} {'dispatch':>9} {'a2a':>6}")
    for ep in (1, 2):
        x = r[ep]
        print(f"{'EP=' + str(ep):8} {x['experts_here']:>12} {x['wall']:8.3f} {x['cpu']:8.3f} "
              f"{x['dispatch']:9.1%} {x['a2a']:6.1%}")
    print(f"EP=2 / EP=1: wall {r[2]['wall'] / r[1]['wall']:.2f}, cpu {r[2]['cpu'] / r[1]['cpu']:.2f}")


if __name__ == "__main__":
    main()
