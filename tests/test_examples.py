"""Every file in examples/: the configs load and validate and, shrunk by `--set` overrides onto a tiny
model, each runs one optimizer step on CPU; the SLURM script prints its job steps in a dry run, and
the training step it prints, launched twice on this machine as two nodes of 2 processes each
(torchrun, c10d rendezvous), gives the one-process losses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rasft.config import load_config
from megatron_rasft.parallel.net import free_port
from helpers.runs import ROOT, kill_group, run_train, run_trains, step_losses

EXAMPLES = ROOT / "examples"
CONFIGS = sorted(p.name for p in EXAMPLES.glob("*.toml"))
SCRIPTS = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".sh", ".sbatch"))
# Onto the tiny checkpoint (its model_config.json gives the architecture), one process, fp32, one step.
# Rounds off: the rollout path is exercised by tests/test_rounds.py; here each file's loss, weighting,
# optimizer and data settings go through a real step.
SHRINK = ["model.seq_length=64", 'model.params_dtype="fp32"', 'model.transformer_impl="local"',
          "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
          "parallel.expert_model_parallel_size=1",
          "train.schedule.train_iters=1", "train.schedule.global_batch_size=4", "train.schedule.micro_batch_size=2",
          "rollout.batches_per_round=0", 'train.data.prompt_template="plain"', "checkpoint.save_interval=0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF folder with tokenizer, its Megatron conversion, a problems file)."""
    from megatron_rasft.convert.pipeline import hf_to_mcore
    from megatron_rasft.demo.task import make_problems, write_jsonl
    from helpers.tiny import make_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("examples")
    hf = make_tiny_model(root / "hf", train_tokenizer(root / "tok"), hidden_size=64, intermediate_size=128,
                         initializer_range=0.02)
    hf_to_mcore(hf, root / "mcore", quiet=True)
    data = write_jsonl(make_problems(16, seed=3, min_digits=1, max_digits=2), root / "problems.jsonl")
    return hf, root / "mcore", data


def test_every_example_loads_and_validates():
    assert {"tiny_cpu.toml", "qwen2.5-math-1.5b.toml"} <= set(CONFIGS)
    for name in CONFIGS:
        cfg = load_config(EXAMPLES / name)
        assert cfg.train.schedule.train_iters >= 1 and cfg.loss.method, name
        assert name in (EXAMPLES / "README.md").read_text(), f"{name} is not listed in examples/README.md"
    for name in SCRIPTS:
        check = subprocess.run(["bash", "-n", str(EXAMPLES / name)], capture_output=True, text=True)
        assert check.returncode == 0, (name, check.stderr)
        assert name in (EXAMPLES / "README.md").read_text(), f"{name} is not listed in examples/README.md"


@pytest.fixture(scope="module")
def shrunk_runs(tiny, tmp_path_factory):
    """Every example config, shrunk, one step: {name: (Future of (exit code, output), run dir)}.
    The runs share nothing (no rounds), so they run two at a time."""
    hf, mcore, data = tiny
    root = tmp_path_factory.mktemp("shrunk")
    jobs = {}
    for name in CONFIGS:
        sets = [*SHRINK, f"checkpoint.load={mcore}"]
        if name != "tiny_cpu.toml":  # the model configs train on real problems with the checkpoint's tokenizer
            sets += [f"train.data.path={data}", f"train.data.tokenizer={hf}"]
        jobs[name] = (EXAMPLES / name, root / name, sets)
    futures = run_trains(jobs, timeout_s=600)
    return {"_mcore": mcore, **{name: (futures[name], root / name) for name in CONFIGS}}


@pytest.mark.parametrize("name", CONFIGS)
def test_example_runs_one_step_shrunk(name, shrunk_runs):
    future, run = shrunk_runs[name]
    rc, out = future.result()
    assert rc == 0, out[-3000:]
    losses = step_losses(run)
    assert list(losses) == [1] and 0 < losses[1] < 20, losses
    # RUN/config.json records the architecture trained: the checkpoint's, not the example's [model].
    trained = json.loads((run / "config.json").read_text())["model"]
    ckpt = json.loads((shrunk_runs["_mcore"] / "model_config.json").read_text())["model"]
    assert {k: trained[k] for k in ("num_layers", "hidden_size", "vocab_size")} == \
        {k: ckpt[k] for k in ("num_layers", "hidden_size", "vocab_size")}, name


