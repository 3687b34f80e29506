"""tokenmill: a hardware-agnostic LLM serving engine whose backends are pluggy plugins."""

from tokenmill.hookspecs import ENTRY_POINT_GROUP, hookimpl, hookspec

__version__ = "0.1.0"

__all__ = ["ENTRY_POINT_GROUP", "__version__", "hookimpl", "hookspec"]
