"""Console progress of the real-model run: each stage announced with the run's ETA, and the lines
a stage prints that say how far it is (a training run's step lines, with their own ETA, and its
rounds) echoed to the console, tagged with the stage. Everything a stage prints still goes to its
log file.

The run's ETA is a plan, not a measurement: each stage has a reference duration, taken from the
measured 40-minute run with the defaults (docs/results.md, "Real model"), scaled by how many steps or
samples the stage is asked for (less a fixed start-up part); once stages have finished, the remaining reference time is scaled by
how much faster or slower than planned the finished ones ran.
"""
from __future__ import annotations

import time

# Minutes per stage in the measured run with the defaults (--warmup-steps 20 --arm-steps 6
# --eval-limit 24 --eval-n 2, held-out + GSM8K): prepare + problems + convert 1.1, warm-up 10.4,
# SFT arm 4.5, RASFT arm 12.5, 3 exports 0.9, 4 evaluations 10.7.
REFERENCE_MIN = {"prepare": 0.5, "dataset": 0.3, "convert": 0.3, "warmup": 10.4, "sft": 4.5, "rasft": 12.5,
                 "export": 0.3, "eval": 2.7}
# Seconds of a stage that do not scale with its steps or samples: a training run's start (model build,
# checkpoint load) and an evaluation's vLLM server start, on the 2-core box.
STARTUP_S = {"train": 40.0, "eval": 60.0}
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
        """Print stage `name`'s start line: its index, planned time, elapsed time and the run's ETA."""
        index = list(self.plan).index(name) + 1
        self._say(f"── stage {index}/{len(self.plan)} {name} (planned {fmt(self.plan[name])}) | "
                  f"elapsed {fmt(time.time() - self.t0)} | run ETA {fmt(self.eta_s())}")
        self._started = time.time()

    def finish(self, name: str, skipped: bool = False) -> None:
        """Record stage `name` as done (its actual seconds; 0 when `skipped`: its output was already
        there) and print its duration; later ETAs scale by the actual/planned ratio of the stages run."""
        if skipped:
            self.done[name] = (0.0, 0.0)
            self._say(f"   {name}: already done, skipped | run ETA {fmt(self.eta_s())}")
            return
        took = time.time() - self._started
        self.done[name] = (self.plan[name], took)
        self._say(f"   {name}: {took:.0f}s | elapsed {fmt(time.time() - self.t0)} | run ETA {fmt(self.eta_s())}")

    def line(self, name: str, text: str) -> None:
        """Echo one line of stage `name`'s log to the console when it is a progress line (step,
        round, evaluation: `ECHO_PREFIXES`), tagged with the stage."""
        if text.startswith(ECHO_PREFIXES):
            self.out(f"   [{name}] {text.rstrip()}", flush=True)


def plan(warmup_steps: int, arm_steps: int, eval_limit: int, eval_n: int, gsm8k: bool) -> dict:
    """Planned seconds of every stage of the real-model run, in the order it runs them: a fixed
    start-up part (`STARTUP_S`: the trainer's or the evaluation server's start) plus the rest of the
    reference time scaled by the steps or samples asked for."""
    evals = eval_limit * eval_n / 48 * (1.0 if gsm8k else 0.5)  # the reference: 24 problems x avg@2, 2 benchmarks

    def scaled(kind: str, ref_min: float, factor: float) -> float:
        fixed = STARTUP_S[kind]
        return fixed + (60.0 * ref_min - fixed) * factor

    m = {"prepare": 60.0 * REFERENCE_MIN["prepare"], "dataset": 60.0 * REFERENCE_MIN["dataset"],
         "convert": 60.0 * REFERENCE_MIN["convert"],
         "warmup": scaled("train", REFERENCE_MIN["warmup"], warmup_steps / 20),
         "sft": scaled("train", REFERENCE_MIN["sft"], arm_steps / 6),
         "rasft": scaled("train", REFERENCE_MIN["rasft"], arm_steps / 6),
         "eval base": scaled("eval", REFERENCE_MIN["eval"], evals)}
    for name in ("warm-up", "sft", "rasft"):
        m[f"export {name}"] = 60.0 * REFERENCE_MIN["export"]
        m[f"eval {name}"] = scaled("eval", REFERENCE_MIN["eval"], evals)
    return m
