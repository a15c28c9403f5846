"""A study's protocol: one TOML file (committed before any main run) read into `Protocol`.

  [study]     name, seeds, arms (run in this order within a seed), primary (A, B), secondary [[A, B], ...],
              first_seed_only (cost arms: the first seed only, run last)
  [data]      tasks, train_per_task, test_per_task, seed, test_seed
  [warmup]    steps, seed, lr
  [arms]      steps, lr, global_batch, micro_batch, k, batches_per_round, max_tokens, save_interval
  [eval]      n, max_tokens, limit, temperature
  [analysis]  bootstrap, alpha, correction ("holm")

An unknown section or key, or a value of the wrong type, is refused naming the file and the key.
Arms: "warmup" (the shared start point, evaluated only), "sft" (step-matched), "sft_tokens" (plain SFT
for as many loss tokens as that seed's RASFT arm trained on), "rasft", "rasft_overlap" (RASFT with
overlapped rounds: a cost arm), "dft", "grpo".
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ARMS = ("warmup", "sft", "sft_tokens", "rasft", "rasft_overlap", "dft", "grpo")
METHOD = {"warmup": None, "sft": "sft", "sft_tokens": "sft", "rasft": "rasft", "rasft_overlap": "rasft",
          "dft": "dft", "grpo": "grpo"}


class ProtocolError(ValueError):
    """A protocol file that cannot be run, with the file and key named."""


@dataclass
class StudySection:
    name: str = "study"
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    arms: list = field(default_factory=lambda: ["warmup", "sft", "rasft", "sft_tokens"])
    primary: list = field(default_factory=lambda: ["rasft", "sft_tokens"])
    secondary: list = field(default_factory=lambda: [["rasft", "sft"]])
    # Cost-only arms: run for the first seed only, after every other unit (the budget goes to the
    # seeds of the compared arms first); in no comparison.
    first_seed_only: list = field(default_factory=list)

    def units(self) -> list:
        """[(seed, arm)] in run order: seed by seed, then the first-seed-only arms."""
        return ([(s, a) for s in self.seeds for a in self.arms if a not in self.first_seed_only] +
                [(self.seeds[0], a) for a in self.arms if a in self.first_seed_only])

    def keep_seeds(self, wanted: list) -> None:
        """Keep only the seeds in `wanted`, in the protocol's order (`study run --seeds`, e.g. a rerun of
        one seed). The first-seed-only (cost) arms belong to the protocol's first seed: they are dropped
        when it is not kept, not moved onto another seed. ValueError naming seeds the protocol lacks."""
        unknown = sorted(set(wanted) - set(self.seeds))
        if unknown:
            raise ValueError(f"--seeds {','.join(map(str, wanted))}: {unknown} not among the protocol's seeds "
                             f"{self.seeds}")
        if self.seeds[0] not in wanted:
            self.arms = [a for a in self.arms if a not in self.first_seed_only]
            self.first_seed_only = []
        self.seeds = [s for s in self.seeds if s in wanted]


@dataclass
class DataSection:
    tasks: list = field(default_factory=lambda: ["chain_sum", "leg_counting"])
    train_per_task: int = 200
    test_per_task: int = 100
    seed: int = 0  # reasoning-gym seed of the training problems
    test_seed: int = 2_000_000  # of the held-out problems (the pilot used 1_000_000)


@dataclass
class WarmupSection:
    steps: int = 20
    seed: int = 0
    lr: float = 5e-5  # `make demo-real`'s warm-up


@dataclass
class ArmsSection:
    steps: int = 24
    lr: float = 5e-5
    global_batch: int = 8
    micro_batch: int = 4
    k: int = 4
    batches_per_round: int = 2
    max_tokens: int = 128
    save_interval: int = 4  # a killed arm resumes from its last checkpoint


@dataclass
class EvalSection:
    n: int = 4
    max_tokens: int = 128
    limit: int = 200
    temperature: float = 1.0


@dataclass
class AnalysisSection:
    bootstrap: int = 10_000
    alpha: float = 0.05
    correction: str = "holm"


@dataclass
class Protocol:
    study: StudySection = field(default_factory=StudySection)
    data: DataSection = field(default_factory=DataSection)
    warmup: WarmupSection = field(default_factory=WarmupSection)
    arms: ArmsSection = field(default_factory=ArmsSection)
    eval: EvalSection = field(default_factory=EvalSection)
    analysis: AnalysisSection = field(default_factory=AnalysisSection)
    source: str = "<built-in>"

    def comparisons(self) -> list:
        """[(A, B, "primary" | "secondary")], the primary first."""
        return [(*self.study.primary, "primary")] + [(a, b, "secondary") for a, b in self.study.secondary]

    def to_dict(self) -> dict:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name != "source"}


def smoke() -> Protocol:
    """Tiny settings that run the whole pipeline (two arms, one seed) in minutes: for the test."""
    return Protocol(study=StudySection(name="smoke", seeds=[1], arms=["sft", "rasft"], primary=["rasft", "sft"],
                                       secondary=[]),
                    data=DataSection(train_per_task=8, test_per_task=3),
                    warmup=WarmupSection(steps=1),
                    arms=ArmsSection(steps=2, global_batch=4, micro_batch=4, k=2, batches_per_round=1,
                                     max_tokens=24, save_interval=2),  # final checkpoint only (disk)
                    eval=EvalSection(n=1, max_tokens=24, limit=4),
                    analysis=AnalysisSection(bootstrap=200))


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ProtocolError(f"{where}: {message}")


def validate(p: Protocol) -> Protocol:
    """Refuse a protocol that cannot run; returns `p`."""
    w = p.source
    for arm in p.study.arms:
        _check(arm in ARMS, f"{w}: study.arms", f"unknown arm {arm!r} (known: {', '.join(ARMS)})")
    _check(len(set(p.study.arms)) == len(p.study.arms), f"{w}: study.arms", "an arm is listed twice")
    if "sft_tokens" in p.study.arms:
        _check({"sft", "rasft"} <= set(p.study.arms) and
               p.study.arms.index("sft_tokens") > max(p.study.arms.index("sft"), p.study.arms.index("rasft")),
               f"{w}: study.arms", "sft_tokens needs sft and rasft listed before it (its steps come from their tokens)")
    _check(p.study.seeds and all(isinstance(s, int) for s in p.study.seeds) and len(set(p.study.seeds)) ==
           len(p.study.seeds), f"{w}: study.seeds", "a non-empty list of distinct integers")
    for arm in p.study.first_seed_only:
        _check(arm in p.study.arms, f"{w}: study.first_seed_only", f"{arm!r} is not in study.arms")
    pairs = [p.study.primary] + list(p.study.secondary)
    for pair in pairs:
        _check(isinstance(pair, list) and len(pair) == 2 and set(pair) <= set(p.study.arms) and pair[0] != pair[1],
               f"{w}: study.primary/secondary", f"{pair!r} is not a pair of two listed arms")
        _check(not set(pair) & set(p.study.first_seed_only), f"{w}: study.primary/secondary",
               f"{pair!r} compares a first-seed-only (cost) arm")
    from megatron_rasft.demo.real_model.problems import TASKS

    for t in p.data.tasks:
        _check(t in TASKS, f"{w}: data.tasks", f"unknown task {t!r} (known: {', '.join(sorted(TASKS))})")
    _check(p.data.test_seed >= p.data.seed + p.data.train_per_task, f"{w}: data.test_seed",
           "the held-out seed range overlaps the training one")
    _check(p.arms.global_batch % p.arms.micro_batch == 0, f"{w}: arms.global_batch",
           "must be a multiple of arms.micro_batch")
    for name in ("steps", "k", "batches_per_round", "max_tokens", "save_interval"):
        _check(getattr(p.arms, name) >= 1, f"{w}: arms.{name}", "must be >= 1")
    _check(p.warmup.steps >= 1 and p.eval.n >= 1 and p.eval.limit >= 1, f"{w}: warmup.steps / eval.n / eval.limit",
           "must be >= 1")
    _check(p.analysis.correction == "holm", f"{w}: analysis.correction", "only 'holm' is implemented")
    _check(0 < p.analysis.alpha < 1 and p.analysis.bootstrap >= 100, f"{w}: analysis",
           "alpha in (0, 1) and bootstrap >= 100")
    return p


def load(path: str | Path) -> Protocol:
    """The protocol in TOML file `path` (unset keys: the dataclasses' defaults). Raises ProtocolError
    naming the file and key (the type and key checks are `config.build_sections`', as for a run's
    config), FileNotFoundError."""
    from megatron_rasft.config import ConfigError, build_sections

    path = Path(path)
    try:
        sections = build_sections(Protocol, tomllib.loads(path.read_text()), skip=("source",))
    except tomllib.TOMLDecodeError as e:
        raise ProtocolError(f"{path}: not valid TOML ({e})") from None
    except ConfigError as e:
        raise ProtocolError(f"{path}: {e}") from None
    return validate(Protocol(**sections, source=str(path)))
