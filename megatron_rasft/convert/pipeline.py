"""The three conversions (HF → Megatron, Megatron → HF, Megatron → Megatron), streaming.

No model is built and no process group is needed: tensors go from the source files through the
name map (`names.py`) to the output, one tensor (or one decoder layer's non-expert tensors; routed
experts one matrix at a time) at a time, so peak memory is bounded by the largest tensor or layer,
not by the model or the number of experts. Outputs are written into a temporary folder beside
the target, verified (every expected tensor, with its shape), then renamed into place; on any error
the temporary folder is removed and the target is left as it was.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_rasft.convert import hf_io, mcore_io, names
from megatron_rasft.model.provider import padded_vocab_size
from megatron_rasft.records import replace_dir


@dataclass
class Summary:
    what: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    largest_tensor_bytes: int = 0
    out: str = ""
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        gbs = self.bytes / max(self.seconds, 1e-9) / 1e9
        return (f"{self.what}: {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f}s "
                f"({gbs:.2f} GB/s), peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB, largest tensor "
                f"{self.largest_tensor_bytes / 2**20:.1f} MiB → {self.out}")


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux's VmHWM belongs to the current address space
    (ru_maxrss survives exec, so a child started from a big parent would report the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class _Progress:
    """tqdm over bytes with a tensor count; silent when `quiet`."""

    def __init__(self, total_bytes: int, what: str, quiet: bool):
        self.summary = Summary(what)
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what, dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def update(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        self.summary.tensors += 1
        self.summary.bytes += n
        self.summary.largest_tensor_bytes = max(self.summary.largest_tensor_bytes, n)
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(tensors=self.summary.tensors, refresh=False)

    def done(self, out: Path) -> Summary:
        if self.bar is not None:
            self.bar.close()
        self.summary.seconds = time.perf_counter() - self.t0
        self.summary.peak_rss_bytes = peak_rss_bytes()
        self.summary.out = str(out)
        return self.summary


@contextlib.contextmanager
def staged_output(out: Path, force: bool, flag: str = "--out"):
    """Yield a fresh temporary folder beside `out`; on success it replaces `out`, on error it goes."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{flag} {out} exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in hf_io.DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(hf_io.DTYPES)}, got {name!r}")
    return hf_io.DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in hf_io.DTYPES.items()}.get(dtype, str(dtype))


def _check_hf_tensors(hf: hf_io.HFCheckpoint, ctx: names.MapContext, entries: list) -> None:
    """Every expected tensor is there with the shape the config implies; nothing is left over."""
    expected = names.hf_shapes(ctx, entries)
    have = set(hf.names())
    missing = [n for n in expected if n not in have]
    if missing:
        raise ValueError(f"{hf.path}: {len(missing)} tensor(s) the config implies are missing, e.g. {missing[:3]}")
    for n, shape in expected.items():
        if hf.shape(n) != shape:
            raise ValueError(f"{hf.path}: {n} has shape {hf.shape(n)} but config.json implies {shape}")
    extra = sorted(have - set(expected))
    if ctx.mcfg.tie_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]  # some tied checkpoints store the copy
    extra = [n for n in extra if not n.endswith("rotary_emb.inv_freq")]  # a buffer, recomputed
    if extra:
        raise ValueError(f"{hf.path}: tensor(s) not covered by the name map (unsupported variant?): {extra[:5]}")


def hf_to_mcore(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                ep: int = 1, etp: Optional[int] = None, dtype: Optional[str] = None, force: bool = False,
                quiet: bool = False) -> Summary:
    """HF folder → torch_dist checkpoint + model_config.json (default layout tp/pp/vpp/ep/etp
    recorded; the tensors themselves are layout-agnostic). Raises ValueError / FileNotFoundError
    for bad input (names the file, tensor, field or flag) before anything is written."""
    hf = hf_io.HFCheckpoint(hf_dir)
    mcfg = names.model_config_from_hf(hf.config)
    names.validate_parallel(mcfg, tp, pp, vpp, ep, etp)
    target = _dtype(dtype)
    ctx = names.MapContext(mcfg, padded_vocab_size(mcfg, tp))
    entries = names.entries(mcfg)
    _check_hf_tensors(hf, ctx, entries)
    by_name = {e.mcore: e for e in entries}
    shapes = names.mcore_shapes(ctx)
    src_dtypes = {e.mcore: hf.get_dtype(e.hf[0]) for e in entries}
    items = [(e.mcore, shapes[e.mcore], target or src_dtypes[e.mcore]) for e in entries]
    progress = _Progress(sum(hf_io.numel(s) * torch.empty((), dtype=d).element_size() for _, s, d in items),
                         "hf-to-mcore", quiet)

    def produce(name: str) -> torch.Tensor:
        e = by_name[name]
        t = e.to_mcore([hf.get(n) for n in e.hf], ctx)
        return t.to(target) if target is not None else t

    with staged_output(Path(out), force) as tmp:
        mcore_io.write_checkpoint(tmp, items, mcore_io.KeyScheme.for_model(mcfg), produce,
                                  on_tensor=progress.update)
        hf.close()
        _verify_mcore(tmp, items)
        stored = target or src_dtypes[entries[0].mcore]
        mcore_io.write_model_config(tmp, mcfg, tp=tp, pp=pp, vpp=vpp, padded_vocab=ctx.padded_vocab,
                                    dtype=_dtype_name(stored), hf_config=hf.config, ep=ep, etp=etp)
        hf_io.write_side_files(tmp / "hf_extras", hf.config, hf.path)
        (tmp / "hf_extras" / "config.json").unlink()  # model_config.json holds it
    return progress.done(Path(out))


