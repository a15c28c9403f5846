"""`python -m megatron_rasft <command>` (or `rasft <command>`).

Each module in `megatron_rasft/commands/` is one sub-command: it defines `HELP` (one line),
`add_arguments(parser)` and `main(args) -> int`. Modules keep heavy imports inside `main`, so
`--help` stays fast and never loads vLLM or Transformer Engine.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from megatron_rasft import commands


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
    _quiet_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
