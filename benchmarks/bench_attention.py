"""Memory and time of one layer's core attention: Megatron's local DotProductAttention vs `sdpa`.

    .venv/bin/python benchmarks/bench_attention.py [--seq 4096 --heads 32 --kv-heads 8 --head-dim 64
        --batch 1 --dtype bf16 --mask packed --repeats 3] [--smoke]

Defaults: one layer of the Llama-3.2-1B shape that benchmarks/gpu_check.py trains (32 query heads,
8 KV heads, head dim 64) at seq 4,096, one sequence, bf16, with a packed block-causal mask (4
sequences of 1,024 positions, the layout data/batching.py makes; `--mask causal` passes no mask).
For each module, built as the local spec builds it (model/attention.py, Megatron-Core's
DotProductAttention), forward + backward on the same q, k, v:
  saved      bytes autograd keeps for backward (model/memory.py SavedBytes: distinct storages;
             deterministic) — the activation memory of the layer's attention, the term that ×
             layers × micro-batch overflows a GPU without Transformer Engine;
  peak       peak bytes of tensors alive at once during forward + backward above the level before
             (bench_step.PeakMemory: torch.cuda.max_memory_allocated on GPU, the profiler's
             allocation events on CPU), temporaries included;
  time       median wall seconds of forward + backward over --repeats after one warm-up.
The output difference max|Δ| (sdpa − local, rows with a key) is printed as a sanity check; the
parity proof is tests/test_attention.py (float64, values and gradients, TP=2).
--smoke: seq 128, 4/2 heads, head dim 16, fp32, one repeat (checks that the script runs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def packed_mask(s: int, n_seqs: int, device) -> torch.Tensor:
    """`[1, 1, s, s]` boolean mask, True = masked: causal within each of `n_seqs` equal segments."""
    pos = torch.arange(s, device=device)
    seg = pos * n_seqs // s
    return ~((pos[:, None] >= pos[None, :]) & (seg[:, None] == seg[None, :]))[None, None]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--mask", default="packed", choices=("packed", "causal"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", nargs="+", default=["local", "sdpa"], choices=("local", "sdpa"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq, args.heads, args.kv_heads, args.head_dim, args.dtype, args.repeats = 128, 4, 2, 16, "fp32", 1
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from bench_step import PeakMemory
    from megatron_rasft.config import ModelConfig, ParallelConfig
    from megatron_rasft.model.attention import SDPAttention
    from megatron_rasft.model.memory import SavedBytes
    from megatron_rasft.model.provider import transformer_config
    from megatron_rasft.parallel.groups import destroy_distributed, device, init_distributed

    pgs = init_distributed(ParallelConfig(), seed=0)
    dev = device()
    dtype = DTYPES[args.dtype]
    mcfg = ModelConfig(num_layers=1, hidden_size=args.heads * args.head_dim, ffn_hidden_size=4 * args.head_dim,
                       num_attention_heads=args.heads, num_query_groups=args.kv_heads, seq_length=args.seq,
                       max_position_embeddings=args.seq, params_dtype=args.dtype, transformer_impl="local")
    tcfg = transformer_config(mcfg, ParallelConfig())
    s, b = args.seq, args.batch
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, b, n, args.head_dim, generator=g).to(dev, dtype) for n in (args.heads, args.kv_heads,
                                                                                        args.kv_heads)]
    mask = packed_mask(s, 4, dev).expand(b, 1, s, s) if args.mask == "packed" else None
    print(f"core attention, one layer: seq {s}, batch {b}, {args.heads} query / {args.kv_heads} KV heads, head dim "
          f"{args.head_dim}, {args.dtype}, mask {args.mask}; {dev}"
          f"{'' if dev.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}", flush=True)
    outs = {}
    for impl in args.impls:
        cls = SDPAttention if impl == "sdpa" else DotProductAttention
        mod = cls(config=tcfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                  pg_collection=pgs.collection)

        def step(measure=None):
            qkv = [t.clone().requires_grad_(True) for t in base]
            if measure is not None:
                with measure:
                    o = mod(*qkv, mask)
            else:
                o = mod(*qkv, mask)
            o.float().sum().backward()
            return o.detach()

        step()  # warm-up
        saved = SavedBytes()
        outs[impl] = step(saved)
        with PeakMemory() as peak:
            step()
        times = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"{impl:>6}: saved for backward {saved.bytes / 2**20:10.1f} MiB, peak fwd+bwd {peak.peak / 2**20:10.1f} MiB, "
              f"fwd+bwd {statistics.median(times):.3f} s (median of {args.repeats})", flush=True)
        del mod
    if len(outs) == 2:
        rows = torch.ones(s, dtype=torch.bool, device=dev) if mask is None else (~mask[0, 0]).any(-1)
        diff = (outs["sdpa"].float() - outs["local"].float())[rows].abs().max().item()
        print(f"max|sdpa - local| over the output: {diff:.3g} ({args.dtype})")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
