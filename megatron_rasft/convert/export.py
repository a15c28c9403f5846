"""Export the in-memory Megatron model (sharded over TP/PP/VPP ranks) to a Hugging Face folder.

Collective: every rank calls `export_to_hf`. Only the first data-parallel replica works: within it,
each pipeline stage streams its own layers in order — the TP shards of one tensor are gathered to
the stage's TP rank 0, mapped to HF names, and appended to that stage's safetensors shards — so no
stage ever holds more than one full tensor, and stages write in parallel. Rank 0 then names the
shards `model-0000k-of-0000n.safetensors` in stage order, writes the index, `config.json`,
`generation_config.json` and tokenizer files, checks every file, and renames the folder into place.
The output folder must be on a filesystem every writing rank sees.

Mixture-of-experts models at expert parallelism EP > 1: an MoE layer's experts are spread over the
EP ranks (and possibly over expert-data-parallel replicas outside the first replica), so every rank
takes part. Expert by expert, in global order, the one holder with expert-data-parallel rank 0
gathers that expert's matrix over its expert-tensor-parallel group and sends it point to point to
the stage's writer (skipped when the holder is the writer): one expert matrix in flight at a time.
`StageTensors` holds that part of the work; the weight transfer (`rollout/transfer.py`) uses it too.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rasft.config import ModelConfig
from megatron_rasft.convert import hf_io, layout, names
from megatron_rasft.model.provider import padded_vocab_size, unwrap
from megatron_rasft.records import replace_dir
from megatron_rasft.parallel.groups import barrier, rank


def stage_entries(chunk, mcfg: ModelConfig, remote_experts: bool = False) -> tuple[list, dict]:
    """(entries this chunk owns in HF order, {global megatron name: local parameter}). Experts held
    by other EP ranks are listed only with `remote_experts` (the export gathers them); otherwise a
    missing expert is an error like any missing parameter (RuntimeError)."""
    to_global = layout.local_to_global_names(chunk)
    params = {to_global[n]: p for n, p in chunk.named_parameters()}
    layers = sorted({layout.layer_index(g) for g in params if layout.layer_index(g) is not None})
    entries = names.entries(mcfg, layers=layers, pre=chunk.pre_process, post=chunk.post_process)
    missing = [e.mcore for e in entries if e.mcore not in params and not (remote_experts and e.expert is not None)]
    if missing:
        hint = " (experts held by other EP ranks: `StageTensors` lists and gathers them)" \
            if any(layout.expert_index(m) is not None for m in missing) else ""
        raise RuntimeError(f"export: the model has no parameter(s) {missing[:3]} that the config implies{hint}")
    return entries, params


def _expert_roles(chunks, groups) -> list:
    """Every rank's (pp rank, EP rank, expert-TP rank, expert-DP rank, writes?) — from its MoE
    layers' own process groups (None where its stage has no MoE layer). Collective."""
    mine = None
    for chunk in chunks:
        for layer in getattr(getattr(chunk, "decoder", None), "layers", []):
            experts = layout.experts_module(layer)
            if experts is not None:
                mine = (groups.pp_rank, experts.ep_group.rank(), experts.tp_group.rank(), experts.dp_group.rank(),
                        groups.first_replica and groups.tp_rank == 0)
                break
        if mine is not None:
            break
    if mine is None:
        mine = (groups.pp_rank, None, None, None, groups.first_replica and groups.tp_rank == 0)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _expert_full(e, params, experts, roles, shape, dtype) -> Optional[torch.Tensor]:
    """Expert entry `e` (global expert index) as a full tensor on the stage's writer (None elsewhere):
    the holder with expert-DP rank 0 gathers it over expert TP and sends it to the writer."""
    me = dist.get_rank()
    pp, ep_rank, etp_rank, edp_rank, writes = roles[me]
    owner_ep = e.expert // experts.num_local_experts
    writer = next(r for r, x in enumerate(roles) if x[0] == pp and x[4])
    sender = next(r for r, x in enumerate(roles) if x[0] == pp and x[1] == owner_ep and x[2] == 0 and x[3] == 0)
    full = None
    if ep_rank == owner_ep and edp_rank == 0:  # the holder's expert-TP group gathers
        local = params[e.mcore].detach().contiguous()
        etp_size = experts.tp_group.size()
        if etp_size == 1:
            full = local
        else:
            parts = [torch.empty_like(local) for _ in range(etp_size)] if etp_rank == 0 else None
            dist.gather(local, parts, dst=dist.get_global_rank(experts.tp_group, 0), group=experts.tp_group)
            full = layout.unshard(e.mcore, parts) if etp_rank == 0 else None
    if sender == writer:
        return full if me == writer else None
    if me == sender:
        dist.send(full.contiguous(), dst=writer)
        return None
    if me == writer:
        full = torch.empty(shape, dtype=dtype, device=next(iter(params.values())).device)
        dist.recv(full, src=sender)
        return full
    return None


