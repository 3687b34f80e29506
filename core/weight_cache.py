"""Prepared weights kept on disk: a later start memory-maps them instead of dequantizing and packing again.

An entry is one safetensors file under `<cache_dir>/prepared-weights/`: the model's parameters after its
linear layers were prepared, and each linear layer's prepared form as its `QuantMethod.serialize` gave
it. Its key covers everything those tensors derive from: the checkpoint file (path, size, mtime and a
hash of its first MiB), the tokenmill and torch versions, the dtype, the code that turns a checkpoint
into the model (tokenmill's loader, models and layers) and the method's own module with the compiled
extensions beside it. A changed file or changed code therefore never meets a stale entry; old entries are
evicted: a write keeps the `KEPT_ENTRIES` most recently used. An entry is written to a temporary file and renamed into place, so a reader
never sees a partial one; one that cannot be read, or does not fit the model, is deleted and the model
is loaded from the checkpoint (and the entry written again).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import tokenmill
from tokenmill.interfaces import QuantMethod
from tokenmill.layers.linear import Linear
from tokenmill.layers.vocab_parallel import Embedding

logger = logging.getLogger(__name__)

ENTRY_DIR = "prepared-weights"
KEPT_ENTRIES = 4  # most recently used entries a write leaves (each the size of the prepared model)
ALIGNMENT = 64  # bytes: a cache line, and one AVX-512 load
PADDING = "padding"  # int64 words that move the packed weights onto ALIGNMENT boundaries
STALE_PARTIAL_S = 3600  # a temporary file this old is a crashed writer's
HEADER_BYTES = 1 << 20  # hashed as the file's identity together with its size and mtime
# Where the code that turns a checkpoint into the model's tensors lives, under the tokenmill package.
DERIVING_CODE = ("loader", "models", "layers", "model_loading.py", "weight_cache.py")
EXTENSION_SUFFIXES = (".so", ".pyd")


def cacheable(method: QuantMethod | None) -> bool:
    """Whether `method` serializes its prepared weights (the default `QuantMethod.serialize` does not)."""
    return method is not None and type(method).serialize is not QuantMethod.serialize


class PreparedWeights:
    """The cache entry for one checkpoint file prepared by one method in one dtype."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def locate(cls, cache_dir: Path, checkpoint_file: Path, method: QuantMethod, dtype: torch.dtype
               ) -> "PreparedWeights":
        digest = hashlib.sha256()
        stat = checkpoint_file.stat()
        digest.update(f"{checkpoint_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        with open(checkpoint_file, "rb") as file:
            digest.update(file.read(HEADER_BYTES))
        digest.update(f"|{tokenmill.__version__}|{torch.__version__}|{dtype}|{type(method).__qualname__}|"
                      f"{method.name}|".encode())
        for source in _deriving_files(method):
            digest.update(source.name.encode())
            digest.update(source.read_bytes())
        return cls(Path(cache_dir).expanduser() / ENTRY_DIR / f"{digest.hexdigest()[:32]}.safetensors")

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, model: nn.Module, method: QuantMethod) -> None:
        """Write the prepared model, if every prepared linear layer serializes; never raises for the disk."""
        tensors = {f"param:{name}": param.data for name, param in model.named_parameters()}
        for name, module in _linears(model):
            if module.quant_method is None:
                continue
            parts = method.serialize(module.quantized)
            if parts is None:
                return
            tensors.update((f"linear:{name}:{part}", tensor) for part, tensor in parts.items())
        tensors = {key: tensor.contiguous() for key, tensor in tensors.items()}
        tensors[PADDING] = torch.zeros(0, dtype=torch.int64)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".partial")
            os.close(handle)
            try:
                for _ in range(3):  # the padding changes the header a little: it settles in one more write
                    save_file(tensors, temporary)
                    shift = _misalignment(Path(temporary))
                    if not shift:
                        break
                    words = (tensors[PADDING].numel() + (ALIGNMENT - shift) // 8) % (ALIGNMENT // 8)
                    tensors[PADDING] = torch.zeros(words, dtype=torch.int64)
                os.replace(temporary, self.path)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
        except OSError as exc:
            logger.warning("could not cache the prepared weights in %s: %r", self.path, exc)
            return
        logger.info("cached the prepared weights in %s", self.path)
        _evict(self.path.parent)

    def restore(self, model: nn.Module, method: QuantMethod) -> bool:
        """Put the entry's tensors into a freshly built `model`, memory-mapped (no copy); False, with the
        entry deleted and `model` untouched, where it is unreadable or does not fit the model."""
        try:
            tensors = self._read()
            params, linears, released = _restore_plan(model, tensors, method)
        except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never fatal
            logger.warning("ignoring the prepared-weights cache entry %s: %s", self.path, exc)
            self.path.unlink(missing_ok=True)
            return False
        for param, tensor in params:
            param.data = tensor  # keeps the Parameter object: a tied weight stays tied
        for module, prepared in linears:
            module.quant_method = method
            module.quantized = prepared
            module.weight = None
        for embedding in released:
            embedding.release_to_head()
        try:
            os.utime(self.path)  # most recently used: the last an eviction removes
        except OSError:
            pass
        logger.info("restored the prepared weights from %s", self.path)
        return True

    def _read(self) -> dict[str, torch.Tensor]:
        # safetensors maps the file (torch storage from_file): pages are read on first touch, never copied.
        # Ask the kernel to read it ahead now, in the background: an entry evicted from the page cache then
        # comes back while the engine builds the rest, not page by page in the first forward.
        if hasattr(os, "posix_fadvise"):
            descriptor = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(descriptor)
        with safe_open(str(self.path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}


def _restore_plan(model: nn.Module, tensors: dict[str, torch.Tensor], method: QuantMethod):
    """Which tensor goes where, each linear layer's prepared weight, and the tied embeddings whose weight the
    entry holds only as their head's (`Embedding.release_to_head`); raises ValueError where the entry does not
    match the model exactly."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    params: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        kind, _, rest = key.partition(":")
        if kind == "linear":
            name, _, part = rest.rpartition(":")
            parts.setdefault(name, {})[part] = tensor
        elif kind == "param":
            params[rest] = tensor
        elif key != PADDING:
            raise ValueError(f"unexpected key {key!r}")
    linears = dict(_linears(model))
    if not set(parts) <= set(linears):
        raise ValueError(f"linear layers the model lacks: {sorted(set(parts) - set(linears))[:3]}")
    prepared_weights = {f"{name}.weight" for name in parts}
    expected = {name: param for name, param in model.named_parameters() if name not in prepared_weights}
    prepared = {name: method.deserialize(layer_parts) for name, layer_parts in parts.items()}
    released = []
    head_names = {id(module): name for name, module in linears.items()}
    for name, module in model.named_modules():
        weight = f"{name}.weight"
        tied = isinstance(module, Embedding) and module.tied_head is not None
        if tied and weight in expected and weight not in params:  # written after the embedding gave it up
            head = head_names.get(id(module.tied_head))
            if head not in prepared or method.rows(prepared[head], torch.zeros(0, dtype=torch.long)) is None:
                raise ValueError(f"{weight}: neither in the entry nor readable from its tied head's prepared weight")
            del expected[weight]
            released.append(module)
    if set(expected) != set(params):
        raise ValueError(f"parameters differ from the model's: {sorted(set(expected) ^ set(params))[:3]}")
    for name, param in expected.items():
        if params[name].shape != param.shape or params[name].dtype != param.dtype:
            raise ValueError(f"{name}: {params[name].dtype} {tuple(params[name].shape)} in the entry, "
                             f"{param.dtype} {tuple(param.shape)} in the model")
    return ([(param, params[name]) for name, param in expected.items()],
            [(linears[name], prepared[name]) for name in parts], released)


def _misalignment(path: Path) -> int:
    """How far past a 64-byte boundary the first tensor after the int64 ones (all 8 bytes a word) starts
    in the file, and so in its mapping (page-aligned). The packed weights come in multiples of 64 bytes, so
    from there on they all lie on boundaries, as in memory torch allocated: the kernels' 64-byte loads
    then never straddle two cache lines."""
    with open(path, "rb") as file:
        (header_bytes,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_bytes))
    starts = [entry["data_offsets"][0] for key, entry in header.items()
              if key != "__metadata__" and entry["dtype"] != "I64"]
    return (8 + header_bytes + min(starts)) % ALIGNMENT if starts else 0


def _evict(folder: Path) -> None:
    """Delete all but the `KEPT_ENTRIES` most recently used entries (a new tokenmill or model leaves the old
    ones unused for good), and temporary files crashed writers left."""
    try:
        entries = sorted(folder.glob("*.safetensors"), key=lambda path: path.stat().st_mtime, reverse=True)
        for path in entries[KEPT_ENTRIES:]:
            path.unlink(missing_ok=True)
        for path in folder.glob("*.partial"):
            if time.time() - path.stat().st_mtime > STALE_PARTIAL_S:
                path.unlink(missing_ok=True)
    except OSError as exc:  # another process evicting at the same time
        logger.debug("cache eviction in %s: %r", folder, exc)


def _linears(model: nn.Module) -> Iterable[tuple[str, Linear]]:
    return ((name, module) for name, module in model.named_modules() if isinstance(module, Linear))


def _deriving_files(method: QuantMethod) -> list[Path]:
    package = Path(tokenmill.__file__).parent
    files = []
    for entry in DERIVING_CODE:
        path = package / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    method_file = Path(inspect.getfile(type(method)))
    files.append(method_file)
    files += sorted(p for p in method_file.parent.iterdir() if p.name.endswith(EXTENSION_SUFFIXES))
    return files
