"""Batched sampling from the rollout server: `generate(prompts, sampling) -> completions`.

One HTTP request per prompt (`/v1/completions` with `n` samples and that prompt's own seed), a
bounded pool of threads, per-request timeouts and retries. A dead server (connection refused or
reset, /health failing) is restarted through its `RolloutServer` and only the prompts whose
results were lost are resubmitted; finished prompts are kept (and already handed to `on_result`).

Seeds: vLLM gives sample j of a request the seed `seed + j`, and one seed shared by several prompts
correlates their samples (the same random draws). So every prompt gets its own seed, a 62-bit hash
of (base seed, key), where the key is the problem id (or the prompt's index): far apart, and the
same across restarts and batch orders, so a resumed round regenerates identical samples.

Log-probs are those of the distribution each token was sampled from: a server we start runs with
`--logprobs-mode processed_logprobs` (`rollout/server.py`), so they are the log-softmax of the logits
after penalties, temperature T and top-k/top-p (renormalised over the kept tokens), i.e.
log softmax(logits / T) with the default top_p = 1, top_k = 0, the tempered policy that GRPO trains
and compares with (docs/loss.md, "Sampling temperature"). An external server must be started with
that flag too; with vLLM's default (`raw_logprobs`) they are the model's untempered log-probs. The
prompt log-probs of `prompt_logprobs` are the model's own in either mode.
"""
from __future__ import annotations

import hashlib
import http.client
import socket
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Union

from megatron_rasft.config import SamplingConfig, ServerConfig
from megatron_rasft.rollout.server import RolloutServer, ServerError, http_json

Prompt = Union[str, list]  # text, or token ids (sent as they are: no BOS is added to ids)


@dataclass
class Completion:
    """One sample. `token_ids[t]` was sampled with log-prob `logprobs[t]` (same length).
    `text` is cut before a matched stop string; `token_ids` may run past it (vLLM detects stop
    strings on the detokenised text)."""

    text: str
    token_ids: list
    logprobs: list
    finish_reason: Optional[str]
    seed: Optional[int] = None


class Generator(Protocol):
    """The seam: the vLLM client below, or a scripted fake in unit tests."""

    def __call__(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 keys: Optional[Sequence] = None) -> list[list[Completion]]: ...


def prompt_seed(base_seed: int, key) -> int:
    """A per-prompt seed in [0, 2^62): stable across processes (unlike `hash()`)."""
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


class RolloutError(RuntimeError):
    """A prompt could not be completed (bad request, or retries exhausted)."""


class _ServerDown(Exception):
    """Raised by a worker thread when the server stops answering (connection refused/reset)."""