def _dry_run(env: dict, config: str, *args: str) -> list[list[str]]:
    """The SLURM script under DRY_RUN=1: its job steps, each as an argv list."""
    out = subprocess.run(["bash", str(EXAMPLES / "slurm_rasft.sbatch"), config, *args], cwd=ROOT,
                         env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [_bash_words(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]


def _bash_words(line: str) -> list[str]:
    """Split a line printed with bash's `printf %q` (it may use $'...' quoting, which shlex does not read)."""
    out = subprocess.run(["bash", "-c", 'eval "words=($1)"; printf "%s\\0" "${words[@]}"', "_", line],
                         capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def _opt(argv: list, flag: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(flag + "="))


def test_slurm_dry_run_prints_the_job_steps(tiny, tmp_path):
    hf, _, data = tiny
    env = {"SLURM_JOB_NODELIST": "gpu1,gpu2,gpu3", "SLURM_NNODES": "3", "SLURM_JOB_ID": "77",
           "HF_DIR": str(hf), "DATA": str(data), "MCORE_DIR": str(tmp_path / "mcore"), "RUN_DIR": str(tmp_path / "run")}
    convert, server, train = _dry_run(env, "examples/qwen2.5-math-7b.toml", "--set", "train.schedule.train_iters=5")
    assert convert[:1] == ["srun"] and _opt(convert, "--nodelist") == "gpu1"
    assert convert[convert.index("--tp") + 1] == "2" and convert[convert.index("--out") + 1] == str(tmp_path / "mcore")
    assert _opt(server, "--nodelist") == "gpu3" and "examples/rollout_server.sh" in server
    assert _opt(train, "--nodes") == "2" and _opt(train, "--nodelist") == "gpu1,gpu2"
    body = train[train.index("-c") + 1]
    assert "torchrun --nnodes" in body and "--rdzv-backend c10d" in body and "-m megatron_rasft train" in body
    tail = train[train.index("-c") + 2:]
    assert tail[:2] == ["2", "8"]  # nnodes, processes per node
    sets = [tail[i + 1] for i, a in enumerate(tail) if a == "--set"]
    assert sets == [f"checkpoint.load={tmp_path / 'mcore'}", f"train.data.path={data}", f"train.data.tokenizer={hf}",
                    f"train.run_dir={tmp_path / 'run'}", "rollout.server.url=http://gpu3:8000",
                    "train.schedule.train_iters=5"]
    # A checkpoint already converted is not converted again; no rollout node -> no server step.
    (tmp_path / "mcore").mkdir()
    (tmp_path / "mcore" / "model_config.json").write_text("{}")
    steps = _dry_run({**env, "ROLLOUT_NODES": "0"}, "examples/qwen2.5-math-7b.toml")
    assert len(steps) == 1 and _opt(steps[0], "--nodes") == "3"
    assert "rollout.server.url" not in " ".join(steps[0])
    # Two rollout nodes: a server on each, vllm-router on the first of them (a step sharing that node,
    # in front of both, with the trainer's config and overrides), and the trainer attached to the
    # router while knowing the replicas (urls, router_url).
    *servers, router, train = _dry_run({**env, "SLURM_JOB_NODELIST": "gpu1,gpu2,gpu3,gpu4", "SLURM_NNODES": "4",
                                        "ROLLOUT_NODES": "2"}, "examples/qwen2.5-math-7b.toml",
                                       "--set", "rollout.server.router_policy=\"random\"")
    assert [_opt(s, "--nodelist") for s in servers] == ["gpu3", "gpu4"] and _opt(train, "--nodes") == "2"
    assert router[:2] == ["srun", "--overlap"] and _opt(router, "--nodelist") == "gpu3"
    cmd = router[router.index(sys.executable):]
    assert cmd[1:3] == ["-m", "megatron_rasft.rollout.fleet"]
    assert cmd[cmd.index("--port") + 1] == "8080" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--worker-urls") + 1:cmd.index("--worker-urls") + 3] == ["http://gpu3:8000", "http://gpu4:8000"]
    assert cmd[cmd.index("--config") + 1] == "examples/qwen2.5-math-7b.toml" and cmd[-1] == 'rollout.server.router_policy="random"'
    sets = [a for a in train if a.startswith("rollout.server.")]
    from megatron_rasft.config import load_config

    cfg = load_config("examples/qwen2.5-math-7b.toml", sets).rollout.server
    assert cfg.urls == ["http://gpu3:8000", "http://gpu4:8000"] and cfg.router_url == "http://gpu3:8080"
    assert cfg.fleet and cfg.router_policy == "random"


def test_single_node_fleet_dry_run(tiny, tmp_path):
    """examples/run_single_node.sh with REPLICAS=4: no external server; the trainer sees its 4
    training GPUs first and the 4 rollout GPUs after them (rank 0 starts a replica on each:
    rollout/fleet.py `replica_devices`), with rollout.server.replicas = 4; a wrong GPU count is refused."""
    hf, _, data = tiny
    (tmp_path / "mcore").mkdir()
    (tmp_path / "mcore" / "model_config.json").write_text("{}")
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "HF_DIR": str(hf), "DATA": str(data),
           "MCORE_DIR": str(tmp_path / "mcore"), "RUN_DIR": str(tmp_path / "run"), "TRAIN_GPUS": "0,1,2,3",
           "ROLLOUT_GPUS": "4,5,6,7", "REPLICAS": "4"}
    script = [str(EXAMPLES / "run_single_node.sh"), "examples/qwen2.5-math-1.5b.toml"]
    out = subprocess.run(["bash", *script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [line[2:] for line in out.stderr.splitlines() if line.startswith("+ ")]
    assert lines[:1] == ["CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7"] and len(lines) == 2, lines
    train = lines[1].split()
    assert train[:6] == ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "4"], train
    sets = [train[i + 1] for i, a in enumerate(train) if a == "--set"]
    assert sets[-2:] == ["rollout.server.replicas=4", "rollout.server.kv_cache_gib=40"]
    cfg = load_config(EXAMPLES / "qwen2.5-math-1.5b.toml", sets[-2:])
    assert cfg.rollout.server.replicas == 4 and cfg.rollout.server.fleet and not cfg.rollout.server.urls
    bad = subprocess.run(["bash", *script], cwd=ROOT, env={**env, "ROLLOUT_GPUS": "7"}, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "REPLICAS=4 needs one GPU each in ROLLOUT_GPUS (got '7')" in bad.stderr


def test_slurm_training_step_as_two_nodes_matches_one_process(tiny, tmp_path):
    """The `bash -c 'exec torchrun ...'` the script hands to srun, run here once per simulated node
    (SLURM_NODEID 0 and 1, 2 processes each, rendezvous on 127.0.0.1): 2 steps with DP = 4 give the
    losses of the same config in one process."""
    hf, mcore, data = tiny
    sets = ["--set", "train.schedule.train_iters=2", "--set", "train.schedule.global_batch_size=8",
            "--set", "train.schedule.micro_batch_size=2",
            "--set", "checkpoint.save_interval=0", "--set", "parallel.use_distributed_optimizer=true"]
    env = {"SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1", "SLURM_NNODES": "2", "SLURM_JOB_ID": "88", "ROLLOUT_NODES": "0",
           "GPUS_PER_NODE": "2", "HF_DIR": str(hf), "DATA": str(data), "MCORE_DIR": str(mcore),
           "RUN_DIR": str(tmp_path / "two_nodes")}
    (train,) = _dry_run(env, "examples/tiny_cpu.toml", *sets)
    node_cmd = train[train.index("bash"):]  # what srun runs on each node
    port = free_port()
    procs = []
    for node in (0, 1):
        node_env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_JOB_ID": "88", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        procs.append(subprocess.Popen(node_cmd, cwd=ROOT, env=node_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            kill_group(p)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    tail = train[train.index("--config"):]
    one_sets = [tail[i + 1] for i, a in enumerate(tail) if a == "--set" and not tail[i + 1].startswith("train.run_dir=")]
    rc, out = run_train(ROOT / "examples" / "tiny_cpu.toml", tmp_path / "one", *one_sets, timeout_s=600)
    assert rc == 0, out[-3000:]
    two, single = step_losses(tmp_path / "two_nodes"), step_losses(tmp_path / "one")
    assert sorted(two) == [1, 2] and two == pytest.approx(single, rel=1e-5), (two, single)
