"""Sub-commands of `python -m megatron_rasft`; one module each (see megatron_rasft/cli.py)."""
