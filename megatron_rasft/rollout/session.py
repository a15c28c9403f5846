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

    def __init__(self, server, client, owns: Optional[bool] = None, name: str = "server"):
        self.server, self.client = server, client
        self.owns = server.managed if owns is None else owns
        self.name = name  # in the refresh's log lines ("server", or "replica i" of a fleet)
        self._replica_sessions: Optional[list] = None  # a fleet's, for the transfer (one per replica)

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
        With `weight_sync = "transfer"` the weights came by the stream that followed
        `begin_transfer` (not from `hf_dir`): this finishes that transfer and proves it the same way.
        -> the `RefreshResult`. Raises `RefreshError` / `ServerError` when the weights are not live."""
        from megatron_rasft.rollout.client import RolloutClient
        from megatron_rasft.rollout.refresh import refresh_weights

        if self.server.cfg.weight_sync == "transfer":
            if self._replica_sessions is not None:
                return self._finish_fleet_transfer(probe, expected)
            return self._finish_transfer(probe, expected)

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

    # -- weight_sync = "transfer" (rollout/transfer.py) ------------------------------------------
    sender = None  # the `transfer.WeightSender`, made by the first `begin_transfer`
    transfer_stream_stats: dict = {}  # the last stream's (`transfer.stream_policy`), for the log line

    def begin_transfer(self, probe: Sequence[int]):
        """Before the trainer streams new weights: the probe's log-probs now (to see them move),
        the server paused and vLLM's update session open -> the `WeightSender` to stream into.
        A server whose worker reports a half-done transfer (an aborted one, possibly by another
        trainer) is not resumed or probed: ours is restarted, an attached one gets the full
        transfer. Raises `ServerError` (incl. `transfer.TransferError`)."""
        import time

        from megatron_rasft.rollout.refresh import resume_if_paused
        from megatron_rasft.rollout.transfer import WeightSender

        if getattr(self.server, "replicas", None) is not None:
            return self._begin_fleet_transfer(probe)
        if self.sender is None:
            self.sender = WeightSender(self.server, self.server.cfg.transfer_timeout_s)
        if not self.sender.status().get("complete", True):
            self.sender.dirty = True
        self._before = None
        self._check = None
        if not self.sender.dirty:
            resume_if_paused(self.server)
            self._before = self.client.prompt_logprobs(list(probe))[1]
            self._check = self._begin_check()
        else:  # restarted or fully re-sent below: the next check learns what it serves
            from megatron_rasft.rollout.refresh_check import forget_served

            forget_served(self.server)
        self.sender.digest_names = set(self._check.hf_names) if self._check is not None else set()
        self.sender.digests = {}
        self._t0 = time.monotonic()
        self.client.on_recover = self._lost_transfer
        try:
            self.sender.begin()
        except Exception:
            self.sender.dirty = True
            raise
        return self.sender

    def _begin_check(self):
        """The refresh check (`refresh_check.RefreshCheck`) of a transfer into a server whose
        weights are known: names and config from the folder it was started on (the stream sends
        the same HF tensors). None when `rollout.server.refresh_check` is off."""
        import json

        from megatron_rasft.rollout.refresh_check import RefreshCheck, export_tensor_names

        cfg = self.server.cfg
        start = Path(self.server.model_dir) if self.server.model_dir else None
        if cfg.refresh_check == "off" or start is None or not (start / "config.json").is_file():
            return None
        return RefreshCheck.begin(self.server, export_tensor_names(start), json.loads((start / "config.json").read_text()),
                                  cfg.refresh_check, cfg.refresh_check_tensors, cfg.transfer_timeout_s)

    def _finish_transfer(self, probe, expected):
        import time

        from megatron_rasft.rollout.refresh import RefreshError
        from megatron_rasft.rollout.server import ServerError
        from megatron_rasft.rollout.transfer import verify_served

        if self.sender is None or not self.sender.dirty:
            raise ServerError("weight_sync = transfer: serve() needs the collective stream of every trainer rank "
                              "first (begin_transfer, stream_policy)")
        stats = self.sender.end()
        check = None
        if self._check is not None:
            unsent = sorted(set(self._check.hf_names) - set(self.sender.digests))
            if unsent:
                raise RefreshError(f"the transfer into {self.server.url} is partial: the stream had no tensor(s) "
                                   f"{unsent[:6]}")
            check = self._check.verify(self.sender.digests)  # raises RefreshError naming stale tensors
        res = verify_served(self.client, probe, expected, self._before, self.server.cfg.refresh_atol,
                            time.monotonic() - self._t0)
        res.check = check
        st = self.transfer_stream_stats or {}
        tensors = check.summary() if check is not None else "tensor check skipped (server weights unknown)"
        print(f"[round] {self.name} serves the step's weights (transfer, {res.seconds:.1f}s: gather "
              f"{st.get('gather_s', 0):.2f}s, forward {st.get('forward_s', 0):.2f}s, send {stats['send_s']:.2f}s, "
              f"finish {stats['finish_s']:.2f}s; {stats['buckets']} buckets, {stats['bytes'] / 2**20:.0f} MiB; "
              f"{tensors}; probe |Δ| {res.max_abs_diff_expected:.2e})", flush=True)
        self.client.on_recover = self._lost_transfer
        return res

    def _begin_fleet_transfer(self, probe: Sequence[int]):
        """`begin_transfer` for a fleet: each replica through a session of its own (its own
        `WeightSender`, so its own transfer group; its own probe and refresh check) -> a
        `FanOutSender` that hands every bucket to each replica in turn."""
        from megatron_rasft.rollout.client import RolloutClient

        if self._replica_sessions is None:
            self._replica_sessions = [RolloutSession(r, RolloutClient(r, self.client.cfg, progress=False), owns=False,
                                                     name=f"replica {i}") for i, r in enumerate(self.server.replicas)]
        self.client.on_recover = self._lost_transfer
        return FanOutSender([sub.begin_transfer(probe) for sub in self._replica_sessions])

    def _finish_fleet_transfer(self, probe, expected):
        """`serve` after a fleet's stream: every replica's transfer finished and proven (its tensor
        check and probe, one log line each) -> the first replica's `RefreshResult`."""
        results = []
        for sub in self._replica_sessions:
            sub.transfer_stream_stats = self.transfer_stream_stats
            results.append(sub._finish_transfer(probe, expected))
        self.client.on_recover = self._lost_transfer
        return results[0]

    def _lost_transfer(self):
        """A server that died and came back serves its start-up weights; only a new stream of every
        trainer rank brings the round's back, and the ranks are elsewhere: the round fails (the
        loop saves a checkpoint; the next round or `--resume` re-initialises the transfer)."""
        from megatron_rasft.rollout.server import ServerError

        raise ServerError(f"the rollout server at {self.server.url} restarted on its start-up weights; with "
                          f"weight_sync = transfer they come back only by a new transfer from every trainer rank")

    def close(self) -> None:
        """Stop the server if this session owns it (an attached or handed-in one is left running)."""
        if self.owns:
            self.server.stop()

    def __enter__(self) -> "RolloutSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FanOutSender:
    """The `sink` of a transfer into a fleet (`transfer.stream_policy`): each bucket goes to every
    replica's `transfer.WeightSender` in turn, each over its own group, so a replaced replica
    re-initialises only its own group and a slow or dead replica holds up no broadcast to the others."""

    def __init__(self, senders: list):
        self.senders = senders

    def send(self, bucket, buf) -> None:
        for sender in self.senders:
            sender.send(bucket, buf)


def server_errors() -> tuple:
    """The exception types of a dead or unusable server (`ServerError`, `RolloutError`,
    `RefreshError`): what a round turns into a `RoundFailed`; anything else is a bug."""
    from megatron_rasft.rollout.client import RolloutError
    from megatron_rasft.rollout.refresh import RefreshError
    from megatron_rasft.rollout.server import ServerError

    return ServerError, RolloutError, RefreshError
