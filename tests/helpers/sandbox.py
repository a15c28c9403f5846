"""Calling a program's function inside the code sandbox with nothing checked: the containment tests
use it to run a probe contained and read back what it saw."""
from __future__ import annotations

from typing import Optional

from megatron_rasft.verify.plan import Pair
from megatron_rasft.verify.sandbox import SandboxConfig
from megatron_rasft.verify.sandbox.process import call_outputs, checked_isolation


def call_in_sandbox(program: str, fn: str, args_list: list, cfg: Optional[SandboxConfig] = None) -> dict:
    """Run `program` contained and call `fn` on each argument list -> {"outputs": [("ok", value) |
    ("exc", name) | None], "status": None or a reason, "log": bytes, "uid"}."""
    cfg = cfg or SandboxConfig()
    info = checked_isolation(cfg)
    return call_outputs(program, [Pair(fn, list(a), "eq") for a in args_list], cfg, info)
