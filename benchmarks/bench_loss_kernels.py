"""Time and memory of the loss kernels (forward + backward) against naive full-vocab versions.

    .venv/bin/python benchmarks/bench_loss_kernels.py [--tokens 256 1024] [--vocab 131072] [--repeats 5]

Compared in the same run, on the same inputs (fp32 logits `[N, V]`, one process, no TP):
  kl:    vocab_parallel_kl (ours)       vs  log_softmax both → Σ p_ref(log p_ref − log p_θ) → autograd
  loss:  compute_loss rasft (ours)      vs  compute_loss sft (ours)   (and F.cross_entropy for scale)

Memory is reported two ways, both honest about what they measure:
  peak   — peak memory during forward+backward above the level before it. On CUDA:
           torch.cuda.max_memory_allocated (reset before). On CPU: the kernel's peak resident set
           size (VmHWM, reset through /proc/self/clear_refs), which tracks tensors this large exactly
           because glibc serves allocations above 32 MiB with mmap and unmaps them on free. It
           includes the gradient `[N, V]` that both sides produce.
  saved  — bytes of new tensors held by autograd between forward and backward (inputs excluded),
           from saved_tensors_hooks; this is what decides memory when many micro-batches' graphs
           are alive at once (pipeline parallelism).
Times are the median of `--repeats` runs after one warm-up, the variants run round-robin.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_rasft.config import LossConfig
from megatron_rasft.loss import LossBatch, compute_loss, vocab_parallel_kl


def naive_kl(x_NV, y_NV):
    lp_NV = torch.log_softmax(x_NV, -1)
    lr_NV = torch.log_softmax(y_NV, -1)
    return (lr_NV.exp() * (lr_NV - lp_NV)).sum(-1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak bytes allocated inside the `with` block, above the level at its start."""

    def __init__(self, device):
        self.device = device

    def _rss(self, field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.start = self._rss("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = self._rss("VmHWM:") - self.start


def saved_bytes(fn, inputs):
    """Bytes of distinct new storages autograd saves for backward during `fn()`."""
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def measure(steps, leaf, inputs, repeats, device):
    """steps: name → (fn running forward and returning the scalar to backprop). Repeats run the
    steps round-robin, so slow drifts of a shared machine hit every step alike.
    Returns name → (median s, peak B, saved B)."""
    def once(step):
        leaf.grad = None
        step().backward()
        _sync(device)
        leaf.grad = None

    times = {name: [] for name in steps}
    for step in steps.values():
        once(step)  # warm-up
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            once(step)
            times[name].append(time.perf_counter() - t0)
    rows = {}
    for name, step in steps.items():
        with PeakMemory(device) as pm:
            once(step)
        rows[name] = (statistics.median(times[name]), pm.peak, saved_bytes(step, [leaf] + inputs))
    return rows


def bench(n_tokens, vocab, repeats, device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n_tokens, vocab, generator=g) * 2).to(device).requires_grad_()
    y = (x.detach() + torch.randn(n_tokens, vocab, generator=g).to(device))
    labels = torch.randint(0, vocab, (n_tokens,), generator=g).to(device)
    mask = torch.ones(1, n_tokens, device=device)
    with torch.no_grad():
        ref_logp = torch.log_softmax(y, -1).gather(-1, labels[:, None]).view(1, -1)

    def loss(method):
        cfg = LossConfig(method=method)
        batch = LossBatch(labels_BS=labels.view(1, -1), loss_mask_BS=mask, ref_logp_BS=ref_logp)
        return lambda: compute_loss(batch, x.view(1, n_tokens, vocab), cfg=cfg)[0]

    steps = {
        "kl ours": lambda: vocab_parallel_kl(x, y).sum(),
        "kl naive": lambda: naive_kl(x, y).sum(),
        "loss rasft": loss("rasft"),
        "loss sft": loss("sft"),
        "F.cross_entropy": lambda: F.cross_entropy(x, labels, reduction="sum"),
    }
    return measure(steps, x, [y, ref_logp], repeats, device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks in seconds that the script still runs (numbers meaningless)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(tokens=[16], vocab=512, repeats=1)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, vocab {args.vocab}, fp32, median of {args.repeats} (forward + backward)")
    mib = 2 ** 20
    for n in args.tokens:
        rows = bench(n, args.vocab, args.repeats, device)
        print(f"\nN = {n} tokens ([N, V] fp32 = {n * args.vocab * 4 / mib:.0f} MiB)")
        print(f"  {'':16s} {'fwd+bwd ms':>11s} {'peak MiB':>9s} {'saved KiB':>10s}")
        for key, (t, peak, saved) in rows.items():
            print(f"  {key:16s} {t * 1e3:11.1f} {peak / mib:9.0f} {saved / 1024:10.0f}")
        for a, b in (("kl ours", "kl naive"), ("loss rasft", "loss sft")):
            (ta, pa, sa), (tb, pb, sb) = rows[a], rows[b]
            print(f"  {a} / {b}: time {ta / tb:.2f}x, peak {pa / max(pb, 1):.2f}x, "
                  f"saved {sa / 1024:.0f} KiB vs {sb / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
