"""Megatron-Core `dist_checkpointing` (torch_dist format) I/O, one tensor at a time, no model built.

A torch_dist checkpoint is a PyTorch DCP checkpoint (`.metadata` + `*.distcp`) plus Megatron's
`metadata.json` and `common.pt`. Its tensors are *global* (TP=1, PP=1) tensors; decoder layers are
stacked on a leading layer axis (`decoder.layers.self_attention.linear_qkv.weight` is
`[L, (N + 2G)·D, H]`), which is why Megatron loads one checkpoint at any TP/PP: each rank reads the
slices it owns. The SwiGLU `linear_fc1` is the global `[gate; up]` (Megatron's factory maps rank r's
`[gate_r; up_r]` onto it) and `linear_qkv` is the grouped `[q_g; k_g; v_g]` layout, whose TP shards
are contiguous row blocks: both are layout-agnostic as stored.

Writing: a DCP save planner whose `resolve_data` makes each tensor only when the writer asks for it
(one chunk per layer), so peak memory is about one tensor. Reading: a DCP load planner that asks for
one layer's slice of each stacked tensor.

Key names are those of Megatron's sharded state dict, identical for the local and the Transformer
Engine spec: `input_layernorm.weight` is stored as `self_attention.linear_qkv.layer_norm_weight`
and `pre_mlp_layernorm.weight` as `mlp.linear_fc1.layer_norm_weight` (Megatron's local spec maps
them itself when saving and loading).

Mixture-of-experts models are stored with one key per layer (`decoder.layers.{i}.…`, Megatron's
"non-homogeneous layers" form, which it uses whenever dense and MoE layers may mix; `sharded_state_dict`
asks for it for every MoE model so all-MoE and mixed models agree), and the experts of a layer
stacked on an expert axis: `decoder.layers.{i}.mlp.experts.experts.linear_fc1.weight` is
`[E, 2I, H]`, expert j at offset j (what `SequentialMLP.sharded_state_dict` maps every EP rank's
local experts onto). One expert's matrix is one chunk, written and read on its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_rasft.config import ModelConfig
from megatron_rasft.convert.layout import layer_index
from megatron_rasft.model.provider import unwrap

MODEL_CONFIG = "model_config.json"
FORMAT_VERSION = 1
_MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                      "common_backend": "torch", "common_backend_version": 1}
_STORED_AS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
              "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
# Linear layers carry an `_extra_state` (FP8 metadata under TE, None in the local spec) that
# Megatron saves as a sharded object per layer (and per expert); a checkpoint without them does not
# load strictly. Every decoder tensor named `<module>.weight` with one of these endings has one.
_EXTRA_STATE = ("linear_proj.weight", "linear_qkv.weight", "linear_fc1.weight", "linear_fc2.weight")
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class KeyScheme:
    """How global tensors are keyed in a torch_dist checkpoint: decoder layers stacked on a leading
    layer axis (`per_layer` False: dense models) or one key per layer (`per_layer` True: MoE models);
    routed experts on an expert axis of `num_experts`."""

    num_layers: int
    per_layer: bool = False
    num_experts: int = 0

    @classmethod
    def for_model(cls, mcfg: ModelConfig) -> "KeyScheme":
        return cls(mcfg.num_layers, per_layer=mcfg.is_moe, num_experts=mcfg.num_moe_experts or 0)


def sharded_key(name: str, scheme: KeyScheme) -> tuple[str, tuple, tuple]:
    """Megatron parameter name (global layer and expert numbers) → (checkpoint key, leading offsets,
    leading global sizes): the tensor is the chunk at `offsets + (0, ...)` of size `(1, ...) + shape`
    inside the key's global `sizes + shape` (no leading axes outside the decoder layers)."""
    i = layer_index(name)
    if i is None:
        return name, (), ()
    rest = name.split(f"decoder.layers.{i}.", 1)[1]
    rest = _STORED_AS.get(rest, rest)
    offsets, sizes = ((), ()) if scheme.per_layer else ((i,), (scheme.num_layers,))
    m = _EXPERT_RE.match(rest)
    if m:
        rest = "mlp.experts.experts." + rest[m.end():]
        offsets, sizes = offsets + (int(m.group(1)),), sizes + (scheme.num_experts,)
    return (f"decoder.layers.{i}." if scheme.per_layer else "decoder.layers.") + rest, offsets, sizes


def extra_state_key(name: str, scheme: KeyScheme) -> Optional[str]:
    """The DCP key of the `_extra_state` object that goes with decoder tensor `name` (None if it has
    none): `<module>._extra_state/shard_<offsets>_<sizes>` as Megatron's `ShardedObject.unique_key`."""
    if layer_index(name) is None or not name.endswith(_EXTRA_STATE):
        return None
    key, offsets, sizes = sharded_key(name, scheme)
    offsets, sizes = offsets or (0,), sizes or (1,)
    return (f"{key[:-len('.weight')]}._extra_state/shard_{'.'.join(map(str, offsets))}_"
            f"{'.'.join(map(str, sizes))}")


