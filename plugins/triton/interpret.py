"""What the kernels' launchers share: whether Triton runs in its CPU interpreter, and tile sizing."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter on CPU tensors (``TRITON_INTERPRET=1``).

    The interpreter is how the kernels are tested without a GPU; its `tl.dot` is wrong on bfloat16
    operands (Triton 3.9), so the attention launchers upcast those to float32 when this is true.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n: `tl.arange` extents must be powers of two."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
