"""The tpu backend for Google TPUs (XLA): discovery only so far.

It reports whether its hardware and vendor library are here. Its kernels (attention over the paged
KV cache, KV-cache layout, device set-up) are not written yet, so where the hardware is found the
registry lists it as "incomplete" and never chooses it.
"""

from __future__ import annotations

from tokenmill.hookspecs import hookimpl
from tokenmill.interfaces import Discovery
from tokenmill.plugins.tpu import discover as _discover


@hookimpl
def tokenmill_discover() -> Discovery:
    return _discover.discover()