# ---------------------------------------------------------------------------------------------
# model_config.json
# ---------------------------------------------------------------------------------------------


def write_model_config(out_dir: Path, mcfg: ModelConfig, *, tp: int, pp: int, vpp: Optional[int],
                       padded_vocab: int, dtype: str, hf_config: Optional[dict], ep: int = 1,
                       etp: Optional[int] = None) -> None:
    parallel = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                "virtual_pipeline_model_parallel_size": vpp}
    if mcfg.is_moe:
        parallel.update(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    meta = {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(mcfg), "parallel": parallel,
            "padded_vocab_size": padded_vocab, "dtype": dtype, "hf_config": hf_config}
    (Path(out_dir) / MODEL_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def read_model_config(mcore_dir: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the whole model_config.json dict)."""
    path = Path(mcore_dir) / MODEL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a checkpoint written by this converter "
                                "(or by save_model_as_mcore)")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} (expected {FORMAT_VERSION})")
    return ModelConfig(**meta["model"]), meta


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _unwrapped_errors():
    """DCP wraps every error in a CheckpointException; re-raise the original (clearer) one."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        failure = next(iter(e.failures.values()), None)
        original = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(original, BaseException):
            raise original from e
        raise


def _extra_state_bytes() -> io.BytesIO:
    buf = io.BytesIO()
    torch.save([None], buf)  # what Megatron writes for a local-spec layer's (empty) extra state
    buf.seek(0)
    return buf


def _make_planner(items: list, scheme: KeyScheme, produce: Callable, on_tensor: Optional[Callable]):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    class LazySavePlanner(DefaultSavePlanner):
        """Plans every tensor chunk from (name, shape, dtype) alone; makes the data on demand."""

        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.by_index: dict = {}

        def create_local_plan(self) -> SavePlan:
            write_items, extra = [], []
            for name, shape, dtype in items:
                key, lead_offsets, lead_sizes = sharded_key(name, scheme)
                shape = tuple(shape)
                offsets = lead_offsets + (0,) * len(shape)
                sizes = (1,) * len(lead_offsets) + shape
                global_size = lead_sizes + shape
                index = MetadataIndex(key, torch.Size(offsets))
                self.by_index[(key, tuple(offsets))] = (name, torch.Size(sizes))
                write_items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=dtype), size=torch.Size(global_size))))
                fqn = extra_state_key(name, scheme)
                if fqn is not None:
                    extra.append(fqn)
            for fqn in sorted(set(extra)):
                write_items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
            self.plan = SavePlan(write_items)
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return _extra_state_bytes()
            name, sizes = self.by_index[(write_item.index.fqn, tuple(write_item.index.offset))]
            tensor = produce(name).reshape(sizes).contiguous()
            if on_tensor is not None:
                on_tensor(name, tensor)
            return tensor

    return LazySavePlanner()


