"""Weight refresh without the disk (`rollout.server.weight_sync = "transfer"`): the policy goes from
the trainer's ranks into the running vLLM server through vLLM's weight-transfer API.

Two halves:

- `stream_policy` (collective, every trainer rank): the policy as Hugging Face tensors, made by the
  converter's own per-tensor transforms (`convert.export.StageTensors` and the name map's
  `Entry.to_hf`: one name map and one gather for the export and the transfer). Within the first
  data-parallel replica, each pipeline stage's TP shards are gathered to its TP rank 0 one tensor at
  a time, packed into flat byte buckets of at most `rollout.server.bucket_mib` (a tensor larger than
  that travels alone), and every stage other than the first sends its buckets to trainer rank 0
  over the trainer's own process group. Rank 0 hands each bucket to the sender. The trainer
  therefore holds at most one bucket plus one gathered tensor beyond its parameters, never a model
  copy. Mixture-of-experts models at EP > 1: every rank takes part, as in the disk export; expert
  by expert, in global order, the holder with expert-DP rank 0 gathers the matrix over expert TP and
  sends it point to point to the stage's TP rank 0, which packs it into the bucket like any tensor
  (ranks that hold no expert of a bucket only skip it).
- `WeightSender` (trainer rank 0 only): the transfer group with the server's worker(s) and the HTTP
  control legs `/pause` → `/start_weight_update` → per bucket `/update_weights` (concurrent with the
  group broadcast of the bucket) → `/finish_weight_update` → `/reset_prefix_cache` → `/resume`.

Why one sender (vLLM's `nccl` engine) and not `nccl_m2n`: Megatron's TP shards are not vLLM's TP
shards in general (QKV is grouped per KV group, SwiGLU's fc1 interleaves gate/up per rank, the
vocabulary is padded for the trainer's TP), so an M-to-N engine would need a second layout map next
to the converter's; one sender reuses the converter unchanged, and the gather costs one tensor at a
time. On CPU the same protocol runs over gloo with our engine (`vllm_gloo.py`).

Consistent snapshot: the stream runs at the window boundary, before the next optimizer step, on
every rank (the window-boundary half of a round, `rounds/round.py`), so no parameter changes during
a transfer, overlapped rounds included: their background thread only samples.

Aborts: every leg has a timeout (`rollout.server.transfer_timeout_s`: HTTP calls, group collectives,
the rendezvous). A failed leg marks the sender `dirty` and leaves the server paused (its weights are
a mix of old and new tensors, partly unloaded): it serves nothing until the next refresh restarts it
(a server we started) or completes a full transfer (an attached one). Rank 0 keeps taking part in
the trainer-side collectives of a failed stream, so the other ranks never hang on it.
"""
from __future__ import annotations

import datetime
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rasft.parallel.net import free_port
from megatron_rasft.rollout.server import ServerError, http_json

from megatron_rasft.rollout.vllm_ext import GLOO_BACKEND  # noqa: F401 - our engine in vLLM's registry


# ----------------------------------------------------------------------------- the plan (all ranks)
@dataclass
class Bucket:
    """HF tensors packed back to back into one flat byte buffer, all from one pipeline stage.

    owner: the global trainer rank that fills it (the stage's TP rank 0 in the first replica);
    mcore: the Megatron parameters it is made from, in order; names/dtypes/shapes: its HF tensors."""

    owner: int
    mcore: list = field(default_factory=list)
    names: list = field(default_factory=list)
    dtypes: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    nbytes: int = 0


def plan_buckets(stages: list, bucket_bytes: int) -> list[Bucket]:
    """Greedy buckets over `stages` = [(owner rank, [(mcore name, [(hf name, shape)], dtype)])] in
    stage order: a bucket never spans two stages and closes before it would exceed `bucket_bytes`
    (an item larger than that gets a bucket of its own)."""
    buckets: list[Bucket] = []
    for owner, items in stages:
        cur = None
        for mcore, hf, dtype in items:
            size = sum(math.prod(s) for _, s in hf) * torch.empty((), dtype=dtype).element_size()
            if cur is None or (cur.nbytes and cur.nbytes + size > bucket_bytes):
                cur = Bucket(owner)
                buckets.append(cur)
            cur.mcore.append(mcore)
            for n, s in hf:
                cur.names.append(n)
                cur.shapes.append(list(s))
                cur.dtypes.append(dtype)
            cur.nbytes += size
    return buckets


