"""Training throughput: our Megatron path vs a single-process Hugging Face loop with the released
code's loss, on the same tiny Llama, the same data and the same batches.

    .venv/bin/python benchmarks/bench_train_vs_hf.py [--rounds 3 --steps 4] [--layers 4 --hidden 256
        --ffn 688 --heads 4 --kv-heads 2 --vocab 16384 --seq 256 --global-batch 8 --micro-batch 2]

Set-up (once): a tiny tokenizer and a random `LlamaForCausalLM` (megatron_rasft.demo.toy), converted
with tools/convert_checkpoint.py; synthetic sequences of uneven length (a quarter to all of the context), prompts
masked, weights A_s in [0.2, 1].
  hf      the baseline: HF policy + frozen HF reference; per micro-batch (padded to its longest
          sequence, as a collator does) the reference forward, token CE, p = exp(−CE), sequence ratio
          clip(exp(clamp(mean logp_ref − mean logp_θ, −20, 20)), 0.4, 1.2), weight = ratio·A·p
          (detached), loss = Σ CE·w·mask / Σ mask; gradients accumulated over the micro-batches,
          clip 1.0, AdamW.
  ours    `build_model` + `load_mcore_into_model`, Megatron DDP, Megatron optimizer (Adam), the
          `rasft` loss through `forward_backward`, with fixed-shape rows padded to seq_length
          (`ours padded`) or sequences packed into rows (`ours packed`); the reference log-probs come from the forward-only pass
          (`engine.refpass.score`) that the trainer runs once per sequence: timed with each step too
          (`ours+ref`), which is the fair per-step comparison when every sequence is trained once.
Each side runs in its own process (Megatron-Core's CPU mode patches torch process-wide), the sides
alternate for --rounds rounds of 1 warm-up + --steps steps; reported: median step wall time and
process CPU time over all steps, loss tokens per CPU-second, and the speed ratios to hf
(> 1: ours is faster). On a shared box use `--threads 1` and read the CPU-time columns (wall time
moves with the other processes' load). `positions` = tokens the model processed (padding included):
hf pads each micro-batch to its longest sequence, ours pads every row to seq_length (Megatron's
pipeline schedule needs one shape) or packs. The first step's mean NLL of both sides is printed:
same weights and data give the same value (a check that the comparison is like for like).
Time split of a real RASFT round (rollout, weight refresh, reference pass, training) is not
measured here: the trainer logs it cumulatively in RUN/metrics.jsonl (time_rollout, time_refresh,
time_reference, time_train), see docs/launch.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# -- the baseline: the released code's loss in a plain HF loop ------------------------------------------
def hf_rasft_loss(policy, reference, tokens_BS, labels_BS, mask_BS, weight_B, ratio_min=0.4, ratio_max=1.2):
    """Σ CE·w·mask / Σ mask for one micro-batch; w = ratio · A · p_θ(label), detached."""
    logits_BSV = policy(input_ids=tokens_BS).logits.float()
    ce_BS = torch.nn.functional.cross_entropy(logits_BSV.transpose(1, 2), labels_BS, reduction="none")
    with torch.no_grad():
        ref_BSV = reference(input_ids=tokens_BS).logits.float()
        ref_logp_BS = torch.log_softmax(ref_BSV, -1).gather(-1, labels_BS[..., None]).squeeze(-1)
        n_B = mask_BS.sum(1).clamp_min(1)
        mean_new_B = (-ce_BS * mask_BS).sum(1) / n_B
        mean_ref_B = (ref_logp_BS * mask_BS).sum(1) / n_B
        ratio_B = torch.exp((mean_ref_B - mean_new_B).clamp(-20, 20)).clamp(ratio_min, ratio_max)
        w_BS = ratio_B[:, None] * weight_B[:, None] * torch.exp(-ce_BS)
    loss = (ce_BS * w_BS * mask_BS).sum() / mask_BS.sum().clamp_min(1)
    return loss, ce_BS.detach()


def hf_micro_batches(seqs, micro_batch: int, pad_id: int = 0):
    """Micro-batches of `micro_batch` sequences padded to their longest (right padding)."""
    out = []
    for i in range(0, len(seqs), micro_batch):
        chunk = seqs[i:i + micro_batch]
        s = max(len(q.tokens) - 1 for q in chunk)
        tokens = torch.full((len(chunk), s), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), s), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), s)
        for j, q in enumerate(chunk):
            n = len(q.tokens) - 1
            tokens[j, :n] = torch.tensor(q.tokens[:-1])
            labels[j, :n] = torch.tensor(q.tokens[1:])
            mask[j, q.prompt_len - 1:n] = 1.0  # label t+1 is a response token
        out.append((tokens, labels, mask, torch.tensor([q.weight for q in chunk])))
    return out


def worker_hf(d: Path, args) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    policy = LlamaForCausalLM.from_pretrained(d / "hf", dtype=torch.float32)
    reference = LlamaForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval().requires_grad_(False)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    seqs = _load_seqs(d)
    mbs = hf_micro_batches(seqs, args.micro_batch)
    times, cpu, first_nll = [], [], None
    for step in range(args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        nll_sum = tok = 0.0
        for tokens, labels, mask, w in mbs:
            loss, ce = hf_rasft_loss(policy, reference, tokens, labels, mask, w)
            (loss / len(mbs)).backward()
            nll_sum += float((ce * mask).sum())
            tok += float(mask.sum())
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            first_nll = nll_sum / tok
        else:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"times": times, "cpu": cpu, "first_nll": first_nll, "loss_tokens": tok,
            "processed_tokens": sum(t.numel() for t, *_ in mbs)}


# -- ours ---------------------------------------------------------------------------------------------
def worker_ours(d: Path, args, pack: bool) -> dict:
    from megatron_rasft.config import LossConfig, ParallelConfig
    from megatron_rasft.convert.mcore_io import load_mcore_into_model, read_model_config
    from megatron_rasft.loss import make_loss_func
    from megatron_rasft.parallel.groups import destroy_distributed, device, init_distributed
    from megatron_rasft.engine.refpass import score
    from megatron_rasft.engine.step import global_metrics, make_forward_step

    sys.path.insert(0, str(HERE))
    from bench_step import batches_of, build_policy, frozen_copy, train_step

    pgs = init_distributed(ParallelConfig(), seed=0)
    mcfg, _ = read_model_config(d / "mcore")
    mcfg.seq_length = args.seq
    chunks, optimizer, model = build_policy(mcfg, lr=1e-4)
    load_mcore_into_model([model], d / "mcore")
    reference = frozen_copy(mcfg, model)
    forward_step = make_forward_step(make_loss_func(LossConfig(method="rasft"), tp_group=pgs.tp), pgs,
                                     vocab_size=mcfg.vocab_size)
    seqs = _load_seqs(d)
    times, ref_times, cpu, ref_cpu, first_nll = [], [], [], [], None
    for step in range(args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        ref_logp = score([reference], seqs, pgs, micro_batch_size=args.micro_batch, seq_length=args.seq, pad_id=0,
                         vocab_size=mcfg.vocab_size)
        t1, c1 = time.perf_counter(), time.process_time()
        batches = batches_of(seqs, ref_logp, args.seq, args.micro_batch, pack, device())
        reports = train_step(chunks, optimizer, forward_step, batches, args.seq)
        t2, c2 = time.perf_counter(), time.process_time()
        if step == 0:
            first_nll = global_metrics(reports, pgs)["nll"]
        else:
            times.append(t2 - t1)
            ref_times.append(t2 - t0)
            cpu.append(c2 - c1)
            ref_cpu.append(c2 - c0)
    out = {"times": times, "times_with_ref": ref_times, "cpu": cpu, "cpu_with_ref": ref_cpu, "first_nll": first_nll,
           "loss_tokens": float(sum(b["loss_mask"].sum() for b in batches)),
           "processed_tokens": sum(b["tokens"].numel() for b in batches)}
    destroy_distributed()
    return out


# -- set-up and driver ----------------------------------------------------------------------------------
def _load_seqs(d: Path):
    from megatron_rasft.data.batching import Seq

    return [Seq(**r) for r in json.loads((d / "seqs.json").read_text())]


def setup(d: Path, args) -> None:
    from dataclasses import asdict

    from megatron_rasft.demo.toy import make_tiny_model, train_tokenizer

    sys.path.insert(0, str(HERE))
    from bench_step import synthetic_seqs

    tok = train_tokenizer(d / "tok")
    make_tiny_model(d / "hf", tok, hidden_size=args.hidden, intermediate_size=args.ffn,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads,
                    num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                    max_position_embeddings=max(512, args.seq), initializer_range=0.02)
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "hf-to-mcore", "--hf-dir",
                    str(d / "hf"), "--out", str(d / "mcore"), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    seqs = synthetic_seqs(args.global_batch, args.seq, args.vocab)
    (d / "seqs.json").write_text(json.dumps([asdict(s) for s in seqs]))


def run_worker(side: str, d: Path, args) -> dict:
    cmd = [sys.executable, "-W", "ignore", __file__, "--worker", side, "--dir", str(d)] + args.passthrough
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


from _shapes import SMOKE_MODEL, add_model_args  # noqa: E402 (same folder)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="alternations of the sides (each a fresh process)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round (after one warm-up step)")
    add_model_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per side (default: torch's)")
    p.add_argument("--worker", choices=("hf", "ours", "ours_packed"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE_MODEL, rounds=1, steps=1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        fn = {"hf": lambda: worker_hf(Path(args.dir), args),
              "ours": lambda: worker_ours(Path(args.dir), args, pack=False),
              "ours_packed": lambda: worker_ours(Path(args.dir), args, pack=True)}[args.worker]
        print(json.dumps(fn()))
        return
    args.passthrough = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                        ("steps", "layers", "hidden", "ffn", "heads", "kv-heads", "vocab", "seq",
                         "global-batch", "micro-batch")] + ([f"--threads={args.threads}"] if args.threads else [])
    sides = ("hf", "ours", "ours_packed")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        setup(d, args)
        results = {s: [] for s in sides}
        for _ in range(args.rounds):
            for s in sides:
                results[s].append(run_worker(s, d, args))
    print(f"tiny Llama: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}/"
          f"{args.kv_heads}, vocab {args.vocab}; global batch {args.global_batch} × ≤{args.seq} tokens, "
          f"micro-batch {args.micro_batch}; fp32, cpu {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds × {args.steps} steps per side")
    rows = {}
    names = {"hf": "hf (policy+ref fwd)", "ours": "ours padded", "ours_packed": "ours packed"}
    for s in sides:
        r0 = results[s][0]
        for key, ckey, suffix in (("times", "cpu", " step" if s != "hf" else ""),
                                  ("times_with_ref", "cpu_with_ref", " +ref pass")):
            if key in r0:
                ts = [t for r in results[s] for t in r[key]]
                cs = [t for r in results[s] for t in r[ckey]]
                rows[names[s] + suffix] = (statistics.median(ts), min(ts), max(ts), statistics.median(cs),
                                           r0["loss_tokens"], r0["processed_tokens"])
        print(f"  first-step mean NLL {s:12s} {r0['first_nll']:.6f}")
    base_t, base_c = rows["hf (policy+ref fwd)"][0], rows["hf (policy+ref fwd)"][3]
    print(f"  {'':24s} {'wall s':>7s} {'min..max s':>15s} {'×hf speed':>9s} {'cpu s':>7s} {'×hf speed':>9s} "
          f"{'loss tok/cpu-s':>14s} {'positions':>9s}")
    for name, (t, lo, hi, c, lt, pt) in rows.items():
        print(f"  {name:24s} {t:7.3f} {lo:7.3f}..{hi:6.3f} {base_t / t:9.2f} {c:7.3f} {base_c / c:9.2f} "
              f"{lt / c:14.0f} {pt:9d}")

if __name__ == "__main__":
    main()
