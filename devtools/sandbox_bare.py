"""The code-verification benchmark's baseline (benchmarks/bench_verify.py): one contained
interpreter runs a program as its main script, nothing checked."""
from __future__ import annotations

import subprocess
from typing import Optional

from megatron_rasft.verify.sandbox import SandboxConfig
from megatron_rasft.verify.sandbox.process import Run, checked_isolation, exit_reason


def run_bare(program: str, cfg: Optional[SandboxConfig] = None) -> dict:
    """Run `program` in the sandbox with `cfg`'s containment and limits -> {"returncode", "status"
    (None, or a verdict reason: timeout, crash, memory, output_limit, ...)}."""
    cfg = cfg or SandboxConfig()
    run = Run(cfg, checked_isolation(cfg))
    try:
        proc = run.spawn({}, "", harness_text=program, stdin=subprocess.DEVNULL)
        out = run.collect()
    finally:
        run.close()
    status = "output_limit" if out["over"] else exit_reason(proc, out["timed_out"])
    return {"returncode": proc.returncode, "status": status}
