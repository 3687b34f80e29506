"""The prepared-weights cache (`tokenmill.weight_cache`): a second start from the same GGUF restores the
packed linears from disk instead of reading the checkpoint's tensors, and generates the same tokens; a
changed file gets an entry of its own; a damaged entry is ignored and written again; old entries are evicted."""

from __future__ import annotations

import os
import random

import pytest
from safetensors import safe_open

import tokenmill.loader.checkpoint as loader
from tests.loader.test_gguf_families import write_gguf
from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.plugins.cpu.quant import PackedBF16Weight, PackedGGMLWeight, bf16_gemm_available, ggml_kernels_available
from tokenmill.sampling_params import SamplingParams
from tokenmill.weight_cache import ENTRY_DIR, KEPT_ENTRIES, _evict as evict

pytestmark = pytest.mark.skipif(not bf16_gemm_available(), reason="the CPU's cacheable linear method needs its bf16 kernels")

PROMPTS = [[random.Random(3).randrange(4, VOCAB) for _ in range(n)] for n in (9, 40)]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    # Q8_0 weights take the block kernels' path (a packed form with blocks and a dense copy), the rest dense.
    write_gguf(build_tiny("llama", initializer_range=0.2), "llama", path, q8_0=("attn_q.weight", "ffn_down.weight"))
    return path


@pytest.fixture
def tensor_reads(monkeypatch) -> list[str]:
    """Every GGUF whose tensors the loader dequantizes, by path."""
    reads, real = [], loader.tensors_from_gguf

    def counting(gguf, *args, **kwargs):
        reads.append(str(gguf.path))
        return real(gguf, *args, **kwargs)

    monkeypatch.setattr(loader, "tensors_from_gguf", counting)
    return reads


def _start(path, cache_dir) -> Engine:
    return Engine(EngineConfig(model_id=str(path), backend="cpu", dtype="bfloat16", kv_cache_bytes=8 << 20,
                               progress=False, cache_dir=cache_dir))


def _greedy(engine: Engine) -> list[list[int]]:
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))
    return [[t.id for o in output for t in o.new_tokens] for output in outputs]


def _entries(cache_dir) -> list:
    return sorted((cache_dir / ENTRY_DIR).glob("*.safetensors"))


@pytest.fixture(scope="module")
def uncached(gguf_path, tmp_path_factory) -> tuple[list[list[int]], object]:
    """Greedy tokens of a start that wrote the cache, and the cache dir it wrote."""
    cache_dir = tmp_path_factory.mktemp("cache")
    return _greedy(_start(gguf_path, cache_dir)), cache_dir


def test_the_second_start_restores_the_prepared_weights_and_generates_the_same(gguf_path, uncached,
                                                                               tensor_reads) -> None:
    tokens, cache_dir = uncached
    [entry] = _entries(cache_dir)
    engine = _start(gguf_path, cache_dir)
    assert tensor_reads == []  # nothing dequantized: the packed weights came from the entry
    down_proj = next(m for n, m in engine.model.named_modules() if n.endswith("layers.0.mlp.down_proj"))
    # The GGUF's own blocks where their kernels are built (AVX512-BF16 or AVX2), else the dense panels.
    restored = PackedGGMLWeight if ggml_kernels_available() else PackedBF16Weight
    assert isinstance(down_proj.quantized, restored) and down_proj.weight is None
    # Mapped from the file, yet on 64-byte boundaries as torch's allocations are (the kernels' loads).
    packed = [m.quantized for m in engine.model.modules() if getattr(m, "quantized", None) is not None]
    dense = [p.dense.packed for p in packed if isinstance(p, PackedGGMLWeight) and p.dense is not None]
    packed = [p.packed for p in packed] + dense
    assert packed and all(t.data_ptr() % 64 == 0 for t in packed)
    assert _greedy(engine) == tokens
    assert _entries(cache_dir) == [entry]


def test_a_changed_file_is_loaded_from_the_file_under_an_entry_of_its_own(gguf_path, uncached, tensor_reads,
                                                                           tmp_path) -> None:
    tokens, cache_dir = uncached
    before = _entries(cache_dir)
    changed = tmp_path / gguf_path.name
    write_gguf(build_tiny("llama", seed=1, initializer_range=0.2), "llama", changed, q8_0=("attn_q.weight",))
    engine = _start(changed, cache_dir)
    assert tensor_reads == [str(changed)]
    expected = _greedy(engine)
    assert expected != tokens  # other weights: the old entry was not used
    assert len(_entries(cache_dir)) == len(before) + 1
    # Same path and size, new mtime (a file rewritten in place): a new entry too.
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _greedy(_start(changed, cache_dir)) == expected
    assert tensor_reads == [str(changed)] * 2 and len(_entries(cache_dir)) == len(before) + 2


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_entry_is_ignored_and_written_again(gguf_path, uncached, tensor_reads, tmp_path, damage) -> None:
    tokens, _ = uncached
    cache_dir = tmp_path / "cache"
    _start(gguf_path, cache_dir)
    [entry] = _entries(cache_dir)
    data = entry.read_bytes()
    entry.write_bytes(os.urandom(4096) if damage == "garbage" else data[: len(data) // 2])
    tensor_reads.clear()
    assert _greedy(_start(gguf_path, cache_dir)) == tokens
    assert tensor_reads == [str(gguf_path)]
    with safe_open(str(entry), framework="pt") as rewritten:  # whole again
        assert len(list(rewritten.keys())) > 0
    assert entry.stat().st_size == len(data)


def test_a_write_keeps_the_most_recently_used_entries_and_clears_crashed_writes(tmp_path) -> None:
    folder = tmp_path / ENTRY_DIR
    folder.mkdir()
    entries = [folder / f"{index}.safetensors" for index in range(KEPT_ENTRIES + 2)]
    for age, path in enumerate(entries):  # entries[0] the newest
        path.write_bytes(b"x")
        os.utime(path, (1e9 - age, 1e9 - age))
    crashed, writing = folder / "a.partial", folder / "b.partial"
    for path in (crashed, writing):
        path.write_bytes(b"x")
    os.utime(crashed, (1e9, 1e9))
    evict(folder)
    assert sorted(folder.iterdir()) == sorted([*entries[:KEPT_ENTRIES], writing])


def test_a_tied_head_is_restored_as_the_one_copy_of_the_embedding(tmp_path, tensor_reads) -> None:
    path = tmp_path / "tied-llama.gguf"
    write_gguf(build_tiny("llama", initializer_range=0.2, tie_word_embeddings=True), "llama", path)
    first = _start(path, tmp_path / "cache")
    tokens = _greedy(first)
    restored = _start(path, tmp_path / "cache")
    for engine in (first, restored):  # the embedding reads the packed head's rows, whether packed or restored
        assert engine.model.embed_tokens.weight is None and engine.model.lm_head.tied_embedding is not None
    assert tensor_reads == [str(path)]  # the second start restored the entry
    assert _greedy(restored) == tokens
