"""Where the peers are built and installed: outside the repo, once per machine."""

import os
from pathlib import Path


def bench_cache() -> Path:
    """The peers' home: $TOKENMILL_BENCH_CACHE, else ~/.cache/tokenmill-bench."""
    root = Path(os.environ.get("TOKENMILL_BENCH_CACHE", Path.home() / ".cache" / "tokenmill-bench"))
    root.mkdir(parents=True, exist_ok=True)
    return root