class StageTensors:
    """This rank's part in making its pipeline stage's full (TP=1, EP=1) Megatron tensors, entry by
    entry, on the stage's writer (its TP rank 0 in the first data-parallel replica): shared by the
    disk export (`export_to_hf`) and the weight transfer (`rollout/transfer.py`).

    Collective over the world at construction (with experts spread, the roles are all-gathered) and
    in `full` (the stage's ranks call it for the same entries in the same order). `spread`: an MoE
    model in a multi-rank job, where every rank takes part (its experts may be the only copy the
    writer can get); otherwise only the first replica does (`takes_part`).
    per_chunk: [(entries in HF order, {global megatron name: local parameter})] per model chunk
    (empty where the rank takes no part); ctx: the name map's `MapContext`; shapes: every Megatron
    tensor's global shape."""

    def __init__(self, chunks: list, mcfg: ModelConfig, groups):
        self.groups = groups
        self.spread = bool(mcfg.is_moe and dist.is_initialized() and dist.get_world_size() > 1)
        self.takes_part = groups.first_replica or self.spread
        self.writes = groups.first_replica and groups.tp_rank == 0
        self.roles = _expert_roles(chunks, groups) if self.spread else None
        self.per_chunk = [stage_entries(c, mcfg, remote_experts=self.spread) for c in chunks] \
            if self.takes_part else []
        self.ctx = names.MapContext(mcfg, padded_vocab_size(mcfg, groups.tp_size))
        self.shapes = names.mcore_shapes(self.ctx)
        self.dtype0 = next(chunks[0].parameters()).dtype
        self.experts_of = {}  # global layer -> its SequentialMLP (for the EP layout)
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                if layout.experts_module(layer) is not None:
                    self.experts_of[layer.layer_number - 1] = layout.experts_module(layer)

    def dtype(self, e, params: dict) -> torch.dtype:
        """Entry `e`'s dtype (an expert held elsewhere: the model's, as every parameter's)."""
        p = params.get(e.mcore)
        return p.dtype if p is not None else self.dtype0

    def full(self, e, params: dict) -> Optional[torch.Tensor]:
        """Entry `e` as the full tensor on the stage's writer, None elsewhere. `params`: the dict
        of the chunk `e` came from (or a union of this rank's chunks'). An expert comes from its
        holder with expert-DP rank 0 (gathered over expert TP, sent point to point); any other
        tensor is gathered over TP within the first replica."""
        if self.spread and e.expert is not None:
            return _expert_full(e, params, self.experts_of[e.layer], self.roles, self.shapes[e.mcore], self.dtype0)
        if self.groups.first_replica:
            g = self.groups
            return gather_full(e.mcore, params[e.mcore], g.tp, g.tp_size, g.tp_rank)
        return None


