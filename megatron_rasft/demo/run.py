"""The embedded demo, stage by stage (each stage's output lands in the run directory):

  task → tokenizer → tiny Llama (HF) → Megatron checkpoint → SFT warm-up → arms from the same
  checkpoint (plain SFT; RASFT and GRPO with rollout rounds through the vLLM server; plain SFT for
  as many loss tokens as RASFT) → evaluation of every saved checkpoint of every arm on the held-out
  split (avg@n through the same server) → report.

Training runs as `python -m megatron_rasft train` subprocesses (exactly what a user runs); one vLLM
server serves the rollouts of the RASFT and GRPO arms and every evaluation (weights refreshed in
place). RASFT and GRPO take the same optimizer steps, learning rate and rollout budget per round
(K rollouts of `batches_per_round × arm_global_batch` problems, `max_tokens` each). The two arms
that need no server run beside others (the SFT arm while the server starts, the token-matched arm
beside GRPO): every number is the same as one after the other, the wall time shorter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path



@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seed: int = 0
    train_problems: int = 4000
    test_problems: int = 200
    min_digits: int = 1
    max_digits: int = 5
    hidden: int = 128
    layers: int = 4
    vocab: int = 128
    seq_length: int = 96
    warmup_steps: int = 250
    arm_steps: int = 40
    eval_every: int = 10
    global_batch: int = 64
    arm_global_batch: int = 32  # smaller for the arms: RASFT samples K rollouts per problem
    micro_batch: int = 16
    lr: float = 3e-3
    arm_lr: float = 3e-4  # where the warm-up's cosine schedule ended (lr / 10)
    samples: int = 4  # K rollouts per problem
    batches_per_round: int = 5  # rollout.batches_per_round of the RASFT and GRPO arms
    eval_n: int = 4
    eval_temperature: float = 1.0
    max_tokens: int = 64
    token_matched: bool = True  # also run plain SFT for as many loss tokens as RASFT trained on
    grpo: bool = True  # the RL baseline arm: GRPO (loss.method = "grpo", its defaults) from the same checkpoint
    times: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        # Shorter problems (1-3 digits) so that a short warm-up already solves some of them.
        base = dict(train_problems=1500, test_problems=60, max_digits=3, layers=2, warmup_steps=150,
                    arm_steps=12, eval_every=6, global_batch=32, micro_batch=16, batches_per_round=3,
                    eval_n=2, samples=4)
        return cls(**{**base, **kw})


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _stage(name: str, dc: DemoConfig):
    class _Timer:
        def __enter__(self):
            _log(f"── {name}")
            self.t0 = time.time()

        def __exit__(self, *exc):
            dc.times[name] = round(time.time() - self.t0, 1)
            if exc[0] is None:
                _log(f"   {name}: {dc.times[name]:.1f}s")

    return _Timer()


def _tomli_w():
    """tomli_w, which only the demo needs (the run configs it writes; reading is the stdlib's
    tomllib): an optional dependency, the `demo` extra."""
    try:
        import tomli_w
    except ImportError:
        raise SystemExit("the demo writes its run configs with tomli-w: pip install 'megatron_rasft[demo]' "
                         "(or pip install tomli-w)") from None
    return tomli_w


def merge_tables(dst: dict, src: dict) -> None:
    """Merge the nested dict `src` into `dst` in place: tables (dicts) key by key, any other value
    replaces. Used for run configs built as nested dicts (here and in the tests' `helpers.runs.loop_config`)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge_tables(dst[k], v)
        else:
            dst[k] = v


def _train(config: Path, log: Path, tag: str) -> None:
    """Run one training phase as its own process, streaming its console to ours (each line tagged
    with the phase: two arms may print at once) and to `log`."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_rasft", "train", "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("step", "[round", "[resume", "done", "error", "[data")):
                print(f"   [{tag}] " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"training failed (exit {proc.returncode}); see {log}")


def run_demo(dc: DemoConfig) -> Path:
    from megatron_rasft.config import ServerConfig
    from megatron_rasft.convert.pipeline import hf_to_mcore, mcore_to_hf
    from megatron_rasft.demo import evaluate, report
    from megatron_rasft.demo.task import make_problems, write_jsonl
    from megatron_rasft.rollout.server import RolloutServer
    from megatron_rasft.rundir import RunDir
    from megatron_rasft.engine import checkpoint
    from megatron_rasft.demo.toy import make_tiny_model, train_tokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the model save's own bar; our stages report progress
    out = Path(dc.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps({k: v for k, v in vars(dc).items() if k != "times"}, indent=1))
    t_start = time.time()

    with _stage("task", dc):
        train = make_problems(dc.train_problems, dc.seed, dc.min_digits, dc.max_digits, prefix="t")
        test = make_problems(dc.test_problems, dc.seed + 10_000, dc.min_digits, dc.max_digits, prefix="h")
        write_jsonl(train, out / "data" / "train.jsonl")
        write_jsonl(test, out / "data" / "test.jsonl")
        _log(f"   {len(train)} train / {len(test)} held-out problems, {dc.min_digits}-{dc.max_digits} digits")
    with _stage("tokenizer", dc):
        texts = [p["prompt"] + p["response"] for p in train]
        tok_dir = train_tokenizer(out / "tokenizer", texts, vocab_size=dc.vocab)
    with _stage("model", dc):
        hf0 = make_tiny_model(out / "hf" / "init", tok_dir, seed=dc.seed, hidden_size=dc.hidden,
                              intermediate_size=dc.hidden * 2, num_hidden_layers=dc.layers,
                              initializer_range=0.02, max_position_embeddings=256)
        mcore0 = out / "mcore" / "init"
        if not (mcore0 / "model_config.json").is_file():
            hf_to_mcore(hf0, mcore0, quiet=True, force=True)

    common = {
        "model": {"seq_length": dc.seq_length},
        "rollout": {"server": {"kv_cache_gib": 0.5, "max_model_len": 256},
                    "sampling": {"n": dc.samples, "temperature": 1.0, "top_p": 1.0, "max_tokens": dc.max_tokens,
                                 "seed": dc.seed}},
        "train": {"seed": dc.seed,
                  "data": {"path": str(out / "data" / "train.jsonl"), "tokenizer": str(tok_dir),
                           "prompt_template": "plain", "pack": True},
                  "schedule": {"global_batch_size": dc.global_batch, "micro_batch_size": dc.micro_batch},
                  "logging": {"log_interval": 10}},
    }

    def phase(name, method, steps, load, lr, extra=None):
        cfg = json.loads(json.dumps(common))
        cfg["loss"] = {"method": method}
        cfg["train"]["run_dir"] = str(out / name)
        cfg["train"]["optim"] = {"lr": lr, "min_lr": lr / 10, "lr_warmup_iters": min(10, steps // 5)}
        cfg["train"]["schedule"].update(
            train_iters=steps, global_batch_size=dc.global_batch if name == "warmup" else dc.arm_global_batch)
        cfg["checkpoint"] = {"load": str(load), "save_interval": dc.eval_every if name != "warmup" else 0,
                             "keep_last": 100}
        merge_tables(cfg, extra or {})
        path = out / f"{name}.toml"
        path.write_text(_tomli_w().dumps(cfg))
        _train(path, out / f"{name}.log", name)
        return out / name

    with _stage("warm-up SFT", dc):
        warm = phase("warmup", "sft", dc.warmup_steps, mcore0, dc.lr)
    warm_ckpt = checkpoint.latest(RunDir(warm).ckpt) / "model"

    def timed(name, fn):
        with _stage(name, dc):
            return fn()

    # Two arms need no rollout server and run beside work that leaves the cores idle much of the
    # time: the SFT arm while the server starts, the token-matched arm beside the GRPO arm (which
    # waits on its rounds). Each arm is its own process with its own seed and thread count, so
    # running them side by side changes no number, only the wall time (the stage times overlap).
    server = None
    side = ThreadPoolExecutor(max_workers=1)
    try:
        sft_job = side.submit(timed, "arm: SFT", lambda: phase("sft", "sft", dc.arm_steps, warm_ckpt, dc.arm_lr))
        # The server is started on this thread: it is bound to the life of the thread that starts it.
        with _stage("rollout server", dc):
            hf_warm = out / "hf" / "warmup"
            if not (hf_warm / "config.json").is_file():
                mcore_to_hf(warm_ckpt, hf_warm, hf_config_from=hf0, quiet=True, force=True)
            sc = ServerConfig(kv_cache_gib=0.5, max_model_len=256, concurrency=8)
            server = RolloutServer(hf_warm, sc, log_file=out / "logs" / "vllm.log").start()
            _log(f"   vLLM (CPU) serving at {server.url}")
        sft = sft_job.result()
        with _stage("arm: RASFT", dc):
            rasft = phase("rasft", "rasft", dc.arm_steps, warm_ckpt, dc.arm_lr,
                          {"rollout": {"server": {"url": server.url}, "batches_per_round": dc.batches_per_round}})
        arms = {"SFT": sft, "RASFT": rasft}
        tokens_job = None
        if dc.token_matched:
            # RASFT's steps also carry correct rollouts: a control arm of plain SFT run for as many
            # loss tokens as RASFT trained on (its learning-rate schedule stretched to match).
            ratio = report.tokens_trained(rasft) / max(report.tokens_trained(sft), 1)
            steps = max(dc.arm_steps, round(dc.arm_steps * ratio))
            _log(f"   RASFT trained on {ratio:.2f}× the loss tokens of SFT: {steps} SFT steps")
            tokens_job = side.submit(timed, "arm: SFT, token-matched",
                                     lambda: phase("sft_tokens", "sft", steps, warm_ckpt, dc.arm_lr,
                                                   {"checkpoint": {"save_interval": steps}}))
        if dc.grpo:
            # Same steps, lr and rollout budget per round as RASFT; every rollout trains, with its
            # group-relative advantage; no demonstration.
            with _stage("arm: GRPO", dc):
                arms["GRPO"] = phase("grpo", "grpo", dc.arm_steps, warm_ckpt, dc.arm_lr,
                                     {"rollout": {"server": {"url": server.url},
                                                  "batches_per_round": dc.batches_per_round}})
        if tokens_job is not None:
            arms["SFT (tokens)"] = tokens_job.result()
        with _stage("evaluation", dc):
            curves = evaluate.evaluate_arms(server, out, arms, hf_warm, hf0, test, dc, tok_dir)
    finally:
        side.shutdown(wait=True)  # an arm still running (after an error here) finishes first
        if server is not None:
            server.stop()
    dc.times["total"] = round(time.time() - t_start, 1)
    path = report.write_report(out, dc, curves, rasft, arms.get("GRPO"))
    text = path.read_text()
    print("\n## Result" + text.split("## Result", 1)[1].split("\n## ", 1)[0], flush=True)
    _log(f"report: {path}  (total {dc.times['total']:.0f}s)")
    return path
