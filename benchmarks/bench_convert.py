"""Conversion throughput and memory on a synthetic Llama-shaped (or Qwen3-MoE) checkpoint, both directions.

Makes a random bf16 checkpoint of N and 2N layers (written one tensor at a time, so the generator
stays small), converts HF → Megatron → HF, each conversion in a fresh process, and reports wall
time, GB/s and peak RSS — also as a ratio to the largest tensor and to the model size. Peak RSS
should not grow with the number of layers. The work folder is removed at the end.

With `--moe-experts E1 E2 ...` the checkpoints are Qwen3-MoE ones (every layer MoE, per-expert Hub
names) of `--layers[0]` layers and E1, E2, ... experts of `--moe-ffn` each, all else equal: peak RSS
should not grow with the number of experts (experts stream one matrix at a time).

  python benchmarks/bench_convert.py                      # ~0.75B and ~1.5B parameters
  python benchmarks/bench_convert.py --layers 2 4 --hidden 512 --ffn 1408 --vocab 8000   # quick
  python benchmarks/bench_convert.py --moe-experts 8 64 --layers 2 --hidden 1024 --moe-ffn 1024 --vocab 8000
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_checkpoint(out: Path, layers: int, hidden: int, ffn: int, vocab: int, heads: int, kv_heads: int) -> dict:
    """A random bf16 Llama checkpoint written one tensor at a time."""
    head_dim = hidden // heads
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
               intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act="silu", max_position_embeddings=4096,
               rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16")
    plan = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += _attention_plan(p, hidden, heads, kv_heads, head_dim)
        plan += [(p + "post_attention_layernorm.weight", (hidden,)), (p + "mlp.gate_proj.weight", (ffn, hidden)),
                 (p + "mlp.up_proj.weight", (ffn, hidden)), (p + "mlp.down_proj.weight", (hidden, ffn))]
    plan += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return _write_random(out, cfg, plan)


def _attention_plan(p: str, hidden: int, heads: int, kv_heads: int, head_dim: int) -> list:
    """(name, shape) of one layer's input norm and q/k/v/o projections, HF names under prefix `p`."""
    return [(p + "input_layernorm.weight", (hidden,)), (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim))]


def make_moe_checkpoint(out: Path, layers: int, hidden: int, moe_ffn: int, experts: int, vocab: int, heads: int,
                        kv_heads: int) -> dict:
    """A random bf16 Qwen3-MoE checkpoint (every layer MoE, top-2, q/k norms) written one tensor at a time."""
    head_dim = hidden // heads
    cfg = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=vocab, hidden_size=hidden,
               intermediate_size=moe_ffn, moe_intermediate_size=moe_ffn, num_experts=experts, num_experts_per_tok=2,
               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act="silu",
               max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
               attention_bias=False, torch_dtype="bfloat16")
    plan = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += _attention_plan(p, hidden, heads, kv_heads, head_dim)
        plan += [(p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,)),
                 (p + "post_attention_layernorm.weight", (hidden,)), (p + "mlp.gate.weight", (experts, hidden))]
        for j in range(experts):
            plan += [(p + f"mlp.experts.{j}.gate_proj.weight", (moe_ffn, hidden)),
                     (p + f"mlp.experts.{j}.up_proj.weight", (moe_ffn, hidden)),
                     (p + f"mlp.experts.{j}.down_proj.weight", (hidden, moe_ffn))]
    plan += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return _write_random(out, cfg, plan)


