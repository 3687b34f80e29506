"""A GGUF's config kept as JSON under the cache dir, so that a later start skips transformers' config classes.

Importing any of transformers' model config classes costs about 1 s of a start: the scan of every
model's module (`transformers.models`' import structure) and `transformers.activations`, which its
config validators import and which pulls in `torch.distributed.tensor` and sympy. A cached config comes
back as transformers' base `PreTrainedConfig` holding every field the family's class gave it (defaults
and derived fields included, aliases as fields): tokenmill's models read fields, never the class's own
attributes (its tensor-parallel plans, `default_theta`). `tests/loader/
test_gguf_families.py` checks, for every GGUF family, that the restored config answers each public
attribute as the class did and that the model generates the same tokens.

The key covers what the config derives from: the GGUF file (path, size, mtime), the transformers and
tokenmill versions, and the code that reads a GGUF's metadata into a config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import tokenmill

logger = logging.getLogger(__name__)

ENTRY_DIR = "gguf-configs"
_DERIVING_CODE = ("gguf_loader.py", "gguf_families.py", "gguf_config_cache.py")


def cached_gguf_config(path: Path, cache_dir: Path | None, build: Callable[[], Any]) -> Any:
    """The config of the GGUF at `path`: restored from `cache_dir` when a start wrote it there, else `build()`
    (and written there, when there is a cache dir)."""
    if cache_dir is None:
        return build()
    entry = _entry(path, Path(cache_dir).expanduser())
    if entry.is_file():
        try:
            return _restore(json.loads(entry.read_text()))
        except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never fatal
            logger.warning("rebuilding the cached config %s: %r", entry, exc)
    config = build()
    # A class's aliases (Mixtral's `num_experts` for `num_local_experts`) kept as fields of their own.
    aliases = {alias: getattr(config, alias) for alias in type(config).attribute_map}
    _write(entry, json.dumps({**config.to_dict(), **aliases}, indent=1, sort_keys=True))
    return config


def _restore(fields: dict[str, Any]) -> Any:
    from transformers.configuration_utils import PreTrainedConfig

    if any(isinstance(value, dict) and "model_type" in value for value in fields.values()):
        raise ValueError("a config with sub-configs is not restored as one flat config")
    return PreTrainedConfig(**fields)


def _entry(path: Path, cache_dir: Path) -> Path:
    import transformers

    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|"
                            f"{tokenmill.__version__}|".encode())
    here = Path(__file__).parent
    for name in _DERIVING_CODE:
        digest.update((here / name).read_bytes())
    return cache_dir / ENTRY_DIR / f"{digest.hexdigest()[:32]}.json"


def _write(entry: Path, text: str) -> None:
    """Written to a temporary file and renamed into place: a concurrent reader never sees half of it."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=entry.parent, suffix=".partial")
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(partial, entry)
    except OSError as exc:
        logger.warning("could not cache the config in %s: %r", entry, exc)
