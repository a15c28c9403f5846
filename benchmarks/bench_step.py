"""Time and peak memory of one Megatron training step per loss method, same model and batch.

    .venv/bin/python benchmarks/bench_step.py [--methods sft dft rasft sft_kl grpo] [--repeats 5]
        [--layers 4 --hidden 256 --ffn 688 --heads 4 --kv-heads 2 --vocab 16384 --seq 256]
        [--global-batch 8 --micro-batch 2] [--pack] [--smoke]

One process (TP = PP = DP = 1; gloo on CPU, NCCL on a GPU), through the trainer's own pieces:
`build_model` → `wrap_ddp` + `attach_schedule_hooks` → `build_optimizer` → `make_forward_step(
make_loss_func(LossConfig(method)))` → `forward_backward` (Megatron's schedule over the micro-batches)
→ `optimizer.step()`. A step = zero grads + forward/backward of the global batch + optimizer step.

What each method costs inside the step:
  sft, dft    policy forward/backward and the vocab-parallel CE;
  rasft       + the sequence ratio from `ref_logp` carried with each sequence (the reference log-probs
              are computed once per sequence by a forward-only pass, not in the step: that pass is
              timed on its own and reported as `ref pass`);
  sft_kl      + a forward of the frozen reference in every micro-batch and the full-vocabulary KL.
  grpo        + the clipped-surrogate coefficient from `old_logp` (π_old's log-probs, carried with each
              sequence like `ref_logp`: the policy's own forward-only pass at the round boundary, the
              same cost as `ref pass`) and per-sequence advantages of both signs; grpo.kl_coef = 0.
--smoke: the smallest model (benchmarks/_shapes.py SMOKE_MODEL), one repeat (checks the script runs).
Times: median of --repeats after one warm-up, methods run round-robin (a shared, noisy machine
drifts alike for all); wall-clock and process CPU time (all threads). On a shared CPU box run
with `--threads 1`: CPU time then measures the work of the step and hardly moves with the load
of other processes, while wall time does. Ratios are against `sft` from the same run.
Memory: peak bytes of tensors alive at once during one step above the level before it (weights,
grads and optimizer state that exist before the step are not counted; activations, logits, their
gradients and temporaries are). GPU: torch.cuda.max_memory_allocated. CPU: the running sum of the
profiler's allocation/free events (the CPU allocator keeps no peak statistic, and the process's
RSS mostly shows what the allocator caches between steps). Measured on one extra, profiled step.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

METHODS = ("sft", "dft", "rasft", "sft_kl", "asft", "profit", "grpo")


# -- memory -------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak bytes of tensors alive at once inside the `with` block, above the level at its start.

    CUDA: torch.cuda.max_memory_allocated. CPU: the same quantity rebuilt from the profiler's
    allocation events (every tensor allocation and free with its size, in order): the maximum of
    their running sum. Allocator caching and fragmentation are not included (RSS would mostly show
    the allocator's cache, not the step)."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            return
        self.prof.__exit__(*exc)
        from torch._C._autograd import DeviceType

        events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak = peak


# -- building blocks (also used by bench_train_vs_hf.py and gpu_mfu.py) ---------------------------------
def model_config(args):
    from megatron_rasft.config import ModelConfig

    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                       num_attention_heads=args.heads, num_query_groups=args.kv_heads, vocab_size=args.vocab,
                       seq_length=args.seq, max_position_embeddings=max(args.seq, 512),
                       transformer_impl=getattr(args, "impl", "local"))


def synthetic_seqs(n: int, seq_length: int, vocab: int, seed: int = 0, prompt_len=(16, 48)) -> list:
    """`n` training sequences of uneven length (a quarter to all of the context), prompt masked,
    random weights A_s in [0.2, 1]; token ids avoid 0..3 (special ids of the tiny tokenizers)."""
    from megatron_rasft.data.batching import Seq

    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(seq_length // 4, seq_length + 1)
        toks = [rng.randrange(4, vocab) for _ in range(length)]
        out.append(Seq(f"e/{i}", toks, min(rng.randint(*prompt_len), length - 2), weight=rng.uniform(0.2, 1.0)))
    return out


def batches_of(seqs: list, ref_logp: dict | None, seq_length: int, micro_batch: int, pack: bool,
               device: torch.device) -> list[dict]:
    from dataclasses import replace

    from megatron_rasft.data.batching import make_rows, stack_microbatches

    if ref_logp is not None:
        seqs = [replace(s, ref_logp=ref_logp[s.key]) for s in seqs]
    rows = make_rows(seqs, seq_length, 0, pack=pack)
    return [{k: v.to(device) for k, v in mb.items()} for mb in stack_microbatches(rows, micro_batch, seq_length, 0)]


def build_policy(mcfg, *, lr: float = 1e-4):
    """(DDP-wrapped chunks, optimizer, the bare GPTModel) at TP = PP = 1, in `mcfg.params_dtype`;
    call after init_distributed."""
    from megatron_rasft.config import OptimConfig, ParallelConfig
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.placement import to_device
    from megatron_rasft.engine.optim import build_optimizer
    from megatron_rasft.engine.step import attach_schedule_hooks, wrap_ddp

    pcfg = ParallelConfig(use_distributed_optimizer=False)
    model = build_model(mcfg, pcfg)
    to_device(model, model.config.params_dtype)  # on the GPU, norms in the model's dtype (as the trainer)
    chunks = wrap_ddp([model], use_distributed_optimizer=False)
    attach_schedule_hooks(chunks)
    optimizer, _ = build_optimizer(chunks, OptimConfig(lr=lr, clip_grad=1.0), pcfg, total_steps=1000)
    return chunks, optimizer, model


def frozen_copy(mcfg, model):
    from megatron_rasft.config import ParallelConfig
    from megatron_rasft.model.provider import build_model
    from megatron_rasft.parallel.placement import to_device

    ref = build_model(mcfg, ParallelConfig())
    to_device(ref, ref.config.params_dtype)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    ref.requires_grad_(False)
    return ref


def train_step(chunks, optimizer, forward_step, batches, seq_length: int) -> list[dict]:
    """zero grads → forward/backward over the micro-batches → optimizer step; returns the reports."""
    from megatron_rasft.engine.step import forward_backward

    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    reports = forward_backward(chunks, forward_step, batches, seq_length=seq_length)
    optimizer.step()
    return reports


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- the benchmark ------------------------------------------------------------------------------------
from _shapes import SMOKE_MODEL, add_model_args  # noqa: E402 (same folder)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["sft", "dft", "rasft", "sft_kl"], choices=METHODS)
    p.add_argument("--repeats", type=int, default=5)
    add_model_args(p)
    p.add_argument("--pack", action="store_true", help="pack sequences (block-diagonal attention)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE_MODEL, repeats=1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "sft" not in args.methods:
        args.methods = ["sft"] + args.methods  # the baseline of the ratios

    from dataclasses import replace

    from megatron_rasft.config import LossConfig, ParallelConfig
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.parallel.groups import destroy_distributed, device, init_distributed
    from megatron_rasft.engine.refpass import score
    from megatron_rasft.engine.step import make_forward_step

    pgs = init_distributed(ParallelConfig(), seed=0)
    dev = device()
    mcfg = model_config(args)
    chunks, optimizer, model = build_policy(mcfg)
    reference = frozen_copy(mcfg, model)
    n_params = sum(p.numel() for p in model.parameters())

    seqs = synthetic_seqs(args.global_batch, args.seq, args.vocab)
    t0 = time.perf_counter()
    ref_logp = score([reference], seqs, pgs, micro_batch_size=args.micro_batch, seq_length=args.seq, pad_id=0,
                     vocab_size=args.vocab)
    ref_first = time.perf_counter() - t0
    batches = batches_of(seqs, ref_logp, args.seq, args.micro_batch, args.pack, dev)
    grpo_batches = None
    if "grpo" in args.methods:  # π_old = the policy now; advantages of a binary-reward group of 4
        old_logp = score([model], seqs, pgs, micro_batch_size=args.micro_batch, seq_length=args.seq, pad_id=0,
                         vocab_size=args.vocab)
        adv = [0.866, -0.866, -0.866, 0.866]
        grpo_seqs = [replace(s, weight=1.0, old_logp=old_logp[s.key], advantage=adv[i % 4]) for i, s in enumerate(seqs)]
        grpo_batches = batches_of(grpo_seqs, ref_logp, args.seq, args.micro_batch, args.pack, dev)
    loss_tokens = int(sum(b["loss_mask"].sum().item() for b in batches))

    steps = {}
    for m in args.methods:
        cfg = LossConfig(method=m)
        steps[m] = make_forward_step(make_loss_func(cfg, tp_group=pgs.tp), pgs, vocab_size=args.vocab,
                                     ref_model=reference if cfg.needs_ref_logits else None)

    def ref_pass():
        score([reference], seqs, pgs, micro_batch_size=args.micro_batch, seq_length=args.seq, pad_id=0,
              vocab_size=args.vocab)

    runs = {m: (lambda fs=fs, b=(grpo_batches if m == "grpo" else batches): train_step(chunks, optimizer, fs, b, args.seq))
            for m, fs in steps.items()}
    runs["ref pass"] = ref_pass
    times = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for k, fn in runs.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    peaks = {}
    for k, fn in runs.items():
        with PeakMemory() as pm:
            fn()
        peaks[k] = pm.peak

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    print(f"GPTModel (local spec, fp32): {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, heads "
          f"{args.heads}/{args.kv_heads}, vocab {args.vocab}, {n_params / 1e6:.1f}M params; {where}")
    print(f"global batch {args.global_batch} × seq {args.seq} ({'packed' if args.pack else 'padded'}), "
          f"micro-batch {args.micro_batch} → {len(batches)} micro-batches, {loss_tokens} loss tokens; "
          f"median of {args.repeats}; first ref pass {ref_first:.2f}s")
    mib = 2 ** 20
    base_t, base_c, base_m = statistics.median(times["sft"]), statistics.median(cpu["sft"]), peaks["sft"]
    print(f"  {'':10s} {'wall s':>8s} {'× sft':>6s} {'min..max s':>15s} {'cpu s':>8s} {'× sft':>6s} "
          f"{'tok/cpu-s':>9s} {'peak MiB':>9s} {'× sft':>6s}")
    for k in runs:
        t, c = statistics.median(times[k]), statistics.median(cpu[k])
        print(f"  {k:10s} {t:8.3f} {t / base_t:6.2f} {min(times[k]):7.3f}..{max(times[k]):6.3f} {c:8.3f} "
              f"{c / base_c:6.2f} {loss_tokens / c:9.0f} {peaks[k] / mib:9.1f} {peaks[k] / max(base_m, 1):6.2f}")
    destroy_distributed()


if __name__ == "__main__":
    main()
