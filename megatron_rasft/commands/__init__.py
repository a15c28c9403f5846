"""Sub-commands of `python -m megatron_rasft`; one module each (see megatron_rasft/cli.py)."""
import sys


def error(message) -> None:
    """Print `error: <message>` on stderr: the one line every command prints for input it refuses
    or a failure it stops on (its exit code says which)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
