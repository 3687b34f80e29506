"""A GGUF's config cached under the cache dir: restored without transformers' config classes, rebuilt when stale."""

import json
import os
import subprocess
import sys

import pytest
from transformers.configuration_utils import PreTrainedConfig

from tests.loader.test_gguf_families import write_gguf
from tests.tiny_models import build_tiny
from tokenmill.backend import Backend
from tokenmill.loader.gguf_config_cache import ENTRY_DIR, cached_gguf_config
from tokenmill.loader.gguf_file import GGUFFile
from tokenmill.loader.gguf_loader import config_from_gguf
from tokenmill.registry import load_registry


@pytest.fixture
def gguf_path(tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(build_tiny("llama"), "llama", path)
    return path


def _built(path):
    built = []
    return built, lambda: built.append(1) or config_from_gguf(GGUFFile(path))


def test_a_second_start_restores_the_config_and_a_changed_file_rebuilds_it(gguf_path, tmp_path):
    built, build = _built(gguf_path)
    first = cached_gguf_config(gguf_path, tmp_path / "cache", build)
    second = cached_gguf_config(gguf_path, tmp_path / "cache", build)
    assert len(built) == 1 and type(first).__name__ == "LlamaConfig" and type(second) is PreTrainedConfig
    assert second.hidden_size == first.hidden_size and second.rope_parameters == first.rope_parameters
    os.utime(gguf_path, ns=(1, 1))  # the same path, another file as far as the key knows
    assert type(cached_gguf_config(gguf_path, tmp_path / "cache", build)).__name__ == "LlamaConfig"
    assert len(built) == 2


def test_a_damaged_entry_is_rebuilt_and_no_cache_dir_caches_nothing(gguf_path, tmp_path):
    built, build = _built(gguf_path)
    cached_gguf_config(gguf_path, tmp_path / "cache", build)
    (entry,) = (tmp_path / "cache" / ENTRY_DIR).iterdir()
    entry.write_text("{not json")
    assert type(cached_gguf_config(gguf_path, tmp_path / "cache", build)).__name__ == "LlamaConfig"
    assert json.loads(entry.read_text())["model_type"] == "llama"  # written again
    cached_gguf_config(gguf_path, None, build)
    assert len(built) == 3


def test_only_a_backend_running_the_cores_models_gets_a_restored_config():
    # A backend's own model (`tokenmill_model_executor`) is handed the config: it keeps transformers' class.
    registry = load_registry()
    assert not Backend(registry, "cpu").runs_own_model
    assert Backend(registry, "neuron").runs_own_model


def test_a_warm_start_imports_no_transformers_model_config_class(gguf_path, tmp_path):
    # The point of the cache: transformers' config classes cost ~1 s of a start (the module's docstring).
    code = ("import sys\n"
            "from tokenmill.engine import Engine, EngineConfig\n"
            f"Engine(EngineConfig(model_id={str(gguf_path)!r}, backend='cpu', kv_cache_bytes=8 << 20, progress=False,"
            f" cache_dir={str(tmp_path / 'cache')!r}))\n"
            "print(sorted(m for m in ('transformers.activations', 'transformers.models.llama') if m in sys.modules))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[-2]
            for _ in range(2)]
    assert runs == ["['transformers.activations', 'transformers.models.llama']", "[]"]