class RolloutClient:
    """Client of one `RolloutServer`. `generate` is the `Generator` seam.

    cfg (`[rollout.server]`) supplies concurrency, request_timeout_s and max_retries (per request for timeouts and
    5xx answers; per batch for server restarts that made no progress).
    """

    def __init__(self, server: RolloutServer, cfg: ServerConfig, progress: bool = True):
        self.server = server
        self.cfg = cfg
        self.progress = progress
        self._model: Optional[tuple] = None  # (served name, server.restarts when read)
        # Called after the server came back (restarted, or an external one answering again) and
        # before the lost prompts are resubmitted: the trainer re-verifies the served weights here.
        self.on_recover: Optional[Callable[[], None]] = None
        self.stats = {"requests": 0, "retries": 0, "restarts": 0, "tokens": 0, "seconds": 0.0}
        self._lock = threading.Lock()

    def _count(self, key: str, value=1) -> None:
        with self._lock:
            self.stats[key] += value

    def __call__(self, prompts, sampling, keys=None):
        return self.generate(prompts, sampling, keys)

    @property
    def model(self) -> str:
        """The served model name, re-read after every restart (it names the checkpoint served)."""
        if self._model is None or self._model[1] != self.server.restarts:
            self._model = (self.server.model_name(), self.server.restarts)
        return self._model[0]

    # ----------------------------------------------------------------- the batch
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 keys: Optional[Sequence] = None,
                 on_result: Optional[Callable[[int, list], None]] = None) -> list[list[Completion]]:
        """`sampling.n` completions for every prompt, in prompt order.

        keys: per-prompt seed keys (default: the prompt index). on_result(i, completions) is called
        in this thread as each prompt finishes (e.g. to write it out before the batch ends).
        """
        _ = self.model  # resolved here, not concurrently in the worker threads
        keys = list(range(len(prompts))) if keys is None else list(keys)
        if len(keys) != len(prompts):
            raise ValueError(f"generate: {len(keys)} keys for {len(prompts)} prompts")
        seeds = [prompt_seed(sampling.seed, k) for k in keys]
        results: list = [None] * len(prompts)
        pending = list(range(len(prompts)))
        stalled = 0
        bar = _progress_bar(len(prompts), self.progress)
        start, tokens = time.monotonic(), 0
        try:
            while pending:
                lost = []
                down = threading.Event()
                pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
                drained = False
                try:
                    futures = {pool.submit(self._one, prompts[i], sampling, seeds[i], down): i
                               for i in pending}
                    for fut in as_completed(futures):
                        i = futures[fut]
                        try:
                            results[i] = fut.result()
                        except _ServerDown:
                            lost.append(i)
                            continue
                        tokens += sum(len(c.token_ids) for c in results[i])
                        if on_result is not None:
                            on_result(i, results[i])
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(tok_s=f"{tokens / (time.monotonic() - start):.0f}")
                    drained = True
                finally:
                    # On an exception (Ctrl-C included) queued requests return at once and we do
                    # not wait for those in flight: stopping the server ends them.
                    down.set()
                    pool.shutdown(wait=drained, cancel_futures=True)
                stalled = 0 if len(lost) < len(pending) else stalled + 1
                pending = sorted(lost)
                if pending:
                    if stalled > self.cfg.max_retries:
                        raise RolloutError(f"server at {self.server.url} keeps failing: {len(pending)} "
                                           f"prompts unfinished after {stalled} recoveries")
                    self._recover(len(pending))
        finally:
            if bar is not None:
                bar.close()
            self._count("tokens", tokens)
            self._count("seconds", time.monotonic() - start)
        return results

    def _recover(self, n_lost: int) -> None:
        """The server stopped answering: restart ours, or wait for an external one (at most
        `rollout.server.startup_timeout_s`, polling /health). Raises ServerError when it cannot come back."""
        self._model = None
        if self.server.alive():
            return  # a transient connection error: just resubmit
        if self.server.managed:
            print(f"[rollout] server at {self.server.url} is down; restarting it and resubmitting "
                  f"{n_lost} prompts", flush=True)
            try:
                self.server.restart()
            except ServerError as e:
                raise ServerError(f"rollout server at {self.server.url} died and could not be restarted: {e}") from e
            self._count("restarts")
        else:
            wait_s = self.cfg.startup_timeout_s
            print(f"[rollout] external server at {self.server.url} is down; waiting up to {wait_s:.0f}s "
                  f"(rollout.server.startup_timeout_s) for it to come back, then resubmitting {n_lost} prompts", flush=True)
            start = last_note = time.monotonic()
            while not self.server.healthy(timeout_s=2.0):
                now = time.monotonic()
                if now - start > wait_s:
                    raise ServerError(f"external rollout server {self.server.url} is down and did not come back "
                                      f"within {wait_s:.0f}s (rollout.server.startup_timeout_s); restart it and rerun")
                if now - last_note >= 30.0:
                    print(f"[rollout] still waiting for {self.server.url} ({now - start:.0f}s of {wait_s:.0f}s)",
                          flush=True)
                    last_note = now
                time.sleep(1.0)
            print(f"[rollout] external server at {self.server.url} answers again after "
                  f"{time.monotonic() - start:.0f}s", flush=True)
        if self.on_recover is not None:
            self.on_recover()

    # ----------------------------------------------------------------- one request
    def request_payload(self, prompt: Prompt, sampling: SamplingConfig, seed: int) -> dict:
        return {"model": self.model, "prompt": prompt, "n": sampling.n,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                "max_tokens": sampling.max_tokens, "repetition_penalty": sampling.repetition_penalty,
                "stop": list(sampling.stop), "stop_token_ids": list(sampling.stop_token_ids), "seed": seed,
                # logprobs=0: the sampled token's log-prob only; return_token_ids: the ids themselves.
                "logprobs": 0, "return_token_ids": True}

    def _one(self, prompt: Prompt, sampling: SamplingConfig, seed: int, down: threading.Event):
        payload = self.request_payload(prompt, sampling, seed)
        for attempt in range(self.cfg.max_retries + 1):
            if down.is_set():
                raise _ServerDown()
            self._count("requests")
            try:
                status, body = http_json(f"{self.server.url}/v1/completions", payload,
                                         timeout=self.cfg.request_timeout_s)
            except Exception as e:  # noqa: BLE001 - classified below
                if _is_timeout(e):
                    problem = f"timed out after {self.cfg.request_timeout_s}s (rollout.server.request_timeout_s)"
                elif _is_connection_error(e):
                    down.set()
                    raise _ServerDown() from e
                else:
                    raise
            else:
                if status == 200:
                    return _parse_choices(body, sampling.n, seed)
                if 400 <= status < 500:
                    raise RolloutError(f"server rejected the request ({status}): {_error_text(body)}")
                if not self.server.healthy(timeout_s=5.0):  # a 500 from a dying engine
                    down.set()
                    raise _ServerDown()
                problem = f"server error {status}: {_error_text(body)}"
            self._count("retries")
            time.sleep(min(2.0 ** attempt, 10.0))
        raise RolloutError(f"request failed {self.cfg.max_retries + 1} times (rollout.server.max_retries): {problem}")

    def prompt_logprobs(self, prompt: Prompt) -> tuple[list, list]:
        """(prompt token ids, log π(token_t | tokens_<t) for t ≥ 1) under the served weights —
        the probe `refresh` uses to tell weight versions apart."""
        payload = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                   "prompt_logprobs": 0, "return_token_ids": True}
        status, body = http_json(f"{self.server.url}/v1/completions", payload,
                                 timeout=self.cfg.request_timeout_s)
        if status != 200:
            raise RolloutError(f"prompt_logprobs request failed ({status}): {_error_text(body)}")
        choice = body["choices"][0]
        ids = choice["prompt_token_ids"]
        # Entry t maps token id -> {logprob, rank, ...}; the first entry is null (nothing before).
        lps = [entry[str(tok)]["logprob"] for tok, entry in zip(ids[1:], choice["prompt_logprobs"][1:])]
        return ids, lps


def _parse_choices(body: dict, n: int, seed: int) -> list[Completion]:
    choices = sorted(body["choices"], key=lambda c: c["index"])
    if len(choices) != n:
        raise RolloutError(f"asked for n={n} samples, the server returned {len(choices)}")
    out = []
    for j, c in enumerate(choices):
        lps = (c.get("logprobs") or {}).get("token_logprobs") or []
        ids = c.get("token_ids") or []
        if len(ids) != len(lps):
            raise RolloutError(f"server returned {len(ids)} token ids but {len(lps)} log-probs")
        out.append(Completion(c["text"], list(ids), [float(x) for x in lps], c.get("finish_reason"),
                              seed + j))
    return out


def _error_text(body) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return str(body)[:500]


def _is_timeout(e: BaseException) -> bool:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    return isinstance(e, (TimeoutError, socket.timeout))


def _is_connection_error(e: BaseException) -> bool:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return True  # refused, unreachable, reset while connecting
    return isinstance(e, (ConnectionError, http.client.HTTPException, OSError))


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="rollout", unit="prompt", dynamic_ncols=True)
