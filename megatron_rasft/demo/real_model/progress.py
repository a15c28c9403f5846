"""Console progress of the real-model run: each stage announced with the run's ETA, and the lines
a stage prints that say how far it is (a training run's step lines, with their own ETA, and its
rounds) echoed to the console, tagged with the stage. Everything a stage prints still goes to its
log file.

The run's ETA is a plan, not a measurement: each stage has a reference duration, taken from the
measured 40-minute run with the defaults (docs/results.md, "Real model"), scaled by how many steps or
samples the stage is asked for; once stages have finished, the remaining reference time is scaled by
how much faster or slower than planned the finished ones ran.
"""
from __future__ import annotations

import time

# Minutes per stage in the measured run with the defaults (--warmup-steps 20 --arm-steps 6
# --eval-limit 24 --eval-n 2, held-out + GSM8K): prepare + problems + convert 1.1, warm-up 10.4,
# SFT arm 4.5, RASFT arm 12.5, 3 exports 0.9, 4 evaluations 10.7.
REFERENCE_MIN = {"prepare": 0.5, "dataset": 0.3, "convert": 0.3, "warmup": 10.4, "sft": 4.5, "rasft": 12.5,
                 "export": 0.3, "eval": 2.7}
# What a stage's console shows besides its start and end: the trainer's step, round and resume lines.
ECHO_PREFIXES = ("step", "[round", "[resume", "done", "error", "[data", "Traceback")


def fmt(seconds: float) -> str:
    """H:MM:SS of a non-negative duration."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The plan of a run (stage name -> planned seconds, in order) and its console.

    `start(name)` / `finish(name, skipped)` bracket each stage; `line(name, text)` is called with
    every line a stage prints and echoes the ones in `ECHO_PREFIXES`."""

    def __init__(self, plan: dict, tag: str = "demo-real", out=print):
        self.plan, self.tag, self.out = dict(plan), tag, out
        self.done: dict = {}  # name -> (planned s, actual s) of the stages that ran
        self.t0 = time.time()

    def _say(self, msg: str) -> None:
        self.out(f"[{self.tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def eta_s(self) -> float:
        """Seconds left: the planned time of the stages not finished, times the actual/planned
        ratio of the stages that ran (1 before any has)."""
        planned = sum(p for p, _ in self.done.values())
        speed = sum(a for _, a in self.done.values()) / planned if planned > 0 else 1.0
        return speed * sum(s for name, s in self.plan.items() if name not in self.done)

    def start(self, name: str) -> None:
        index = list(self.plan).index(name) + 1
        self._say(f"── stage {index}/{len(self.plan)} {name} (planned {fmt(self.plan[name])}) | "
                  f"elapsed {fmt(time.time() - self.t0)} | run ETA {fmt(self.eta_s())}")
        self._started = time.time()

    def finish(self, name: str, skipped: bool = False) -> None:
        if skipped:
            self.done[name] = (0.0, 0.0)
            self._say(f"   {name}: already done, skipped | run ETA {fmt(self.eta_s())}")
            return
        took = time.time() - self._started
        self.done[name] = (self.plan[name], took)
        self._say(f"   {name}: {took:.0f}s | elapsed {fmt(time.time() - self.t0)} | run ETA {fmt(self.eta_s())}")

    def line(self, name: str, text: str) -> None:
        if text.startswith(ECHO_PREFIXES):
            self.out(f"   [{name}] {text.rstrip()}", flush=True)


def plan(warmup_steps: int, arm_steps: int, eval_limit: int, eval_n: int, gsm8k: bool) -> dict:
    """Planned seconds of every stage of the real-model run, in the order it runs them."""
    evals = eval_limit * eval_n / 48 * (1.0 if gsm8k else 0.5)  # the reference: 24 problems x avg@2, 2 benchmarks
    m = {"prepare": REFERENCE_MIN["prepare"], "dataset": REFERENCE_MIN["dataset"],
         "convert": REFERENCE_MIN["convert"], "warmup": REFERENCE_MIN["warmup"] * warmup_steps / 20,
         "sft": REFERENCE_MIN["sft"] * arm_steps / 6, "rasft": REFERENCE_MIN["rasft"] * arm_steps / 6,
         "eval base": REFERENCE_MIN["eval"] * evals}
    for name in ("warm-up", "sft", "rasft"):
        m[f"export {name}"] = REFERENCE_MIN["export"]
        m[f"eval {name}"] = REFERENCE_MIN["eval"] * evals
    return {k: 60.0 * v for k, v in m.items()}
