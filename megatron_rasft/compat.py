"""Which Megatron-Core this process runs against, and what that version needs.

The supported range is declared once here and in `setup.py` (`megatron-core>=0.16.1,<0.20`).
Code whose behaviour depends on the Megatron-Core release asks `mcore_at_least(...)` instead of
probing with `try/except ImportError`, so that an unsupported install fails with one clear message.
Only the standard library and `packaging` are imported at module level: `import megatron_rasft`
must not import megatron-core.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

from packaging.version import Version

MCORE_MIN = Version("0.16.1")
MCORE_BELOW = Version("0.20")
# megatron-core 0.17 and later import triton at module level (megatron/core/transformer/moe and
# megatron/core/inference); CUDA builds of torch bring it, CPU builds do not.
MCORE_NEEDS_TRITON = Version("0.17")


@functools.lru_cache(maxsize=None)
def mcore_version() -> Version:
    """The installed megatron-core release. Raises RuntimeError when it is not installed."""
    try:
        return Version(importlib.metadata.version("megatron-core"))
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("megatron-core is not installed: `pip install 'megatron-core>=0.16.1,<0.20'` "
                           "(see docs/install.md, 'Supported versions')") from None


def mcore_at_least(version: str) -> bool:
    """Whether the installed megatron-core is `version` or newer (compares release numbers)."""
    return mcore_version().release >= Version(version).release


def check_megatron() -> Version:
    """Refuse a megatron-core outside the supported range, or one that cannot import here.

    Returns the installed version. Raises RuntimeError naming the version and the fix."""
    v = mcore_version()
    if not MCORE_MIN.release <= v.release < MCORE_BELOW.release:
        raise RuntimeError(f"megatron-core {v} is outside the supported range >={MCORE_MIN},<{MCORE_BELOW} "
                           f"(see docs/install.md, 'Supported versions')")
    if mcore_at_least(str(MCORE_NEEDS_TRITON)) and importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"megatron-core {v} imports triton, which is not installed: `pip install triton` "
                           f"(CUDA builds of torch bring it; CPU builds do not)")
    return v