def gather_full(name: str, local: torch.Tensor, tp_group, tp_size: int, tp_rank: int) -> Optional[torch.Tensor]:
    """The full (TP=1) tensor on TP rank 0 (None elsewhere)."""
    if tp_size == 1 or layout.split_kind(name) == "replicated":
        return local.detach() if tp_rank == 0 else None
    local = local.detach().contiguous()  # gloo silently mis-gathers non-contiguous tensors
    parts = [torch.empty_like(local) for _ in range(tp_size)] if tp_rank == 0 else None
    dist.gather(local, parts, dst=dist.get_global_rank(tp_group, 0), group=tp_group)
    return layout.unshard(name, parts) if tp_rank == 0 else None


def export_to_hf(model_chunks: list, out_dir: str | Path, mcfg: ModelConfig, groups, *, hf_config: Optional[dict] = None,
                 tokenizer_dir: Optional[str | Path] = None, dtype: Optional[str] = None,
                 max_shard_size: str = "5GB") -> Optional[dict]:
    """Write this rank's part of the model to `out_dir` (replacing it). Returns, on rank 0, a summary
    dict (seconds, bytes, files); None elsewhere.

    `groups` is the run's `ParallelGroups`. `hf_config` is the source checkpoint's config.json dict (keeps its family and extra keys);
    `tokenizer_dir` a folder whose tokenizer files are copied; `dtype` "bf16" | "fp16" | "fp32"
    (default: the parameters' dtype)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    rank0 = rank() == 0
    target = hf_io.DTYPES[dtype] if dtype else None
    tmp = out_dir.parent / f".{out_dir.name}.export-tmp"
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()

    chunks = unwrap(model_chunks)
    result = None
    # With experts spread over EP ranks every rank may hold some the writer needs.
    src = StageTensors(chunks, mcfg, groups)
    if src.takes_part:
        plan = []
        for entries, params in src.per_chunk:
            hf_shapes = names.hf_shapes(src.ctx, entries)
            plan += [(n, hf_shapes[n], target or src.dtype(e, params)) for e in entries for n in e.hf]
        writer = None
        if src.writes:
            writer = hf_io.ShardedWriter(tmp, plan, hf_io.parse_size(max_shard_size),
                                         prefix=f"stage{groups.pp_rank:04d}")
        try:
            with torch.no_grad():
                for entries, params in src.per_chunk:
                    for e in entries:
                        full = src.full(e, params)
                        if writer is not None:
                            for n, t in e.to_hf(full, src.ctx).items():
                                writer.write(n, t.to(target) if target is not None else t)
                        del full
        finally:
            if writer is not None:
                writer.abort()
        if writer is not None:
            result = (groups.pp_rank, writer.finish(), writer.bytes_written)
    gathered = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, result)
    else:
        gathered = [result]
    summary, error = None, None
    if rank0:
        try:
            summary = _finalize(gathered, tmp, out_dir, mcfg, chunks, target, hf_config, tokenizer_dir, t0)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"{type(e).__name__}: {e}"
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RuntimeError(f"export_to_hf failed on rank 0: {error}")
    return summary


def _finalize(gathered, tmp, out_dir, mcfg, chunks, target, hf_config, tokenizer_dir, t0) -> dict:
    """Rank 0: index, side files, completeness check, rename into place."""
    parts = sorted((r for r in gathered if r is not None), key=lambda r: r[0])
    shards = [s for _, stage_shards, _ in parts for s in stage_shards]
    total = sum(b for _, _, b in parts)
    out_dtype = target or next(chunks[0].parameters()).dtype
    cfg = names.hf_config_from_model_config(mcfg, base=hf_config, dtype=hf_io.DTYPE_NAMES.get(out_dtype))
    hf_io.write_index(tmp, shards, total)
    hf_io.write_side_files(tmp, cfg, Path(tokenizer_dir) if tokenizer_dir else None)
    expected = {n for e in names.entries(mcfg) for n in e.hf}
    written = {n for _, ns in shards for n in ns}
    if written != expected:
        raise RuntimeError(f"export: tensors missing {sorted(expected - written)[:3]}, "
                           f"unexpected {sorted(written - expected)[:3]}")
    replace_dir(tmp, out_dir)
    return {"seconds": time.perf_counter() - t0, "bytes": total, "files": len(shards), "out": str(out_dir)}