def _write_random(out: Path, cfg: dict, plan: list) -> dict:
    from megatron_rasft.convert import hf_io

    out.mkdir(parents=True)
    writer = hf_io.ShardedWriter(out, [(n, s, torch.bfloat16) for n, s in plan], hf_io.parse_size("2GB"))
    gen = torch.Generator().manual_seed(0)
    for name, shape in plan:
        t = torch.empty(shape, dtype=torch.bfloat16)
        for rows in t.split(4096):  # fill in blocks: the generator holds one bf16 tensor
            rows.copy_(torch.randn(rows.shape, generator=gen) * 0.02)
        writer.write(name, t)
    hf_io.write_index(out, writer.finish(), writer.bytes_written)
    hf_io.write_side_files(out, cfg)
    # The largest tensor on either side: Megatron's fc1 is [gate; up] (2 × the HF matrix).
    largest = max(max(hf_io.numel(s) for _, s in plan),
                  max((2 * hf_io.numel(s) for n, s in plan if n.endswith("gate_proj.weight")), default=0)) * 2
    return {"model_bytes": writer.bytes_written, "largest_tensor_bytes": largest,
            "params": writer.bytes_written // 2}


def child(args) -> None:
    """One conversion in this fresh process; prints a JSON line."""
    from megatron_rasft.convert import pipeline

    base = pipeline.peak_rss_bytes()  # after imports
    t0 = time.perf_counter()
    if args.child == "hf-to-mcore":
        s = pipeline.hf_to_mcore(args.src, args.dst, tp=1, quiet=True)
    else:
        s = pipeline.mcore_to_hf(args.src, args.dst, quiet=True)
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": s.bytes, "peak_rss": s.peak_rss_bytes,
                      "base_rss": base}))


def run(direction: str, src: Path, dst: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", direction, "--src", str(src), "--dst", str(dst)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"{direction} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--moe-experts", type=int, nargs="+", default=None,
                    help="Qwen3-MoE checkpoints with these expert counts (of --layers[0] layers) instead of Llama ones")
    ap.add_argument("--moe-ffn", type=int, default=1024, help="per-expert intermediate size with --moe-experts")
    ap.add_argument("--workdir", default="/work/tmp-bench-convert")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dst", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks in seconds that the script still runs (numbers meaningless)")
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    if args.smoke:
        import tempfile

        vars(args).update(layers=[1], hidden=64, ffn=128, heads=4, kv_heads=2, vocab=256, moe_ffn=32,
                          workdir=str(Path(tempfile.mkdtemp(prefix="bench_convert_smoke_")) / "work"))
        if args.moe_experts is None:
            args.moe_experts = [4]  # the smoke checks the MoE path (the dense one has its own tests)
    work = Path(args.workdir)
    if work.exists():
        raise SystemExit(f"--workdir {work} exists; remove it or pick another")
    rows = []
    try:
        cases = [(layers, None) for layers in args.layers] if args.moe_experts is None else \
            [(args.layers[0], e) for e in args.moe_experts]
        for layers, experts in cases:
            tag = f"{layers}" if experts is None else f"{layers}x{experts}"
            hf, mc, back = work / f"hf{tag}", work / f"mc{tag}", work / f"back{tag}"
            t0 = time.perf_counter()
            if experts is None:
                info = make_checkpoint(hf, layers, args.hidden, args.ffn, args.vocab, args.heads, args.kv_heads)
            else:
                info = make_moe_checkpoint(hf, layers, args.hidden, args.moe_ffn, experts, args.vocab, args.heads,
                                           args.kv_heads)
            gen_s = time.perf_counter() - t0
            from megatron_rasft.convert.pipeline import peak_rss_bytes

            gen_rss = peak_rss_bytes()
            for direction, src, dst in (("hf-to-mcore", hf, mc), ("mcore-to-hf", mc, back)):
                r = run(direction, src, dst)
                rows.append(dict(layers=layers, experts=experts or "-", direction=direction, **info, **r))
            shutil.rmtree(hf), shutil.rmtree(mc), shutil.rmtree(back)
            print(f"[{tag} layers×experts: {info['params'] / 1e9:.2f}B params, "
                  f"{info['model_bytes'] / 1e9:.2f} GB bf16, "
                  f"generated in {gen_s:.0f}s, generator peak RSS so far {gen_rss / 2**20:.0f} MiB]", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| layers | experts | params | direction | wall s | GB/s | peak RSS MiB | peak − import RSS MiB | "
          "÷ largest tensor | ÷ model size |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = r["peak_rss"] - r["base_rss"]
        print(f"| {r['layers']} | {r['experts']} | {r['params'] / 1e9:.2f}B | {r['direction']} | {r['seconds']:.1f} | "
              f"{r['bytes'] / r['seconds'] / 1e9:.2f} | {r['peak_rss'] / 2**20:.0f} | {extra / 2**20:.0f} | "
              f"{extra / r['largest_tensor_bytes']:.2f} | {extra / r['model_bytes']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
