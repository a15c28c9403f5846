"""`python -m megatron_rasft <command>` (or `rasft <command>`).

Each module in `megatron_rasft/commands/` is one sub-command: it defines `HELP` (one line),
`add_arguments(parser)` and `main(args) -> int`. Modules keep heavy imports inside `main`, so
`--help` stays fast and never loads vLLM or Transformer Engine.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from megatron_rasft import commands
from megatron_rasft.config import ConfigError


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield info.name, importlib.import_module(f"megatron_rasft.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_rasft",
        description="Rollout-Adaptive Supervised Fine-Tuning (RASFT) on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _command_modules():
        p = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def _quiet_warnings() -> None:
    """Megatron-Core warns at import about optional fused kernels (Apex/TE) and deprecated torch
    collectives; none of it is actionable for a user of this CLI."""
    import warnings

    for module in (r"megatron\.", r"torch\.distributed", r"transformer_engine"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv=None) -> int:
    """Run one sub-command -> its exit code. A bad configuration (`config.ConfigError`, raised by
    any command that loads one) prints `error: <one line naming the file and the key>` on stderr
    and returns 2, as argparse does for a bad flag; under torchrun only rank 0 prints it (the
    other ranks read the same file and exit 2 silently)."""
    _quiet_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except ConfigError as e:
        if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
