"""The one door to Intel Gaudi's software stack (habana_frameworks): imported late, failing clearly.

habana_frameworks is not on PyPI (it comes with Intel's Gaudi software, SynapseAI), so it is imported
only inside the hooks that need the device: discovery never imports it, and every module of this plugin
loads, and its torch-native parts run, on a machine without it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = ("habana_frameworks comes with Intel Gaudi's software stack (habana-torch-plugin), which is not "
                "on PyPI: install it from Intel's Gaudi installation guide, or run in Intel's Gaudi PyTorch container")


def module(name: str) -> ModuleType:
    """Import `name` (a ``habana_frameworks`` module), or raise a RuntimeError saying how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise RuntimeError(f"the gaudi backend needs {name}, which cannot be imported ({error}). "
                           f"{INSTALL_HINT}") from error
