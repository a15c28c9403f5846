"""`python -m megatron_rasft study run`: the protocol's arms × seeds, one unit at a time.

  OUT/models/, OUT/data/            the prepared model, its Megatron conversion, the problems (once)
  OUT/warmup/, OUT/hf/warmup/       the shared SFT warm-up, the start point of every arm, and its export
  OUT/seed_S/ARM/                   one arm's training run (`train --resume`: a killed one continues
                                    from its last checkpoint, saved every arms.save_interval steps)
  OUT/eval/seed_S/ARM/              its evaluation (resumable); evaluated_export.json names the export's
                                    SHA-256, and a folder of another export is evaluated again, not reused
  RESULTS/seed_S/ARM.json           the unit's evaluation summary (tracked); its presence means "done"

A unit is train → export → evaluate → summary; when the summary is written the arm's checkpoints and
export are deleted (disk: ~2 GB each), unless --keep-checkpoints. With --budget-hours H no unit starts
once H hours have passed, and a training stage that is running then is stopped right after its next
checkpoint (it resumes from it on the next call).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from megatron_rasft.demo.real_model.progress import Progress
from megatron_rasft.demo.study import plan as plan_mod
from megatron_rasft.demo.study.protocol import METHOD, Protocol
from megatron_rasft.demo.study.stages import log_tail, run_stage
from megatron_rasft.demo.study.summary import build_summary, read_summary, token_matched_steps

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "examples" / "smollm2_cpu.toml"


class BudgetSpent(Exception):
    """The time budget ran out: the study stopped between units or at a checkpoint. `usage`: the
    stopped stage's measured usage (`stages.run_stage`), None between units."""

    def __init__(self, message: str, usage: dict | None = None):
        super().__init__(message)
        self.usage = usage


