"""Streaming Hugging Face safetensors I/O: read one tensor at a time, write shards as tensors come.

Writing streams because every tensor's name, shape and dtype are known before its data (they are
planned from the config), so each shard's safetensors header is written first and the tensor
bytes are appended one by one: peak memory is one tensor, whatever the shard size.

Reading understands both forms of mixture-of-experts weights: the per-expert Hub names
(`mlp.experts.{j}.{gate,up,down}_proj.weight`, what transformers' `save_pretrained` writes) and
transformers' fused in-memory tensors (`mlp.experts.gate_up_proj [E, 2I, H]`, rows `[gate; up]` per
expert, and `mlp.experts.down_proj [E, H, I]`), which are presented under the per-expert names and
read one expert's matrix at a time (a byte range of the fused tensor).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Iterable, Optional

import torch

INDEX = "model.safetensors.index.json"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_FUSED_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
_PER_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.\d+\.(gate|up|down)_proj\.weight$")


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '123' → bytes (decimal units, like transformers' max_shard_size)."""
    text = str(text).strip().upper()
    for unit, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def read_header(path: Path) -> dict:
    """The safetensors header of `path` (name → {dtype, shape, data_offsets}), checked against the
    file size so a truncated file is reported here, not deep inside a load."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(f"{path}: truncated or padded safetensors file: header promises "
                         f"{8 + n + end} bytes, file has {size}")
    return header


class HFCheckpoint:
    """A Hugging Face checkpoint folder opened for reading one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"--hf-dir {self.path}: no such folder")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"--hf-dir {self.path}: config.json is missing")
        try:
            self.config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg}: invalid JSON: {e}") from e
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not weight_map:
                raise ValueError(f"{index}: no weight_map")
        elif (self.path / "model.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"--hf-dir {self.path}: neither {INDEX} nor model.safetensors "
                                    "(only safetensors checkpoints are supported)")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.headers = {}
        for name in files:
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path / name}: listed in {INDEX} but missing")
            self.headers[name] = read_header(self.path / name)
        self.file_of = {t: f for f, h in self.headers.items() for t in h}
        if weight_map:
            for t, f in weight_map.items():
                if self.file_of.get(t) != f:
                    raise ValueError(f"{INDEX}: {t} is mapped to {f} but that file does not hold it")
        self._handles: dict = {}
        # per-expert name -> (fused tensor, element offset, shape)
        self.views: dict = {}
        self.views = self._fused_expert_views()

    def _fused_expert_views(self) -> dict:
        """Per-expert views of fused expert tensors. Raises ValueError when a layer mixes the fused
        and per-expert forms, has only one of the two fused tensors, or when their shapes disagree
        with each other or with config.json's `num_experts`."""
        fused: dict = {}
        for n in self.file_of:
            m = _FUSED_RE.match(n)
            if m:
                fused.setdefault(m["prefix"], {})[m["kind"]] = n
        if not fused:
            return {}
        per_expert = {m["prefix"] for n in self.file_of if (m := _PER_EXPERT_RE.match(n))}
        want = self.config.get("num_experts", self.config.get("num_local_experts"))
        views = {}
        for prefix, kinds in sorted(fused.items()):
            if prefix in per_expert:
                raise ValueError(f"{self.path}: {prefix} has both fused ({', '.join(sorted(kinds.values()))}) and "
                                 f"per-expert ({prefix}.{{j}}.*_proj.weight) tensors: use one form per layer")
            if len(kinds) != 2:
                raise ValueError(f"{self.path}: {next(iter(kinds.values()))} is fused but its partner "
                                 f"{prefix}.{'down_proj' if 'gate_up_proj' in kinds else 'gate_up_proj'} is missing")
            gate_up, down = self.shape(kinds["gate_up_proj"]), self.shape(kinds["down_proj"])
            if len(gate_up) != 3 or gate_up[1] % 2:
                raise ValueError(f"{self.path}: {kinds['gate_up_proj']} has shape {gate_up}, expected "
                                 "[num_experts, 2 × moe_intermediate_size, hidden_size]")
            e, two_i, h = gate_up
            i = two_i // 2
            if want is not None and e != want:
                raise ValueError(f"{self.path}: {kinds['gate_up_proj']} holds {e} experts but config.json has "
                                 f"num_experts = {want}")
            if down != (e, h, i):
                raise ValueError(f"{self.path}: {kinds['down_proj']} has shape {down} but {kinds['gate_up_proj']} "
                                 f"{gate_up} implies [num_experts, hidden_size, moe_intermediate_size] = {(e, h, i)}")
            for j in range(e):
                views[f"{prefix}.{j}.gate_proj.weight"] = (kinds["gate_up_proj"], j * two_i * h, (i, h))
                views[f"{prefix}.{j}.up_proj.weight"] = (kinds["gate_up_proj"], j * two_i * h + i * h, (i, h))
                views[f"{prefix}.{j}.down_proj.weight"] = (kinds["down_proj"], j * h * i, (h, i))
        return views

    def names(self) -> list:
        """Tensor names, fused expert tensors listed under their per-expert names."""
        fused = {src for src, _, _ in self.views.values()}
        return [n for n in self.file_of if n not in fused] + list(self.views)

    def shape(self, name: str) -> tuple:
        if name in self.views:
            return tuple(self.views[name][2])
        return tuple(self.headers[self.file_of[name]][name]["shape"])

    def get_dtype(self, name: str) -> torch.dtype:
        name = self.views[name][0] if name in self.views else name
        return _FROM_ST[self.headers[self.file_of[name]][name]["dtype"]]

    @staticmethod
    def read_config(path: Path) -> dict:
        cfg = Path(path) / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{cfg}: no config.json")
        return json.loads(cfg.read_text())

    def nbytes(self) -> int:
        return sum(v["data_offsets"][1] - v["data_offsets"][0] for h in self.headers.values() for v in h.values())

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor with plain file reads (not mmap: mapped pages of every tensor read would
        stay resident and make the peak RSS grow with the model)."""
        view = self.views.get(name)
        source = view[0] if view else name
        if source not in self.file_of:
            raise KeyError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        f = self.file_of[source]
        if f not in self._handles:
            handle = open(self.path / f, "rb")
            (n,) = struct.unpack("<Q", handle.read(8))
            self._handles[f] = (handle, 8 + n)
        handle, data_start = self._handles[f]
        info = self.headers[f][source]
        dtype = _FROM_ST[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = info["shape"]
        if view:  # one expert's matrix: a contiguous byte range of the fused tensor
            item = torch.empty((), dtype=dtype).element_size()
            begin, shape = begin + view[1] * item, view[2]
            end = begin + numel(shape) * item
        buf = bytearray(end - begin)
        handle.seek(data_start + begin)
        if handle.readinto(buf) != len(buf):
            raise ValueError(f"{self.path / f}: short read for {name} (file truncated while reading?)")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        for handle, _ in self._handles.values():
            handle.close()
        self._handles.clear()


class ShardedWriter:
    """Write a planned list of tensors as safetensors shards, streaming one tensor at a time.

    `plan` is `[(name, shape, dtype)]` in write order; `write(name, tensor)` must follow it.
    Shards are named `{prefix}-{k:05d}.safetensors`; `finish()` checks every file and returns
    `[(file, [names])]` for `write_index`."""

    def __init__(self, out_dir: Path, plan: list, max_shard_bytes: int, prefix: str = "part"):
        self.out_dir = Path(out_dir)
        self.shards: list = []  # [(file, [(name, shape, dtype)])]
        size = 0
        for name, shape, dtype in plan:
            nbytes = numel(shape) * torch.empty((), dtype=dtype).element_size()
            if not self.shards or (size + nbytes > max_shard_bytes and size > 0):
                self.shards.append((f"{prefix}-{len(self.shards) + 1:05d}.safetensors", []))
                size = 0
            self.shards[-1][1].append((name, tuple(shape), dtype))
            size += nbytes
        self._queue = [(s, i) for s, (_, items) in enumerate(self.shards) for i in range(len(items))]
        self._pos = 0
        self._file = None
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        s, i = self._queue[self._pos]
        fname, items = self.shards[s]
        want_name, want_shape, want_dtype = items[i]
        if name != want_name or tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
            raise ValueError(f"writer expected {want_name} {want_shape} {want_dtype}, got {name} "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        if i == 0:
            self._file = open(self.out_dir / fname, "wb")
            self._file.write(_header_bytes(items))
        data = tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self.bytes_written += data.nbytes
        self._pos += 1
        if i == len(items) - 1:
            self._file.close()
            self._file = None

    def finish(self) -> list:
        if self._pos != len(self._queue):
            missing = [self.shards[s][1][i][0] for s, i in self._queue[self._pos:]]
            raise RuntimeError(f"{len(missing)} tensor(s) were never written, e.g. {missing[:3]}")
        for fname, items in self.shards:
            header = read_header(self.out_dir / fname)
            for name, shape, dtype in items:
                got = header.get(name)
                if got is None or tuple(got["shape"]) != shape or got["dtype"] != _ST_DTYPES[dtype]:
                    raise RuntimeError(f"{fname}: {name} missing or wrong after writing: {got}")
        return [(f, [n for n, _, _ in items]) for f, items in self.shards]

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()


def numel(shape: Iterable[int]) -> int:
    """Number of elements of a tensor of this shape (1 for `()`)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _header_bytes(items: list) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in items:
        nbytes = numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_index(out_dir: Path, shards: list, total_size: int) -> dict:
    """Rename shard files to `model-0000k-of-0000n.safetensors` (in the given order) and write
    `model.safetensors.index.json`; returns the weight map."""
    out_dir = Path(out_dir)
    n = len(shards)
    weight_map = {}
    for k, (fname, names) in enumerate(shards, start=1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        os.replace(out_dir / fname, out_dir / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def write_side_files(out_dir: Path, hf_config: dict, src_dir: Optional[Path] = None) -> None:
    """`config.json`, `generation_config.json` and tokenizer files (copied from `src_dir`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if src_dir is not None and Path(src_dir).is_dir():
        for f in Path(src_dir).iterdir():
            if (f.is_file() and f.name not in ("config.json", INDEX) and not f.name.endswith(_WEIGHT_SUFFIXES)
                    and not f.name.startswith(".")):
                shutil.copy2(f, out_dir / f.name)
    if not (out_dir / "generation_config.json").exists():
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
