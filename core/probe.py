"""Cheap, exception-safe probes for `tokenmill_discover` implementations.

They answer "is this installed?" and "is this device file there?" without importing the vendor
library, so discovery stays fast and cannot initialise a device in the launcher process.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util


def module_available(name: str) -> bool:
    """Whether `name` could be imported, without importing it (a broken parent counts as no)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (a pip package name), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions_of(*distributions: str) -> dict[str, str]:
    """`{name: version}` for the given distributions, "not installed" for the missing ones."""
    return {name: installed_version(name) or "not installed" for name in distributions}


def device_files(*patterns: str) -> list[str]:
    """Device nodes matching any of the glob `patterns` (e.g. "/dev/neuron*"), sorted."""
    return sorted({path for pattern in patterns for path in glob.glob(pattern)})