def _plan(src, groups, bucket_bytes: int) -> list:
    """The buckets, from `src` (`convert.export.StageTensors`). Collective over the world: every
    stage's TP rank 0 in the first replica tells the others what it writes (experts held by other
    EP ranks included)."""
    from megatron_rasft.convert import names

    mine = None
    if src.writes:
        items = []
        for entries, params in src.per_chunk:
            shapes = names.hf_shapes(src.ctx, entries)
            items += [(e.mcore, [(n, shapes[n]) for n in e.hf], src.dtype(e, params)) for e in entries]
        mine = (groups.pp_rank, _rank(), items)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    stages = sorted((s for s in everyone if s is not None), key=lambda s: s[0])
    return plan_buckets([(owner, items) for _, owner, items in stages], bucket_bytes)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def pack(tensors: Sequence[torch.Tensor], nbytes: int, device) -> torch.Tensor:
    """The tensors' bytes back to back in one new uint8 buffer of `nbytes`."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    off = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        buf[off:off + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        off += n
    if off != nbytes:
        raise RuntimeError(f"transfer: packed {off} bytes into a bucket planned for {nbytes}")
    return buf


def unpack(buf: torch.Tensor, dtypes: Sequence[torch.dtype], shapes: Sequence) -> list[torch.Tensor]:
    """Views of `buf` as the tensors `pack` put there (dtypes and shapes in order)."""
    out, off = [], 0
    for dtype, shape in zip(dtypes, shapes):
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append(buf[off:off + n].view(dtype).view(list(shape)))
        off += n
    return out


def stream_policy(model_chunks: list, mcfg, groups, bucket_mib: float,
                  sink: Optional[Callable[[Bucket, torch.Tensor], None]]) -> dict:
    """Collective over every trainer rank: the policy, bucket by bucket, to `sink(bucket, buffer)`
    on global rank 0 (`sink` is ignored elsewhere; None on rank 0 drops the buckets).
    -> on every rank {"buckets", "bytes", "gather_s" (this rank's gathers and packing),
    "forward_s" (pipeline stages to rank 0), "sink_s" (rank 0's sink)}.

    model_chunks: this rank's (wrapped) model chunks; mcfg: the `ModelConfig`; groups: the run's
    `ParallelGroups`. Raises RuntimeError when the model lacks a parameter its config implies."""
    from megatron_rasft.convert.export import StageTensors
    from megatron_rasft.model.provider import unwrap

    chunks = unwrap(model_chunks)
    src = StageTensors(chunks, mcfg, groups)
    buckets = _plan(src, groups, int(bucket_mib * 2**20))
    params = {n: p for _, ps in src.per_chunk for n, p in ps.items()}
    by_name = {e.mcore: e for entries, _ in src.per_chunk for e in entries}
    me, device = _rank(), next(chunks[0].parameters()).device
    stats = {"buckets": len(buckets), "bytes": sum(b.nbytes for b in buckets),
             "gather_s": 0.0, "forward_s": 0.0, "sink_s": 0.0}
    with torch.no_grad():
        for b in buckets:
            buf = None
            if b.mcore[0] in by_name:  # this stage's bucket: each of its ranks takes part (`StageTensors.full`)
                t0 = time.perf_counter()
                hf = []
                for name in b.mcore:
                    full = src.full(by_name[name], params)
                    if full is not None:
                        hf += list(by_name[name].to_hf(full, src.ctx).values())
                    del full
                if me == b.owner:
                    buf = pack(hf, b.nbytes, device)
                del hf
                stats["gather_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if b.owner != 0 and me == b.owner:
                dist.send(buf, dst=0)
                buf = None
            elif b.owner != 0 and me == 0:
                buf = torch.empty(b.nbytes, dtype=torch.uint8, device=device)
                dist.recv(buf, src=b.owner)
            stats["forward_s"] += time.perf_counter() - t0
            if me == 0 and sink is not None:
                t0 = time.perf_counter()
                sink(b, buf)
                stats["sink_s"] += time.perf_counter() - t0
            del buf
    return stats


# ----------------------------------------------------------------------------- rank 0: the sender
class TransferError(ServerError):
    """A leg of a transfer failed or timed out; the server was left paused with mixed weights."""


class WeightSender:
    """Trainer rank 0's end of the transfer into one vLLM server (`rollout.server.RolloutServer`).

    backend: "gloo" (our engine, CPU servers) or "nccl" (vLLM's built-in engine, GPU servers; the
    trainer side uses vLLM's `PyNcclCommunicator`); default by `torch.cuda.is_available()`.
    `dirty`: a transfer began and did not finish (the server holds mixed weights and stays paused).
    Usage per refresh: `begin()`, `send(bucket, buffer)` per bucket (the `sink` of
    `stream_policy`), `end()`.
    """

    def __init__(self, server, timeout_s: float, backend: Optional[str] = None):
        self.server, self.timeout_s = server, float(timeout_s)
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.group = None
        self._group_restarts = None  # server.restarts when the group was made
        self.dirty = False
        self.error: Optional[str] = None
        self.stats: dict = {}
        # The refresh check's trainer side (`refresh_check.RefreshCheck`): the HF tensors whose
        # digests it needs, and their digests, taken from what the trainer streams (`note`).
        self.digest_names: set = set()
        self.digests: dict = {}

    # -- control legs ------------------------------------------------------------------------
    def _post(self, path: str, payload: Optional[dict] = None) -> dict:
        try:
            status, body = http_json(f"{self.server.url}{path}", payload or {}, timeout=self.timeout_s,
                                     method="POST")
        except OSError as e:
            raise TransferError(f"POST {path} failed (timeout {self.timeout_s:.0f}s, "
                                f"rollout.server.transfer_timeout_s): {e}") from e
        if status != 200:
            hint = " (the dev endpoints are off: VLLM_SERVER_DEV_MODE=1)" if status == 404 else ""
            raise TransferError(f"POST {path} -> {status}{hint}: {str(body)[:500]}")
        return body if isinstance(body, dict) else {}

    def rpc(self, method: str, **kwargs):
        """`/collective_rpc` of our worker extension (`vllm_ext.py`) -> the first worker's result."""
        body = self._post("/collective_rpc", {"method": method, "kwargs": kwargs})
        results = body.get("results") if isinstance(body, dict) else None
        return results[0] if results else None

    def status(self) -> dict:
        """The worker's view: {"complete": the last transfer finished (or none began),
        "active": vLLM's update session is open}."""
        return self.rpc("transfer_status") or {}

    # -- the group ---------------------------------------------------------------------------
    def _init_group(self) -> None:
        """(Re)create the transfer group with the server's worker(s): our rank 0, theirs 1..n.
        The worker joins inside `/init_weight_transfer_engine`, so that call runs beside ours."""
        self.group = None
        world = 1 + int(self.rpc("transfer_world_size") or 1)
        host = self.server.cfg.host
        port = free_port(host)
        info = {"master_address": host, "master_port": port, "world_size": world, "rank_offset": 1}
        if self.backend == "gloo":
            info["timeout_s"] = self.timeout_s
        else:  # vLLM's nccl engine: its unpacked mode receives a bucket's tensors one by one
            info["packed"] = False
        with ThreadPoolExecutor(max_workers=1) as pool:
            worker = pool.submit(self._post, "/init_weight_transfer_engine", {"init_info": info})
            try:
                group = self._trainer_endpoint(host, port, world)
            except Exception:
                worker.result(timeout=self.timeout_s)  # its error explains ours, if it has one
                raise
            worker.result(timeout=self.timeout_s)
        self.group, self._group_restarts = group, self.server.restarts

    def _trainer_endpoint(self, host: str, port: int, world: int):
        timeout = datetime.timedelta(seconds=self.timeout_s)
        if self.backend == "gloo":
            store = dist.TCPStore(host, port, world, is_master=True, timeout=timeout)
            return dist.ProcessGroupGloo(store, 0, world, timeout)
        # vLLM's own trainer endpoint of its nccl engine (StatelessProcessGroup + PyNcclCommunicator).
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        return trainer_init({"master_address": host, "master_port": port, "world_size": world}, rank=0)

    # -- one refresh -------------------------------------------------------------------------
    def begin(self, restart_dir=None) -> None:
        """Before the stream: a server left dirty by an aborted transfer is restarted (ours, on
        `restart_dir` or its start-up checkpoint) or kept paused for a full transfer (attached);
        the group is (re)made when there is none or the server restarted since; then the engine is
        paused (in-flight requests finish on the old weights) and vLLM's update session opened.
        Raises TransferError / ServerError; on error the sender is left dirty."""
        self.stats = {"init_s": 0.0, "send_s": 0.0, "buckets": 0, "bytes": 0}
        self.error = None
        t0 = time.perf_counter()
        if self.dirty and self.server.managed:
            print(f"[transfer] the last transfer into {self.server.url} did not finish: restarting the server "
                  f"before a full transfer", flush=True)
            self.server.restart(restart_dir)
            self.group = None
        if self.group is None or self._group_restarts != self.server.restarts:
            self._init_group()
        self.stats["init_s"] = time.perf_counter() - t0
        self.dirty = True  # until `end` finishes: the server holds mixed weights from here on
        self._post("/pause?mode=wait")
        self.rpc("transfer_reset")  # a trainer killed mid-update left vLLM's update session open
        self._post("/start_weight_update")

    def send(self, bucket: Bucket, buf: torch.Tensor) -> None:
        """One bucket: `/update_weights` with its names, dtypes and shapes, beside the broadcast of
        its bytes (both block until the other side joins). After a failed leg the remaining buckets
        are dropped (the trainer-side collectives of the stream go on) and `end` raises."""
        self.note(bucket, buf)
        if self.error is not None:
            return
        t0 = time.perf_counter()
        info = {"names": bucket.names, "dtype_names": [str(d).removeprefix("torch.") for d in bucket.dtypes],
                "shapes": bucket.shapes}
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            worker = pool.submit(self._post, "/update_weights", {"update_info": info})
            if self.backend == "gloo":
                self.group.broadcast(buf, 0, datetime.timedelta(seconds=self.timeout_s)).wait()
            else:  # vLLM's nccl engine (packed=False) receives the tensors one by one
                stream = torch.cuda.current_stream()
                for t in unpack(buf, bucket.dtypes, bucket.shapes):
                    self.group.broadcast(t, src=0, stream=stream)
                stream.synchronize()
            worker.result(timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - recorded; `end` raises it after the stream
            self.error = f"bucket {self.stats['buckets']} ({bucket.names[0]}...): {type(e).__name__}: {e}"
            self.group = None  # a broken group cannot be trusted again: the next begin re-makes it
            print(f"[transfer] aborted: {self.error}; the server stays paused", flush=True)
        finally:
            pool.shutdown(wait=False)  # never join a worker call stuck in a dead collective
        self.stats["send_s"] += time.perf_counter() - t0
        self.stats["buckets"] += 1
        self.stats["bytes"] += bucket.nbytes

    def note(self, bucket: Bucket, buf: torch.Tensor) -> None:
        """Record the digests (`refresh_check.tensor_digest`) of the bucket's tensors that the
        refresh check asked for: the trainer's side of "which tensors changed", taken before the
        bytes go out, so a bucket the server never applies still counts as changed."""
        from megatron_rasft.rollout.refresh_check import tensor_digest

        if self.digest_names.intersection(bucket.names):
            for name, t in zip(bucket.names, unpack(buf, bucket.dtypes, bucket.shapes)):
                if name in self.digest_names:
                    self.digests[name] = tensor_digest(t)

    def end(self) -> dict:
        """After the stream: finish vLLM's update session (its post-load processing), reset the
        prefix cache (cached KV blocks of the old weights) and resume. -> the stats {"init_s",
        "send_s", "finish_s", "buckets", "bytes"}. Raises TransferError when a leg failed, leaving
        the server paused."""
        if self.error is not None:
            raise TransferError(f"transfer into {self.server.url} aborted: {self.error}")
        t0 = time.perf_counter()
        self._post("/finish_weight_update")
        self._post("/reset_prefix_cache")
        self.dirty = False
        self._post("/resume")
        self.stats["finish_s"] = time.perf_counter() - t0
        return dict(self.stats)

    def abort(self, reason: str) -> None:
        """Record a failure outside `send` (e.g. the stream raised): `end` will raise."""
        self.error = self.error or reason


def verify_served(client, probe: Sequence[int], expected: Sequence[float], before: Optional[Sequence[float]],
                  atol: float, seconds: float):
    """The probe check after a transfer, as `refresh.refresh_weights` does after a reload: the
    server's log-probs of `probe` must be finite, within `atol` of `expected` (the trainer's own
    forward pass), and must have moved from `before` whenever `expected` did.
    -> `refresh.RefreshResult` (method "transfer"). Raises `refresh.RefreshError`."""
    from megatron_rasft.rollout.refresh import RefreshError, RefreshResult

    after = client.prompt_logprobs(list(probe))[1]
    if not all(math.isfinite(x) for x in after):
        raise RefreshError(f"probe log-probs after the transfer are not finite: {after}")
    if len(after) != len(expected):
        raise RefreshError(f"probe length mismatch: {len(after)} vs {len(expected)} log-probs")
    diff = max((abs(a - b) for a, b in zip(after, expected)), default=0.0)
    if diff > atol:
        raise RefreshError(f"after the transfer the probe log-probs differ from the trainer's by {diff:.3g} > "
                           f"{atol}: the new weights are not live")
    diff_before = None
    if before is not None:
        diff_before = max((abs(a - b) for a, b in zip(after, before)), default=0.0)
        moved = max((abs(a - b) for a, b in zip(expected, before)), default=0.0)
        if moved > atol and diff_before <= atol:
            raise RefreshError("probe log-probs did not change after the transfer")
    return RefreshResult("transfer", seconds, after, diff, diff_before)

