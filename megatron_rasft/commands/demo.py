"""The whole RASFT loop on this machine, in minutes, with no downloads:

  synthetic addition task → tokenizer trained on it → tiny Llama → Megatron → SFT warm-up →
  SFT, RASFT and GRPO arms from the same checkpoint (RASFT and GRPO: rollouts through a real vLLM
  CPU server, math-verify; RASFT's solvability weights and reference ratio, GRPO's group-relative
  advantages and clipped surrogate) → held-out avg@n per saved step → report.md.

  python -m megatron_rasft demo            # ~10 minutes on 2 cores
  python -m megatron_rasft demo --quick    # ~3 minutes (what the test suite runs)
"""
HELP = "run the embedded CPU demo: SFT vs RASFT vs GRPO on a synthetic task, end to end"


def add_arguments(p):
    from megatron_rasft.demo.run import DemoConfig

    p.add_argument("--quick", action="store_true", help="smaller sizes (≈3 minutes)")
    defaults = DemoConfig()
    for name, value in vars(defaults).items():
        if name == "times":
            continue
        kind = _bool if isinstance(value, bool) else type(value)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=f"(default {value}; --quick changes some sizes)")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def main(args) -> int:
    from megatron_rasft.demo.run import DemoConfig, run_demo

    given = {k: v for k, v in vars(args).items() if k in DemoConfig.__dataclass_fields__ and v is not None}
    dc = DemoConfig.quick(**given) if args.quick else DemoConfig(**given)
    run_demo(dc)
    return 0
