"""A vLLM server on the demo's toy model and tokenizer (`megatron_rasft.demo.toy`), with a small
footprint: the tests' session server (tests/conftest.py) and the benchmarks that need a server."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_rasft.demo.toy import make_tiny_model, train_tokenizer


def start_tiny_server(work_dir: str | Path, seed: int = 0, log_file: Optional[str | Path] = None,
                      **config_overrides):
    """Build a tokenizer and a tiny model under `work_dir` and start a vLLM server on it with a
    small footprint (0.25 GiB KV cache, 512-token context). Returns the started `RolloutServer`
    (`.url`, `.model_dir`, `.stop()`)."""
    from megatron_rasft.config import ServerConfig
    from megatron_rasft.rollout.server import RolloutServer

    work_dir = Path(work_dir)
    tok_dir = train_tokenizer(work_dir / "tokenizer")
    model_dir = make_tiny_model(work_dir / "model", tok_dir, seed=seed)
    cfg = ServerConfig(**{"kv_cache_gib": 0.25, "max_model_len": 512, "concurrency": 4,
                           **config_overrides})
    return RolloutServer(model_dir, cfg, log_file=log_file or work_dir / "vllm_server.log").start()
