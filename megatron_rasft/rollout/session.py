"""One place that opens a rollout server for a job: start one on a checkpoint, or attach to one
already running at a URL; its client; and, for the trainer, making it serve new weights (with
the refresh again after the server came back from a crash).

The trainer's rounds, `eval` and the `rollout` command all go through `RolloutSession.open`, so a
server is started, attached, logged and stopped the same way everywhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from megatron_rasft.config import ServerConfig


def is_url(source) -> bool:
    """Whether a model source names a running server (`http://` or `https://`) rather than a folder."""
    return str(source).startswith(("http://", "https://"))


class RolloutSession:
    """A vLLM server (started here, or attached) with its `RolloutClient`.

    `server` / `client`: the `rollout.server.RolloutServer` and `rollout.client.RolloutClient`;
    `owns`: whether `close` stops it (default: when the server is one we started, `server.managed`;
    False for a running server handed to `open`, which its owner stops).
    Use as a context manager, or call `close()`.
    """

    def __init__(self, server, client, owns: Optional[bool] = None):
        self.server, self.client = server, client
        self.owns = server.managed if owns is None else owns

    @classmethod
    def open(cls, source, cfg: Optional[ServerConfig] = None, *, log_file: Optional[str | Path] = None,
             progress: bool = True, label: str = "") -> "RolloutSession":
        """Attach to the server at `source` (a URL) or start one serving the HF checkpoint folder
        `source`, with `cfg` (`[rollout.server]`; None = defaults) and its log in `log_file`; a
        running `RolloutServer` as `source` is used as it is (and left running by `close`).
        `label` prefixes the start-up line (e.g. "[eval] "). Raises `rollout.server.ServerError` when
        no healthy server answers at the URL or the started one does not come up."""
        from megatron_rasft.rollout.client import RolloutClient
        from megatron_rasft.rollout.server import RolloutServer, ServerError

        cfg = cfg or ServerConfig()
        if isinstance(source, RolloutServer):
            return cls(source, RolloutClient(source, cfg, progress=progress), owns=False)
        if cfg.fleet:
            from megatron_rasft.rollout.fleet import Fleet

            if cfg.urls:
                server = Fleet.attach(cfg.urls, cfg, log_file=log_file)
                print(f"{label}{len(cfg.urls)} external replicas behind vllm-router at {server.url}", flush=True)
            else:
                if is_url(source):
                    raise ServerError(f"rollout.server.replicas = {cfg.replicas} starts replicas on a checkpoint "
                                      f"folder, not at the URL {source}")
                server = Fleet.create(source, cfg, log_file=log_file)
                print(f"{label}starting {cfg.replicas} vLLM replicas on {source} behind vllm-router "
                      f"({cfg.router_policy}; logs {log_file or 'not kept'}) ...", flush=True)
                server.start()
            return cls(server, RolloutClient(server, cfg, progress=progress))
        if is_url(source):
            server = RolloutServer.attach(str(source), cfg)
        else:
            server = RolloutServer(source, cfg, log_file=log_file)
            print(f"{label}starting vLLM on {source} (log {log_file or 'not kept'}) ...", flush=True)
            server.start()
        return cls(server, RolloutClient(server, cfg, progress=progress))

    @property
    def generate(self):
        """The client's `Generator` (`rollout.client.Generator`)."""
        return self.client.generate

    @property
    def label(self) -> str:
        """What the server serves, for reports: its checkpoint folder, or its URL when attached."""
        return self.server.model_dir or self.server.url

    def serve(self, hf_dir: str | Path, probe: Sequence[int], expected: Sequence[float]):
        """Make the server serve the checkpoint `hf_dir` and prove it: the probe's log-probs must
        match `expected` (our own forward pass of those weights; `rollout.refresh.refresh_weights`).
        Also arms the client so that a server which dies and comes back is refreshed again before
        any lost prompt is resubmitted (it comes back on whatever it loads at start-up).
        -> the `RefreshResult`. Raises `RefreshError` / `ServerError` when the weights are not live."""
        from megatron_rasft.rollout.client import RolloutClient
        from megatron_rasft.rollout.refresh import refresh_weights

        def refresh():
            # One server, or a fleet's every replica in turn, each proven by its own probe and tensor
            # check. No round samples while this runs (a round is served before its first request),
            # so no round can see two weight versions.
            replicas = getattr(self.server, "replicas", None)
            targets = ([("server", self.server, self.client)] if replicas is None else
                       [(f"replica {i}", r, RolloutClient(r, self.client.cfg, progress=False))
                        for i, r in enumerate(replicas)])
            results = []
            for name, server, client in targets:
                res = refresh_weights(server, hf_dir, client, probe=list(probe), expected=list(expected))
                tensors = res.check.summary() if res.check is not None else (
                    "restarted" if res.method == "restart" else "tensor check off")
                print(f"[round] {name} serves the step's weights ({res.method}, {res.seconds:.1f}s; {tensors}; "
                      f"probe |Δ| {res.max_abs_diff_expected:.2e} over {len(probe) - 1} tokens; {server.url})",
                      flush=True)
                results.append(res)
            return results[0]

        res = refresh()
        self.client.on_recover = refresh
        return res

    def close(self) -> None:
        """Stop the server if this session owns it (an attached or handed-in one is left running)."""
        if self.owns:
            self.server.stop()

    def __enter__(self) -> "RolloutSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def server_errors() -> tuple:
    """The exception types of a dead or unusable server (`ServerError`, `RolloutError`,
    `RefreshError`): what a round turns into a `RoundFailed`; anything else is a bug."""
    from megatron_rasft.rollout.client import RolloutError
    from megatron_rasft.rollout.refresh import RefreshError
    from megatron_rasft.rollout.server import ServerError

    return ServerError, RolloutError, RefreshError