def _verify_mcore(path: Path, items: list) -> None:
    ck = mcore_io.McoreCheckpoint(path)
    for name, shape, dtype in items:
        if ck.shape(name) != tuple(shape) or ck.dtype(name) != dtype:
            raise RuntimeError(f"{path}: {name} stored as {ck.shape(name)} {ck.dtype(name)}, "
                               f"expected {tuple(shape)} {dtype}")


def _layer_groups(entries: list) -> list:
    """Consecutive entries of one layer (or the globals before/after the layers) grouped, so each
    group reads one DCP slice per key and keeps the HF write order; every routed expert's matrix is
    a group of its own (read alone: memory does not grow with the number of experts)."""
    import itertools

    return [list(g) for _, g in itertools.groupby(
        entries, key=lambda e: (e.layer, None) if e.expert is None else (e.layer, e.mcore))]


def mcore_to_hf(mcore_dir: str | Path, out: str | Path, *, hf_config_from: Optional[str | Path] = None,
                dtype: Optional[str] = None, max_shard_size: str = "5GB", force: bool = False,
                quiet: bool = False) -> Summary:
    """torch_dist checkpoint → HF folder (sharded safetensors + index, config, tokenizer files)."""
    mcore_dir = Path(mcore_dir)
    ck = mcore_io.McoreCheckpoint(mcore_dir)
    mcfg, meta = mcore_io.read_model_config(mcore_dir)
    target = _dtype(dtype)
    ctx = names.MapContext(mcfg, ck.shape("embedding.word_embeddings.weight")[0])
    entries = names.entries(mcfg)
    for e in entries:
        ck.shape(e.mcore)  # KeyError naming the tensor if the checkpoint lacks it
    hf_shapes = names.hf_shapes(ctx, entries)
    plan = [(n, hf_shapes[n], target or ck.dtype(e.mcore)) for e in entries for n in e.hf]
    base = meta.get("hf_config")
    side_src = mcore_dir / "hf_extras"
    if hf_config_from is not None:
        base = hf_io.HFCheckpoint.read_config(Path(hf_config_from))
        side_src = Path(hf_config_from)
    out_dtype = target or ck.dtype(entries[0].mcore)
    hf_config = names.hf_config_from_model_config(mcfg, base=base, dtype=hf_io.DTYPE_NAMES.get(out_dtype))
    total = sum(hf_io.numel(s) * torch.empty((), dtype=d).element_size() for _, s, d in plan)
    progress = _Progress(total, "mcore-to-hf", quiet)
    with staged_output(Path(out), force) as tmp:
        writer = hf_io.ShardedWriter(tmp, plan, hf_io.parse_size(max_shard_size))
        try:
            # Order: a group's HF tensors come out in plan order because entries are in plan order.
            for group in _layer_groups(entries):
                tensors = ck.read([e.mcore for e in group])
                for e in group:
                    for n, t in e.to_hf(tensors[e.mcore], ctx).items():
                        t = t.to(target) if target is not None else t
                        writer.write(n, t)
                        progress.update(n, t)
                del tensors
        finally:
            writer.abort()
        shards = writer.finish()
        hf_io.write_index(tmp, shards, writer.bytes_written)
        hf_io.write_side_files(tmp, hf_config, side_src if side_src.is_dir() else None)
    return progress.done(Path(out))


def reshard(mcore_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
            ep: int = 1, etp: Optional[int] = None, dtype: Optional[str] = None, force: bool = False,
            quiet: bool = False) -> Summary:
    """Rewrite a torch_dist checkpoint for a new default layout: the tensors are layout-agnostic, so
    this validates the layout (TP/PP/VPP/EP/expert TP), re-pads the vocabulary for the new TP and
    streams every tensor (one expert matrix at a time)."""
    mcore_dir = Path(mcore_dir)
    ck = mcore_io.McoreCheckpoint(mcore_dir)
    mcfg, meta = mcore_io.read_model_config(mcore_dir)
    names.validate_parallel(mcfg, tp, pp, vpp, ep, etp)
    target = _dtype(dtype)
    old_ctx = names.MapContext(mcfg, ck.shape("embedding.word_embeddings.weight")[0])
    ctx = names.MapContext(mcfg, padded_vocab_size(mcfg, tp))
    entries = names.entries(mcfg)
    shapes = names.mcore_shapes(ctx)
    items = [(e.mcore, shapes[e.mcore], target or ck.dtype(e.mcore)) for e in entries]
    by_name = {e.mcore: e for e in entries}
    progress = _Progress(sum(hf_io.numel(s) * torch.empty((), dtype=d).element_size() for _, s, d in items),
                         "reshard", quiet)

    def produce(name: str) -> torch.Tensor:
        t = ck.read([name])[name]
        if by_name[name].rule.to_mcore is names.pad_vocab:  # re-pad: trim to the real vocab, pad again
            t = names.pad_vocab(list(by_name[name].to_hf(t, old_ctx).values()), ctx)
        return t.to(target) if target is not None else t

    with staged_output(Path(out), force) as tmp:
        mcore_io.write_checkpoint(tmp, items, mcore_io.KeyScheme.for_model(mcfg), produce,
                                  on_tensor=progress.update)
        _verify_mcore(tmp, items)
        stored = target or ck.dtype(entries[0].mcore)
        mcore_io.write_model_config(tmp, mcfg, tp=tp, pp=pp, vpp=vpp, padded_vocab=ctx.padded_vocab,
                                    dtype=_dtype_name(stored), hf_config=meta.get("hf_config"), ep=ep, etp=etp)
        if (mcore_dir / "hf_extras").is_dir():
            shutil.copytree(mcore_dir / "hf_extras", tmp / "hf_extras")
    return progress.done(Path(out))