def write_checkpoint(out_dir: Path, items: list, scheme: KeyScheme, produce: Callable[[str], torch.Tensor],
                     on_tensor: Optional[Callable] = None) -> None:
    """Write a torch_dist checkpoint of `items` = [(megatron name, global shape, dtype)] keyed by
    `scheme` (`KeyScheme.for_model`); `produce(name)` returns that tensor (already in `dtype`) when
    the writer needs it: one tensor (one expert's matrix) at a time."""
    import torch.distributed.checkpoint as dcp

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    planner = _make_planner(items, scheme, produce, on_tensor)
    writer = dcp.FileSystemWriter(str(out_dir), single_file_per_rank=True, thread_count=1, sync_files=False)
    with _unwrapped_errors():
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    torch.save({}, out_dir / "common.pt")
    (out_dir / "metadata.json").write_text(json.dumps(_MEGATRON_METADATA))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class McoreCheckpoint:
    """A torch_dist checkpoint opened for reading one layer (or a few tensors) at a time."""

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"--mcore-dir {self.path}: no such folder")
        for f in ("metadata.json", ".metadata"):
            if not (self.path / f).is_file():
                raise FileNotFoundError(f"--mcore-dir {self.path}: {f} is missing (not a torch_dist "
                                        "dist_checkpointing checkpoint)")
        backend = json.loads((self.path / "metadata.json").read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{self.path}/metadata.json: sharded_backend {backend!r}, only 'torch_dist' is supported")
        self.metadata = FileSystemReader(str(self.path)).read_metadata()
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        # Sizes of the leading axes are not needed to read (offsets are), only the form.
        self.scheme = KeyScheme(0, per_layer=any(re.match(r"decoder\.layers\.\d+\.", k) for k in self.tensors))
        for info in self.metadata.storage_data.values():
            f = self.path / info.relative_path
            if not f.is_file() or f.stat().st_size < info.offset + info.length:
                raise ValueError(f"{f}: missing or truncated (needs {info.offset + info.length} bytes)")

    def shape(self, name: str) -> tuple:
        """Global shape of a Megatron tensor (without the layer and expert axes)."""
        key, offsets, _ = sharded_key(name, self.scheme)
        if key not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {key!r} (for {name})")
        size = tuple(self.tensors[key].size)
        if any(o >= s for o, s in zip(offsets, size)):
            raise KeyError(f"{self.path}: {key} has leading sizes {size[:len(offsets)]}, no index {offsets} "
                           f"(for {name})")
        return size[len(offsets):]

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[sharded_key(name, self.scheme)[0]].properties.dtype

    def read(self, names: list) -> dict:
        """{name: tensor} for Megatron tensor names whose checkpoint keys are distinct."""
        import torch.distributed.checkpoint as dcp

        chunks, dests, out = {}, {}, {}
        for name in names:
            key, offsets, _ = sharded_key(name, self.scheme)
            if key in chunks:
                raise ValueError(f"read(): {name} shares key {key} with another requested tensor")
            shape = self.shape(name)
            chunks[key] = (offsets + (0,) * len(shape), (1,) * len(offsets) + shape)
            dests[key] = torch.empty(chunks[key][1], dtype=self.dtype(name))
            out[name] = dests[key]
        with _unwrapped_errors():
            dcp.load(dests, storage_reader=dcp.FileSystemReader(str(self.path)),
                     planner=_chunk_load_planner(chunks), no_dist=True)
        return {n: t.reshape(self.shape(n)) for n, t in out.items()}


def _chunk_load_planner(chunks: dict):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
    from torch.distributed._shard._utils import narrow_tensor_by_index

    class ChunkLoadPlanner(DefaultLoadPlanner):
        """Reads one sub-block (`chunks[key] = (offsets, sizes)`) of each requested global tensor."""

        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (offsets, sizes) in chunks.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            return narrow_tensor_by_index(self.state_dict[read_item.dest_index.fqn], read_item.dest_offsets,
                                          read_item.lengths)

    return ChunkLoadPlanner()


# ---------------------------------------------------------------------------------------------
# Trainer helpers (collective: call on every rank)
# ---------------------------------------------------------------------------------------------


def sharded_state_dict(model_chunks: list) -> dict:
    """The dist-checkpoint state dict of bare model chunks: `{"model": ...}` for one chunk,
    `{"model<i>": ...}` per virtual pipeline stage (the keys `load_mcore_into_model` expects).
    An MoE model is keyed per layer (`KeyScheme`: Megatron's non-homogeneous form, asked for
    explicitly so the keys do not depend on whether every layer is MoE)."""
    moe = bool(getattr(model_chunks[0].config, "num_moe_experts", None))
    meta = {"non_homogeneous_layers": True} if moe else None

    def one(chunk):
        return chunk.sharded_state_dict(metadata=meta) if moe else chunk.sharded_state_dict()

    if len(model_chunks) == 1:
        return {"model": one(model_chunks[0])}
    return {f"model{i}": one(chunk) for i, chunk in enumerate(model_chunks)}


def load_mcore_into_model(model_chunks: list, mcore_dir: str | Path) -> None:
    """Load a torch_dist checkpoint (from this converter or `save_model_as_mcore`) into this rank's
    model chunks, whatever their TP/PP/VPP layout. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    chunks = unwrap(model_chunks)
    McoreCheckpoint(mcore_dir)  # clear errors for a missing/truncated checkpoint before collectives
    state = dist_checkpointing.load(sharded_state_dict(chunks), str(mcore_dir))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"], strict=True)


def save_model_as_mcore(model_chunks: list, out_dir: str | Path, model_config: ModelConfig, groups,
                        hf_config: Optional[dict] = None) -> None:
    """Save this rank's model chunks as one torch_dist checkpoint plus `model_config.json`, loadable
    by `load_mcore_into_model` at any layout and by `mcore-to-hf`. `groups`: the run's
    `ParallelGroups` (the layout recorded in the config). Collective over all ranks."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir)
    chunks = unwrap(model_chunks)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(sharded_state_dict(chunks), str(out_dir))
    if rank0:
        emb = McoreCheckpoint(out_dir).shape("embedding.word_embeddings.weight")
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(chunks[0].config.params_dtype, "fp32")
        cfg = chunks[0].config
        write_model_config(out_dir, model_config, tp=groups.tp_size, pp=groups.pp_size,
                           vpp=len(chunks) if len(chunks) > 1 else None, padded_vocab=emb[0],
                           dtype=dtype, hf_config=hf_config, ep=getattr(cfg, "expert_model_parallel_size", 1),
                           etp=getattr(cfg, "expert_tensor_parallel_size", None))
    if dist.is_initialized():
        dist.barrier()
