"""A rollout round longer than the collective timeout: 2 gloo processes with a 10 s process-group
timeout (`parallel.distributed_timeout_minutes`), and a round made to last >= 25 s by a proxy that
holds every generation request to the real vLLM server back for 6.5 s. Rank 1 waits for rank 0's
round without a deadline (parallel/wait.py), and the run completes. With the barrier the loop used
before, rank 1 aborts after 10 s (gloo's timeout)."""
import json

from megatron_rasft.demo.task import make_problems, write_jsonl
from helpers.proxy import DelayingProxy
from helpers.runs import loop_config, run_train, step_losses

# Collective timeout (s); seconds each generation request is held (one at a time); problems per round.
TIMEOUT_S, DELAY_S, WINDOW = 10, 6.5, 4


def test_round_longer_than_the_collective_timeout_completes(vllm_server, tmp_path):
    from megatron_rasft.convert.pipeline import hf_to_mcore

    hf_to_mcore(vllm_server.model_dir, tmp_path / "mcore", quiet=True)
    problems = write_jsonl(make_problems(8, seed=3, min_digits=1, max_digits=2), tmp_path / "problems.jsonl")
    with DelayingProxy(vllm_server.url, DELAY_S) as proxy:
        config = loop_config(tmp_path / "run.toml", server_url=proxy.url, problems=problems,
                             tokenizer=vllm_server.model_dir, load=tmp_path / "mcore", overrides={
                                 "parallel": {"distributed_timeout_minutes": TIMEOUT_S / 60},
                                 "rollout": {"server": {"concurrency": 1}, "sampling": {"max_tokens": 16}},
                                 "train": {"optim": {"lr": 1e-4},
                                           "schedule": {"train_iters": 1, "global_batch_size": WINDOW}}})
        rc, out = run_train(config, tmp_path / "run", nproc=2)
        delayed = proxy.delayed_requests
    assert rc == 0, out[-4000:]
    result = json.loads((tmp_path / "run" / "rounds" / "round_000.json").read_text())
    # The round really outlasted the timeout: its generation alone took >= 2.5x the timeout.
    assert delayed >= WINDOW and result["stage_times"]["rollout"] >= 2.5 * TIMEOUT_S, (delayed, result["stage_times"])
    assert list(step_losses(tmp_path / "run")) == [1]
