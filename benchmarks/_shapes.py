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
