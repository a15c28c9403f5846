"""Tokens/s/GPU and MFU of one training step of a ~1B Llama-shaped GPTModel on one GPU.

    python benchmarks/gpu_mfu.py [--layers 16 --hidden 2048 --heads 32 --kv-heads 8 --ffn 8192
        --vocab 128256 --seq 2048 --micro-batch 2 --micro-batches 4] [--method rasft] [--impl auto]
        [--fp8 hybrid] [--peak-tflops 989]
    python benchmarks/gpu_mfu.py --device cpu --tiny      # the same code path on tiny shapes, on CPU

The step is the trainer's: `build_model` (Transformer Engine spec when importable, else the local
spec) → Megatron DDP → Megatron optimizer (bf16 params, fp32 main weights and grads) →
`forward_backward` over `--micro-batches` micro-batches with the `--method` loss → `optimizer.step()`.
Full-length sequences (a 16-token prompt masked), so every position is a processed token.

FLOPs per token (fwd + bwd = 3 × fwd), the PaLM convention:
    6 · N_matmul  +  12 · L · h · s
N_matmul = parameters that take part in matrix multiplies: everything but the input embedding
(a lookup); the output layer counts. The attention term counts the full s × s score and value
products (no causal halving). MFU = FLOPs/token × tokens/s / peak, peak = dense bf16 TFLOP/s of
the GPU (H100/H200 SXM 989; override with --peak-tflops). The reference pass of `rasft` (forward-only,
once per sequence) is outside the step and not counted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY = dict(layers=2, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=512, seq=64, micro_batch=2, micro_batches=2)


def flops_per_token(n_matmul: int, layers: int, hidden: int, seq: int) -> float:
    return 6 * n_matmul + 12 * layers * hidden * seq


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--method", default="rasft", help="loss method (sft, dft, rasft, ...)")
    p.add_argument("--impl", default="auto", choices=("auto", "local", "te"), help="layer spec")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "local"),
                   help="core attention of the local spec (model.attention); the TE spec uses its own")
    p.add_argument("--fp8", default=None, choices=("hybrid", "e4m3"), help="FP8 (Hopper + Transformer Engine)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s (default: by GPU name)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a check of the code path, e.g. on CPU)")
    p.add_argument("--smoke", action="store_true", help="--tiny, one step without warm-up, on the CPU when "
                   "there is no GPU: checks in seconds that the script still runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.tiny, args.warmup, args.steps = True, 0, 1
        if not torch.cuda.is_available():
            args.device = "cpu"
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU visible (torch.cuda.is_available() is False). This benchmark measures "
              "GPU throughput; run it on a GPU node, or use `--device cpu --tiny` to check the code path.",
              file=sys.stderr)
        return 2
    if args.device == "cpu" and torch.cuda.is_available():
        print("error: --device cpu on a machine with a GPU: hide it with CUDA_VISIBLE_DEVICES=''", file=sys.stderr)
        return 2
    on_gpu = args.device == "cuda"

    from bench_step import build_policy, model_config, sync, synthetic_seqs, batches_of, train_step
    from megatron_rasft.config import LossConfig, ParallelConfig
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.model.provider import resolve_impl
    from megatron_rasft.parallel.groups import destroy_distributed, device, init_distributed
    from megatron_rasft.train.log import peak_flops
    from megatron_rasft.engine.step import make_forward_step

    pgs = init_distributed(ParallelConfig(), seed=0)
    mcfg = model_config(args)
    mcfg.fp8 = args.fp8
    mcfg.attention = args.attention
    mcfg.params_dtype = "bf16" if on_gpu else mcfg.params_dtype
    impl = resolve_impl(mcfg)  # clear error if te / fp8 cannot run here
    chunks, optimizer, model = build_policy(mcfg)
    n_all = sum(p.numel() for p in model.parameters())
    n_embed = model.embedding.word_embeddings.weight.numel()
    n_matmul = n_all - n_embed
    cfg = LossConfig(method=args.method)
    if cfg.needs_ref_logits:
        print(f"error: --method {args.method} needs the reference model in the step; use sft, dft, rasft or profit",
              file=sys.stderr)
        return 2
    forward_step = make_forward_step(make_loss_func(cfg, tp_group=pgs.tp), pgs, vocab_size=args.vocab)

    n_seqs = args.micro_batch * args.micro_batches
    seqs = synthetic_seqs(n_seqs, args.seq, args.vocab, prompt_len=(16, 16))
    for s in seqs:  # full length: seq + 1 tokens → seq positions per row
        s.tokens = (s.tokens * 2)[: args.seq + 1]
    ref = None
    if cfg.needs_ref_logp:  # any values do for timing: the log-prob of a uniform model
        ref = {s.key: [-float(torch.log(torch.tensor(float(args.vocab))))] * (len(s.tokens) - 1) for s in seqs}
    batches = batches_of(seqs, ref, args.seq, args.micro_batch, False, device())
    tokens = n_seqs * args.seq

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        train_step(chunks, optimizer, forward_step, batches, args.seq)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    fpt = flops_per_token(n_matmul, args.layers, args.hidden, args.seq)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops()
    where = torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if on_gpu else ""
    print(f"{where}: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, ffn "
          f"{args.ffn}, vocab {args.vocab}; {n_all / 1e6:,.1f}M params ({n_matmul / 1e6:,.1f}M in matmuls); "
          f"spec {impl}{' (' + args.attention + ' attention)' if impl == 'local' else ''}, {'bf16' if on_gpu else 'fp32'}{', fp8 ' + args.fp8 if args.fp8 else ''}; loss {args.method}")
    print(f"step: {args.micro_batches} micro-batches × {args.micro_batch} × {args.seq} = {tokens} tokens; "
          f"median {t * 1e3:.1f} ms of {args.steps} (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}){mem}")
    line = f"tokens/s/GPU {tokens / t:,.0f}; {fpt / 1e9:.3g} GFLOP/token; {fpt * tokens / t / 1e12:.3g} TFLOP/s"
    if peak:
        line += f"; MFU {fpt * tokens / t / peak:.1%} of {peak / 1e12:.0f} TFLOP/s"
    else:
        line += "; MFU n/a (unknown peak: pass --peak-tflops)"
    print(line, flush=True)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