class Study:
    """The state of one `study run`: `out` (work, ignored by git), `results` (the per-unit summaries)."""

    def __init__(self, protocol: Protocol, out: Path, results: Path, *, budget_hours: float | None = None,
                 keep_checkpoints: bool = False, log=print):
        self.p, self.out, self.results = protocol, Path(out).resolve(), Path(results).resolve()
        self.keep, self.log = keep_checkpoints, log
        self.deadline = time.time() + 3600 * budget_hours if budget_hours else None
        self.hf = self.out / "models" / "smollm2-135m-instruct"
        self.mcore = self.out / "models" / "smollm2-135m-instruct-mcore"
        self.data = self.out / "data"
        self.stages_run = 0  # stages actually run (not skipped): a skipped shared part must not skew the ETA

    # -- budget -------------------------------------------------------------------------------------
    def over_budget(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def _stage(self, args: list, name: str, *, ckpt_root: Path | None = None) -> dict:
        """Run one stage; raise RuntimeError with its log's tail when it fails, BudgetSpent when it was
        stopped at a checkpoint because the budget ran out."""
        from megatron_rasft.engine.checkpoint import latest

        log = self.out / "logs" / f"{name.replace('/', '_').replace(' ', '_')}.log"
        stop_when = None
        if ckpt_root is not None and self.deadline is not None:
            at_start = latest(ckpt_root)

            def at_new_checkpoint():  # only once a checkpoint newer than the one it started from exists
                return self.over_budget() and latest(ckpt_root) not in (None, at_start)
            stop_when = at_new_checkpoint
        self.stages_run += 1
        usage = run_stage(args, log, tag=name, stop_when=stop_when, out=self.log)
        if usage["stopped"]:
            raise BudgetSpent(f"budget spent: {name} stopped at checkpoint {latest(ckpt_root)}; rerun to resume",
                              usage)
        if usage["exit"] != 0:
            raise RuntimeError(f"{name} failed (exit {usage['exit']}); log {log}:\n{log_tail(log)}")
        return usage

    # -- shared stages -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Model (GGUF → HF), problems, HF → Megatron: each skipped when its output exists."""
        d = self.p.data
        if not (self.hf / "prepared.json").is_file():
            self._stage([ROOT / "tools" / "prepare_model.py", "smollm2", "--out", self.hf], "prepare")
        if not (self.data / "meta.json").is_file():
            mix = lambda n: ",".join(f"{t}:{n}" for t in d.tasks)  # noqa: E731
            self._stage([ROOT / "tools" / "make_dataset.py", "--out", self.data, "--train", mix(d.train_per_task),
                         "--test", mix(d.test_per_task), "--seed", d.seed, "--test-seed", d.test_seed], "dataset")
        if not (self.mcore / "model_config.json").is_file() and not self._warmup_done():
            self._stage([ROOT / "tools" / "convert_checkpoint.py", "hf-to-mcore", "--hf-dir", self.hf, "--out",
                         self.mcore, "--quiet", "--force"], "convert")

    def train_sets(self, run_dir: Path, load: Path, method: str, steps: int, seed: int, *, rounds: bool,
                   overlap: bool = False, lr: float | None = None, save_interval: int = 0) -> list:
        """The `--set` overrides of one training run on top of examples/smollm2_cpu.toml."""
        a = self.p.arms
        return [f"train.run_dir={run_dir}", f"train.data.path={self.data / 'train.jsonl'}",
                f"train.data.tokenizer={self.hf}", f"train.schedule.global_batch_size={a.global_batch}",
                f"train.schedule.micro_batch_size={a.micro_batch}", f"train.optim.lr={lr if lr else a.lr}",
                f"rollout.sampling.n={a.k}", f"rollout.sampling.max_tokens={a.max_tokens}",
                f"rollout.sampling.seed={seed}", f"checkpoint.load={load}", f"loss.method={method}",
                f"rollout.batches_per_round={a.batches_per_round if rounds else 0}",
                f"rollout.overlap={'true' if overlap else 'false'}",
                f"train.schedule.train_iters={steps}", f"train.seed={seed}",
                f"checkpoint.save_interval={save_interval}", "checkpoint.keep_last=1"]

    def _train(self, run_dir: Path, sets: list, name: str) -> Path:
        """Train (or continue) the run in `run_dir` to its last step; returns its final model folder.
        Each invocation's usage is appended to RUN/study_usage.json ["train"]."""
        from megatron_rasft.engine.checkpoint import latest

        steps = int(next(s for s in sets if s.startswith("train.schedule.train_iters=")).split("=")[1])
        done = latest(run_dir / "ckpt")
        if done is None or json.loads((done / "state.json").read_text())["step"] < steps:
            args = ["-m", "megatron_rasft", "train", "--config", CONFIG, "--resume"]
            for s in sets:
                args += ["--set", s]
            try:
                usage = self._stage(args, name, ckpt_root=run_dir / "ckpt")
            except BudgetSpent as e:
                # Its time counts: the unit's training wall and CPU-seconds are those of every invocation.
                self._usage(run_dir, "train", {**(e.usage or {}), "stopped_at_budget": True}, append=True)
                raise
            self._usage(run_dir, "train", usage, append=True)
        return latest(run_dir / "ckpt") / "model"

    @staticmethod
    def _usage(run_dir: Path, key: str | None = None, value=None, append: bool = False) -> dict:
        """RUN/study_usage.json ({"train": [usage per invocation], "export": usage, "eval": usage}):
        read it, and record `value` under `key` first when given (so a resumed unit keeps the usage
        of the stages an earlier call ran)."""
        path = run_dir / "study_usage.json"
        table = json.loads(path.read_text()) if path.is_file() else {"train": []}
        if value is not None:
            if append:
                table[key].append(value)
            else:
                table[key] = value
            run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(table, indent=1) + "\n")
        return table

    def _warmup_done(self) -> bool:
        from megatron_rasft.engine.checkpoint import latest

        last = latest(self.out / "warmup" / "ckpt")
        return last is not None and json.loads((last / "state.json").read_text())["step"] >= self.p.warmup.steps

    def warmup(self) -> Path:
        """The shared SFT warm-up's final model folder (trained once). Once it is done, what only it
        needed goes (unless --keep-checkpoints): its optimizer state (1.6 GB: the arms load the model
        folder only) and the base model's Megatron conversion (0.5 GB)."""
        run = self.out / "warmup"
        sets = self.train_sets(run, self.mcore, "sft", self.p.warmup.steps, self.p.warmup.seed, rounds=False,
                               lr=self.p.warmup.lr)
        model = self._train(run, sets, "warmup")
        if not self.keep:
            shutil.rmtree(model.parent / "optim", ignore_errors=True)
            shutil.rmtree(self.mcore, ignore_errors=True)
        return model

    def export(self, mcore_model: Path, dest: Path) -> dict:
        if (dest / "config.json").is_file():
            return {}
        return self._stage([ROOT / "tools" / "convert_checkpoint.py", "mcore-to-hf", "--mcore-dir", mcore_model,
                            "--out", dest, "--hf-config-from", self.hf, "--quiet", "--force"], f"export {dest.name}")

    def evaluate(self, hf_model: Path, dest: Path, seed: int, name: str) -> dict:
        """avg@n on the first eval.limit held-out problems; the per-problem sampling seeds depend on the
        study seed only, so every arm of a seed is evaluated on the same draws (paired)."""
        e = self.p.eval
        digest = export_digest(hf_model)
        mark = dest / "evaluated_export.json"
        seen = json.loads(mark.read_text())["sha256"] if mark.is_file() else None
        if dest.exists() and seen != digest:
            # A unit whose training was redone (its summary deleted, the code changed) must not pair its
            # new model with the old model's samples: the eval command would resume from those.
            self.log(f"[study] {name}: {dest} holds the evaluation of another export "
                     f"({(seen or 'unrecorded')[:12]} ≠ {digest[:12]}); evaluating again", flush=True)
            shutil.rmtree(dest)
        if (dest / "results.json").is_file():
            return {}
        dest.mkdir(parents=True, exist_ok=True)
        mark.write_text(json.dumps({"model": str(hf_model), "sha256": digest}) + "\n")
        return self._stage(["-m", "megatron_rasft", "eval", "--model", hf_model,
                            "--set", f"eval.benchmarks=heldout={self.data / 'test.jsonl'}", "--limit", e.limit,
                            "--set", f"eval.sampling.n={e.n}", "--set", f"eval.sampling.temperature={e.temperature}",
                            "--set", f"eval.sampling.max_tokens={e.max_tokens}",
                            "--set", f"eval.sampling.seed={10_000 + seed}", "--set", "eval.prompt_template=chat",
                            "--max-model-len", "1024", "--kv-cache-gib", "1", "--out", dest, "--no-progress"],
                           f"eval {name}")

    # -- one unit -----------------------------------------------------------------------------------
    def unit(self, seed: int, arm: str, warm: Path) -> dict:
        """Train, export and evaluate ARM for SEED; write RESULTS/seed_S/ARM.json; returns the summary.

        Once the export exists the checkpoints are deleted (unless --keep-checkpoints) and a rerun
        goes straight to the evaluation (which resumes where it stopped)."""
        dest = self.results / f"seed_{seed}" / f"{arm}.json"
        name, method = f"seed_{seed}/{arm}", METHOD[arm]
        run = self.out / f"seed_{seed}" / arm
        steps = 0
        if method is None:  # the warm-up itself, evaluated with this seed's draws
            hf_out = self.out / "hf" / "warmup"
            self.export(warm, hf_out)
        else:
            steps = self.p.arms.steps
            if arm == "sft_tokens":
                steps = token_matched_steps(read_summary(self.results / f"seed_{seed}" / "sft.json"),
                                            read_summary(self.results / f"seed_{seed}" / "rasft.json"), steps)
            hf_out = self.out / "hf" / f"seed_{seed}_{arm}"
            if not (hf_out / "config.json").is_file():
                sets = self.train_sets(run, warm, method, steps, seed, rounds=method in ("rasft", "grpo"),
                                       overlap=arm == "rasft_overlap", save_interval=self.p.arms.save_interval)
                model = self._train(run, sets, f"{name} train")
                self._usage(run, "export", self.export(model, hf_out))
                if not self.keep:
                    shutil.rmtree(run / "ckpt", ignore_errors=True)
        ev_dir = self.out / "eval" / f"seed_{seed}" / arm
        ev = self.evaluate(hf_out, ev_dir, seed, name)
        if method is not None and ev:
            self._usage(run, "eval", ev)
        usage = self._usage(run) if method is not None else {"train": [], "eval": ev}
        summary = build_summary(self.p, seed, arm, steps, run if method else None, ev_dir,
                                [u for u in usage["train"] if "wall_s" in u], usage.get("export", {}),
                                usage.get("eval", {}), commit=_commit(), test_file=self.data / "test.jsonl")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(summary, indent=1) + "\n")
        if not self.keep and method is not None:
            shutil.rmtree(hf_out, ignore_errors=True)
        return summary

    def run(self) -> int:
        """Every unit not yet done, in protocol order (seed by seed); 0 when all are done, 3 when the
        budget stopped it (rerun the same command to continue)."""
        units = self.p.study.units()
        progress = Progress(plan_mod.plan(self.p, units), tag="study", out=self.log)
        try:
            progress.start("shared")
            self.prepare()
            warm = self.warmup()
            progress.finish("shared", skipped=self.stages_run == 0)
            for seed, arm in units:
                name = f"seed_{seed}/{arm}"
                if (self.results / f"seed_{seed}" / f"{arm}.json").is_file():
                    progress.finish(name, skipped=True)
                    continue
                if self.over_budget():
                    raise BudgetSpent(f"budget spent before {name}")
                progress.start(name)
                self.unit(seed, arm, warm)
                progress.finish(name)
        except BudgetSpent as e:
            self.log(f"[study] {e}; rerun the same command to continue", flush=True)
            return 3
        return 0


def export_digest(hf_model: Path) -> str:
    """SHA-256 over an HF export folder's files (names and bytes, in name order): which model an
    evaluation folder holds samples of. ~1 s per GB.

    Raises FileNotFoundError when the folder is missing."""
    import hashlib

    if not Path(hf_model).is_dir():
        raise FileNotFoundError(f"export {hf_model} does not exist")
    h = hashlib.sha256()
    for f in sorted(f for f in Path(hf_model).rglob("*") if f.is_file()):
        h.update(str(f.relative_to(hf_model)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
