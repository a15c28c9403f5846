#!/usr/bin/env python
"""Convert checkpoints between Hugging Face safetensors and Megatron-Core dist_checkpointing.

  convert_checkpoint.py hf-to-mcore --hf-dir HF --out MCORE --tp T --pp P [--vpp V] [--ep E [--etp ET]] [--dtype bf16|fp16|fp32]
  convert_checkpoint.py mcore-to-hf --mcore-dir MCORE --out HF2 [--hf-config-from HF] [--dtype ...] [--max-shard-size 5GB]
  convert_checkpoint.py reshard --mcore-dir MCORE --out MCORE2 --tp T2 --pp P2 [--vpp V2] [--ep E2 [--etp ET2]]

One process, no process group, no model built: tensors stream one at a time (one decoder layer at
a time towards HF; mixture-of-experts experts one matrix at a time), so peak memory does not grow
with the model or the number of experts. The Megatron checkpoint is layout-agnostic (Megatron
reshards on load, experts included); --tp/--pp/--vpp/--ep/--etp are validated and recorded in
MCORE/model_config.json as the default layout (and --tp sets the vocabulary padding). mcore-to-hf
reads a checkpoint written at any layout, so it takes no layout flags. See docs/conversion.md.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    dtype = dict(choices=("bf16", "fp16", "fp32"), default=None,
                 help="cast the weights (default: keep the source dtype)")
    ep = dict(type=int, default=1, help="expert parallelism of a mixture-of-experts model: each of E ranks "
                                        "holds num_experts / E whole experts (must divide num_experts)")
    etp = dict(type=int, default=None, help="expert tensor parallelism: each expert's matrices split over "
                                            "this many ranks (default: --tp; must divide moe_intermediate_size)")
    a = sub.add_parser("hf-to-mcore", help="HF folder → Megatron torch_dist checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--vpp", type=int, default=None)
    a.add_argument("--ep", **ep)
    a.add_argument("--etp", **etp)
    a.add_argument("--dtype", **dtype)
    b = sub.add_parser("mcore-to-hf", help="Megatron torch_dist checkpoint → HF folder")
    b.add_argument("--mcore-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--hf-config-from", default=None,
                   help="HF folder whose config.json and tokenizer files to use (default: those saved "
                        "beside the Megatron checkpoint)")
    b.add_argument("--dtype", **dtype)
    b.add_argument("--max-shard-size", default="5GB")
    c = sub.add_parser("reshard", help="rewrite a Megatron checkpoint for another default layout")
    c.add_argument("--mcore-dir", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.add_argument("--vpp", type=int, default=None)
    c.add_argument("--ep", **ep)
    c.add_argument("--etp", **etp)
    c.add_argument("--dtype", **dtype)
    for s in (a, b, c):
        s.add_argument("--force", action="store_true", help="replace a non-empty --out")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rasft.convert import pipeline

    common = dict(dtype=args.dtype, force=args.force, quiet=args.quiet)
    try:
        if args.cmd == "hf-to-mcore":
            s = pipeline.hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                                     etp=args.etp, **common)
        elif args.cmd == "mcore-to-hf":
            s = pipeline.mcore_to_hf(args.mcore_dir, args.out, hf_config_from=args.hf_config_from,
                                     max_shard_size=args.max_shard_size, **common)
        else:
            s = pipeline.reshard(args.mcore_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                                 etp=args.etp, **common)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(s.line())
    return 0


if __name__ == "__main__":  # required: the checkpoint writer may start processes
    sys.exit(main())
