"""Time and peak memory of one Megatron training step with activation recomputation, against none.

    .venv/bin/python benchmarks/bench_recompute.py [--repeats 3] [--threads 1]
        [--layers 4 --hidden 256 --ffn 688 --heads 4 --kv-heads 2 --vocab 16384 --seq 1024]
        [--global-batch 4 --micro-batch 1] [--attention sdpa|local] [--smoke]

One process (TP = PP = DP = 1), the trainer's own pieces (bench_step.py's building blocks): the same
model weights and the same global batch under `model.recompute_granularity` = none, "selective"
(Megatron's default module, the core attention) and "full" (`recompute_method = "uniform"`,
`recompute_num_layers = 1`: every layer keeps only its input and recomputes its forward in the
backward pass). A step = zero grads + forward/backward of the global batch + optimizer step, rasft loss.
Memory: peak bytes of tensors alive at once during one step above the level before it (bench_step's
`PeakMemory`: torch.cuda.max_memory_allocated on a GPU, the profiler's allocation events on CPU):
activations, logits, their gradients, temporaries; weights, grads and optimizer state are not
counted. Times: median of --repeats after a warm-up, modes round-robin. Ratios against `none`.
With `--attention sdpa` (the default model.attention) the core attention keeps little, so selective
saves little; `--attention local` keeps the [b, heads, s, s] probabilities, which selective drops.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from _shapes import SMOKE_MODEL, add_model_args
from bench_step import PeakMemory, batches_of, build_policy, model_config, synthetic_seqs, sync, train_step

MODES = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    add_model_args(p, seq=1024, global_batch=4, micro_batch=1)
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "local"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE_MODEL, repeats=1)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron_rasft.config import LossConfig, ParallelConfig
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.parallel.groups import destroy_distributed, device, init_distributed
    from megatron_rasft.engine.step import make_forward_step

    pgs = init_distributed(ParallelConfig(), seed=0)
    base = dataclasses.replace(model_config(args), attention=args.attention)
    policies, first = {}, None
    for name, settings in MODES.items():
        chunks, optimizer, model = build_policy(dataclasses.replace(base, **settings))
        if first is None:
            first = model
        else:  # the same weights in every mode
            model.load_state_dict(first.state_dict())
        policies[name] = (chunks, optimizer)
    n_params = sum(p.numel() for p in first.parameters())
    seqs = synthetic_seqs(args.global_batch, args.seq, args.vocab)
    ref_logp = {s.key: [-5.0] * (len(s.tokens) - 1) for s in seqs}  # the ratio's input; its value is irrelevant here
    batches = batches_of(seqs, ref_logp, args.seq, args.micro_batch, False, device())
    step = make_forward_step(make_loss_func(LossConfig(method="rasft"), tp_group=pgs.tp), pgs, vocab_size=args.vocab)
    runs = {name: (lambda c=c, o=o: train_step(c, o, step, batches, args.seq)) for name, (c, o) in policies.items()}

    times = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for k, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    peaks = {}
    for k, fn in runs.items():
        with PeakMemory() as pm:
            fn()
        peaks[k] = pm.peak

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    print(f"GPTModel (local spec, fp32, attention {args.attention}): {args.layers} layers, hidden {args.hidden}, "
          f"ffn {args.ffn}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, {n_params / 1e6:.1f}M params; "
          f"{where}")
    print(f"global batch {args.global_batch} × seq {args.seq}, micro-batch {args.micro_batch} → {len(batches)} "
          f"micro-batches; median of {args.repeats}")
    mib = 2 ** 20
    t0, m0 = statistics.median(times["none"]), peaks["none"]
    print(f"  {'recompute':10s} {'wall s':>8s} {'× none':>7s} {'peak MiB':>9s} {'× none':>7s}")
    for k in runs:
        t = statistics.median(times[k])
        print(f"  {k:10s} {t:8.3f} {t / t0:7.2f} {peaks[k] / mib:9.1f} {peaks[k] / max(m0, 1):7.2f}")
    destroy_distributed()


if __name__ == "__main__":
    main()
