"""Step and round logging: one console line, `metrics.jsonl`, TensorBoard / W&B when configured."""
from __future__ import annotations

import json
import math
import time
from typing import Optional

import torch

from megatron_rasft.rundir import RunDir

# Peak dense bf16 TFLOP/s per GPU by device name (for MFU); unknown devices report no MFU.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}


def peak_flops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tf in _PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·h·s for attention scores."""
    return 6 * num_params + 12 * num_layers * hidden * seq_len


class Logger:
    """Per-step metrics to RUN/metrics.jsonl (and optionally TensorBoard, W&B); `run` is the `RunDir`."""

    def __init__(self, run: RunDir, enabled: bool, *, tensorboard: bool = False,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None):
        self.enabled = enabled
        self.path = run.metrics
        self.tb = self.wandb = None
        self.t_start = time.time()
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.tensorboard))
            except ImportError:
                print("[log] tensorboard is not installed (pip install tensorboard); not logging to it")
        if wandb_project:
            import wandb  # configured explicitly: a missing package is an error, not a silent skip

            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(run.root))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time() - self.t_start, 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{record.get('kind', 'train')}/{k}": v for k, v in scalars.items()}, step=step)

    def step_line(self, m: dict, total: int, eta_s: float) -> None:
        if not self.enabled:
            return
        extra = ""
        if "clip_frac_low" in m:  # grpo: ρ = π_θ/π_old per token, clipped below / above
            extra += (f" ρ={m.get('ratio', 1):.3f} A={m.get('advantage', 0):+.3f}"
                      f" clip={m['clip_frac_low']:.2f}/{m['clip_frac_high']:.2f} H={m.get('entropy', 0):.3f}")
            if "logp_mismatch" in m:
                extra += f" |Δlogp|={m['logp_mismatch']:.2e}"
        elif "ratio" in m:
            extra += f" r={m['ratio']:.3f} clip={m.get('ratio_clip_frac', 0):.2f}"
        if "token_factor" in m:
            extra += f" φ={m['token_factor']:.3f}"
        if "kl" in m:
            extra += f" kl={m['kl']:.4f}"
        if "moe_aux" in m:  # MoE: load-balancing loss (1 = balanced), worst layer's max/mean expert load
            extra += f" aux={m['moe_aux']:.3f} imb={m['moe_load_imbalance']:.2f}"
            if m.get("moe_dropped"):
                extra += f" dropped={m['moe_dropped']}"
        mfu = f" mfu={m['mfu']:.1%}" if m.get("mfu") is not None else ""
        print(f"step {m['step']:>5}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
              f"gnorm {m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tok/s{mfu}{extra} | "
              f"ETA {_fmt(eta_s)}", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
