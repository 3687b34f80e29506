"""LoRA adapters: PEFT's files read without peft, stacked on the model's linear layers, chosen per request.

Adapters are given at start (TGI's ``--lora-adapters``, vLLM's ``--lora-modules``), each under a name;
a request names its adapter (TGI's ``adapter_id``, OpenAI's ``model``) or none for the base model.

This package's own module reads the flags alone, without torch (the router process parses them too).
Reading PEFT's files is `tokenmill.lora.peft`; attaching adapters to a model, `tokenmill.lora.adapters`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenmill.errors import ValidationError

__all__ = ["parse_lora_adapters", "parse_lora_modules", "resolve_adapter_path"]


def parse_lora_adapters(text: str) -> tuple[tuple[str, str], ...]:
    """TGI's ``--lora-adapters`` / ``LORA_ADAPTERS``: comma-separated ``name=path`` items, or a bare path
    or hub id, which is then also the adapter's name (as TGI names it)."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            name, sep, source = item.partition("=")
            specs.append((name.strip(), source.strip()) if sep else (item, item))
    for name, source in specs:
        if not name or not source:
            raise ValidationError(f"--lora-adapters: expected name=path or a path, comma-separated; got {text!r}")
    return tuple(specs)


def parse_lora_modules(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """vLLM's ``--lora-modules``: items ``name=path`` or ``{"name": ..., "path": ...}`` (JSON)."""
    specs = []
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                entry = json.loads(item)
                specs.append((str(entry["name"]), str(entry["path"])))
            except (ValueError, KeyError, TypeError):
                raise ValidationError(f"--lora-modules: a JSON item needs \"name\" and \"path\"; "
                                      f"got {item!r}") from None
            continue
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ValidationError(f"--lora-modules: expected name=path or JSON with name and path; got {item!r}")
        specs.append((name.strip(), source.strip()))
    return tuple(specs)


def resolve_adapter_path(name: str, source: str) -> Path:
    """Adapter `name`'s folder: `source` itself, or the snapshot of hub id `source` in the local Hugging Face
    cache (adapters are not downloaded at start: fetch one with `huggingface-cli download`)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    from tokenmill.loader import ModelNotFoundError, resolve_hub_id

    try:
        return resolve_hub_id(source)
    except ModelNotFoundError:
        raise ValidationError(f"LoRA adapter {name!r}: {source!r} is neither a local folder nor a hub id in the "
                              f"local Hugging Face cache (fetch it with `huggingface-cli download {source}`)") from None
