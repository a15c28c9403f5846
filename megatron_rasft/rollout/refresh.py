"""Load new policy weights into the rollout server, and prove they are the ones serving.

In place (no restart, ~1 s for small models; needs VLLM_SERVER_DEV_MODE=1, which our servers set):
  POST /pause?mode=wait → POST /collective_rpc {method: reload_weights_tied (vllm_ext.py; plain
  reload_weights on an attached server), kwargs: {weights_path}} →
  POST /reset_prefix_cache (the reload does not clear it, and cached KV blocks of the old weights
  would otherwise be reused) → POST /resume.
Only tensors are reloaded: the checkpoint must have the served model's architecture and shapes.
A failed reload can leave the engine with half-loaded (meta) weights, so any error on that path
falls back to restarting the server on the new checkpoint, as does a server without the endpoints.

Verification, after an in-place reload: the server tensors that changed must be exactly those the
trainer changed (`refresh_check.py`, `rollout.server.refresh_check`), and the log-probs of the
probe prompt are read from the server. If the caller passes `expected` (computed from the new
weights, e.g. with `hf_prompt_logprobs` for small models, or by the trainer's own forward pass) they
must match within `atol`, and must differ from the probe before the refresh whenever `expected`
does. A failed check restarts the server once; the probe must then pass.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_rasft.rollout.client import Prompt, RolloutClient
from megatron_rasft.rollout.server import RolloutServer, ServerError, http_json

DEFAULT_PROBE = "Q:12+34;A:"


class RefreshError(RuntimeError):
    """The server does not serve the weights it was asked to load."""


@dataclass
class RefreshResult:
    method: str  # "inplace" | "restart"
    seconds: float
    probe_logprobs: list
    max_abs_diff_expected: Optional[float]  # vs `expected`, when given
    max_abs_diff_before: Optional[float]  # vs the probe before the refresh
    fallback_reason: Optional[str] = None
    check: Optional[object] = None  # the in-place reload's `refresh_check.CheckResult` (None: off, or restarted)


def check_checkpoint(hf_dir: str | Path) -> Path:
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file() or not any(hf_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face checkpoint (config.json + *.safetensors)")
    return hf_dir


def reload_in_place(server: RolloutServer, hf_dir: str | Path, timeout_s: float = 600.0) -> None:
    """pause → `reload_weights_tied` (`vllm_ext.py`; on an attached server without it, plain
    `reload_weights`) → reset_prefix_cache → resume. Raises `ServerError` on any failure (a 404 means the dev endpoints
    are off: start the server with VLLM_SERVER_DEV_MODE=1)."""
    def post(path, payload=None):
        status, body = http_json(f"{server.url}{path}", payload or {}, timeout=timeout_s, method="POST")
        if status != 200:
            raise ServerError(f"POST {path} -> {status}: {body}")

    # Our servers load the worker extension whose reload also rebuilds tied layers (vllm_ext.py). An
    # attached server is asked for it too (one started by another job of ours has it), and gets the
    # plain reload only when it refuses: the plain reload leaves a tied head stale on CPU, which the
    # probe alone let through (0.03 < refresh_atol on a tied tiny model) and the refresh check catches.
    kwargs = {"weights_path": str(Path(hf_dir).resolve())}
    post("/pause?mode=wait")  # let in-flight requests finish on the old weights
    try:
        try:
            post("/collective_rpc", {"method": "reload_weights_tied", "kwargs": kwargs})
        except ServerError:
            if server.managed:
                raise
            post("/collective_rpc", {"method": "reload_weights", "kwargs": kwargs})
        post("/reset_prefix_cache")
    finally:
        post("/resume")


def resume_if_paused(server: RolloutServer, timeout_s: float = 30.0) -> None:
    """A trainer killed between `/pause` and `/resume` leaves the engine paused, and every request
    then waits forever. `/resume` on a running engine does nothing, so call it first; a server
    without the dev endpoints (404) has nothing to resume."""
    try:
        http_json(f"{server.url}/resume", {}, timeout=timeout_s, method="POST")
    except OSError as e:
        raise ServerError(f"POST {server.url}/resume failed: {e}") from e


def refresh_weights(server: RolloutServer, hf_dir: str | Path, client: Optional[RolloutClient] = None,
                    probe: Prompt = DEFAULT_PROBE, expected: Optional[Sequence[float]] = None,
                    atol: Optional[float] = None, allow_restart: bool = True) -> RefreshResult:
    """Make `server` serve the checkpoint in `hf_dir` (in place, else by restart) and verify it.

    expected: log π_new(probe_t | probe_<t) for t ≥ 1 (see `RolloutClient.prompt_logprobs`).
    atol: the largest |Δ log-prob| accepted on the probe; default the server config's
    `rollout.server.refresh_atol` (its one source).
    The in-place path is skipped when config.json differs from the served model's (vLLM does not
    notice a shape change: it reloads what fits and serves garbage). After an in-place reload the
    tensor check (`rollout.server.refresh_check`, `refresh_check.RefreshCheck`: the server tensors
    that changed must be those the trainer changed) and the probe (within `atol` of `expected`)
    must pass; otherwise the server is restarted on `hf_dir` once (a fresh process loads the whole
    checkpoint) and the probe checked again. Raises `RefreshError` naming what is stale (tensors,
    probe distance) when that fails too, or when no restart is possible.
    """
    from megatron_rasft.rollout.refresh_check import (RefreshCheck, export_digests, export_tensor_names,
                                                       remember_served)

    hf_dir = check_checkpoint(hf_dir)
    atol = server.cfg.refresh_atol if atol is None else atol
    client = client or RolloutClient(server, server.cfg, progress=False)
    resume_if_paused(server)
    before = client.prompt_logprobs(probe)[1]
    start = time.monotonic()
    method, reason, check = "inplace", None, None
    try:
        if server.model_dir is not None and not same_architecture(server.model_dir, hf_dir):
            raise ServerError(f"config.json of {hf_dir} differs from the served {server.model_dir}")
        check = RefreshCheck.begin(server, export_tensor_names(hf_dir), json.loads((hf_dir / "config.json").read_text()),
                                   server.cfg.refresh_check, server.cfg.refresh_check_tensors)
        digests = export_digests(hf_dir, check.hf_names) if check is not None else None
        reload_in_place(server, hf_dir)
        after = client.prompt_logprobs(probe)[1]
        try:
            check = check.verify(digests) if check is not None else None
        except RefreshError as e:
            distance = f"{_max_abs_diff(after, expected):.3g}" if expected is not None else "not measured"
            raise RefreshError(f"{e}; probe |Δ log-prob| vs the trainer {distance} "
                               f"(refresh_atol {atol})") from e
        if expected is not None and _max_abs_diff(after, expected) > atol:
            raise RefreshError(f"probe differs from the expected log-probs by "
                               f"{_max_abs_diff(after, expected):.3g} > {atol} after the in-place reload")
    except (ServerError, OSError, RefreshError) as e:
        if not (allow_restart and server.managed):
            kind = RefreshError if isinstance(e, RefreshError) else ServerError
            raise kind(f"in-place refresh of {server.url} failed and no restart is possible "
                       f"({'external server' if not server.managed else 'allow_restart=False'}): {e}") from e
        method, reason, check = "restart", str(e)[:600], None
        print(f"[refresh] in-place reload not usable ({reason}); restarting the server on {hf_dir}", flush=True)
        server.restart(hf_dir)
        # A fresh process serves what it loaded: the next check starts from these weights.
        remember_served(server, hf_dir, server.cfg.refresh_check, server.cfg.refresh_check_tensors)
        after = client.prompt_logprobs(probe)[1]
    server.model_dir = str(hf_dir)  # a later restart must serve these weights, not the old ones
    seconds = time.monotonic() - start
    if not all(math.isfinite(x) for x in after):
        raise RefreshError(f"probe log-probs after refresh are not finite: {after}")
    diff_before = _max_abs_diff(after, before)
    diff_expected = None
    if expected is not None:
        diff_expected = _max_abs_diff(after, expected)
        if diff_expected > atol:
            raise RefreshError(f"after refreshing to {hf_dir} the probe log-probs differ from the expected "
                               f"ones by {diff_expected:.3g} > {atol} ({method}"
                               f"{': ' + reason if reason else ''}): the new weights are not live")
        if _max_abs_diff(expected, before) > atol and diff_before <= atol:
            raise RefreshError(f"probe log-probs did not change after refreshing to {hf_dir} ({method})")
    return RefreshResult(method, seconds, after, diff_expected, diff_before, reason, check)


# Keys of config.json that do not change what the served model computes with its weights.
_CONFIG_NOISE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache"}


def same_architecture(dir_a: str | Path, dir_b: str | Path) -> bool:
    """Whether two checkpoints' config.json agree (apart from bookkeeping keys)."""
    a, b = (json.loads((Path(d) / "config.json").read_text()) for d in (dir_a, dir_b))
    return {k: v for k, v in a.items() if k not in _CONFIG_NOISE} == \
        {k: v for k, v in b.items() if k not in _CONFIG_NOISE}


def _max_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        raise RefreshError(f"probe length mismatch: {len(a)} vs {len(b)} log-probs")
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def hf_prompt_logprobs(hf_dir: str | Path, token_ids: Sequence[int]) -> list[float]:
    """log p(token_t | tokens_<t), t ≥ 1, from `transformers` in fp32 on CPU (small models only)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids_1S = torch.tensor([list(token_ids)])
    with torch.no_grad():
        logp_1SV = torch.log_softmax(model(ids_1S).logits.float(), dim=-1)
    return logp_1SV[0, :-1].gather(-1, ids_1S[0, 1:, None])[:, 0].tolist()
