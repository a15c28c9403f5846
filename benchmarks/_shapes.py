"""Command-line flags for the tiny Llama-shaped model that the CPU step benchmarks share."""


def add_model_args(p, *, seq: int = 256, global_batch: int = 8, micro_batch: int = 2) -> None:
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--global-batch", type=int, default=global_batch)
    p.add_argument("--micro-batch", type=int, default=micro_batch)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, one repeat: checks in seconds that the script still runs (numbers meaningless)")


# `--smoke`: the smallest model the code paths accept (head dim 16, two micro-batches per step).
SMOKE_MODEL = dict(layers=1, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=256, seq=32, global_batch=4,
                   micro_batch=2)
