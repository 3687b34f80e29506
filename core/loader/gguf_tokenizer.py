"""A GGUF's tokenizer: transformers' fast tokenizer built from the file's metadata, cached as files.

Free of torch: the router process reads the tokenizer of the model its model server loads.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def tokenizer_from_gguf(path: Path) -> Any:
    """transformers' fast tokenizer for the GGUF, with its chat template and special tokens."""
    try:  # transformers 5: read the tokenizer metadata alone (about 1 s)
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # transformers 4.x: its generic GGUF path
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def cached_gguf_tokenizer(path: Path, cache_dir: Path | None) -> Any:
    """The GGUF's tokenizer, kept under `cache_dir` (when given) so that later starts skip rebuilding it."""
    if cache_dir is None:
        return tokenizer_from_gguf(path)
    from transformers import PreTrainedTokenizerFast

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "gguf-tokenizers" / key
    if (folder / "tokenizer.json").exists():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
            logger.warning("rebuilding the cached tokenizer in %s: %r", folder, exc)
    tokenizer = tokenizer_from_gguf(path)
    try:
        tokenizer.save_pretrained(str(folder))
    except OSError as exc:
        logger.warning("could not cache the tokenizer in %s: %r", folder, exc)
    return tokenizer
