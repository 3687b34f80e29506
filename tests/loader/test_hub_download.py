"""Hub ids downloaded through huggingface_hub from a Hub on loopback (tests/fake_hub.py): the files
tokenmill reads at the asked revision, the token as a bearer, resumed and completed downloads, the
cache when offline, and errors that say what went wrong."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
import torch

from tests.fake_hub import FakeHub
from tests.tiny_models import build_tiny, tiny_tokenizer
from tokenmill.loader import HubOptions, ModelNotFoundError, UnsupportedCheckpointError, fetch, load_checkpoint

TOKEN = "hf_loopback_test_token"
READ = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def _publish(folder: Path, seed: int, **save) -> dict[str, torch.Tensor]:
    tiny = build_tiny("llama", seed=seed)
    tiny.reference.save_pretrained(folder, safe_serialization=True, **save)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickled weights tokenmill never reads" * 100)
    (folder / "README.md").write_text("# tiny\n")
    return tiny.reference.state_dict()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """org/tiny: seed 0 on main, seed 1 under the tag v1; the expected tensors of each on `hub.state`."""
    hub = FakeHub(token=TOKEN)
    hub.state = {}
    for seed, ref in ((0, "main"), (1, "v1")):
        folder = tmp_path_factory.mktemp(f"tiny-{ref}")
        hub.state[ref] = _publish(folder, seed)
        hub.add("org/tiny", folder, ref)
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """No name but loopback resolves: nothing here leaves the machine. huggingface_hub's own calls to its
    default endpoint (version 2 fetches a registry of coding agents for its user-agent header) fail as they
    would offline, which it tolerates."""
    resolve = socket.getaddrinfo

    def loopback(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: the tests reach loopback only")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback)


def _model_requests(hub: FakeHub) -> list:
    return [s for s in hub.seen if s.path.startswith(("/api/models/", "/org/"))]


def _options(hub: FakeHub, cache: Path, **kwargs) -> HubOptions:
    return HubOptions(**{"token": TOKEN, "cache_dir": cache, "endpoint": hub.url, "progress": False, **kwargs})


def test_the_revision_asked_is_fetched_with_only_the_files_tokenmill_reads(hub, tmp_path) -> None:
    hub.seen.clear()
    folder = fetch("org/tiny", _options(hub, tmp_path, revision="v1"))
    assert {p.name for p in folder.iterdir()} <= READ | {"special_tokens_map.json"}
    assert READ <= {p.name for p in folder.iterdir()}
    assert not hub.downloads("pytorch_model.bin") and not hub.downloads("README.md")
    checkpoint = load_checkpoint(str(folder), dtype="float32", progress=False)
    for name, tensor in hub.state["v1"].items():
        assert torch.equal(checkpoint.tensors[name], tensor), name
    embedding = "model.embed_tokens.weight"
    assert not torch.equal(checkpoint.tensors[embedding], hub.state["main"][embedding])


def test_the_token_goes_as_a_bearer_on_every_request_and_a_wrong_one_is_named(hub, tmp_path) -> None:
    hub.seen.clear()
    fetch("org/tiny", _options(hub, tmp_path))
    assert _model_requests(hub) and {s.authorization for s in _model_requests(hub)} == {f"Bearer {TOKEN}"}
    with pytest.raises(ModelNotFoundError, match="HTTP 401.*HF_TOKEN"):
        fetch("org/tiny", _options(hub, tmp_path / "other", token="hf_wrong"))


def test_a_dropped_connection_resumes_where_it_stopped(hub, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # bytes written before the cut
    hub.seen.clear()
    hub.cut_once["model.safetensors"] = 10_000
    folder = fetch("org/tiny", _options(hub, tmp_path))
    gets = hub.downloads("model.safetensors")
    assert [g.range for g in gets] == [None, "bytes=8192-"]
    assert (folder / "model.safetensors").read_bytes() == hub.commits["org/tiny"][hub.refs["org/tiny"]["main"]][
        "model.safetensors"]


def test_an_interrupted_snapshot_is_completed_without_fetching_again_what_it_has(hub, tmp_path) -> None:
    folder = fetch("org/tiny", _options(hub, tmp_path))
    weights = folder / "model.safetensors"
    os.remove(weights.resolve())  # the blob, then its link: as if the process died while fetching it
    weights.unlink()
    hub.seen.clear()
    assert fetch("org/tiny", _options(hub, tmp_path)) == folder
    assert [Path(s.path).name for s in hub.seen if s.method == "GET" and "/resolve/" in s.path] == ["model.safetensors"]
    assert load_checkpoint(str(folder), progress=False).tensors


def test_offline_serves_the_cache_and_an_empty_cache_fails_saying_so(hub, tmp_path) -> None:
    online = fetch("org/tiny", _options(hub, tmp_path, revision="v1"))
    hub.seen.clear()
    assert fetch("org/tiny", _options(hub, tmp_path, revision="v1", offline=True)) == online
    with pytest.raises(ModelNotFoundError, match="'org/tiny' is not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        fetch("org/tiny", _options(hub, tmp_path / "empty", offline=True))
    assert not hub.seen


def test_unknown_models_and_revisions_and_an_unreachable_hub_are_named(hub, tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="org/absent is neither a local path nor a model on"):
        fetch("org/absent", _options(hub, tmp_path))
    with pytest.raises(ModelNotFoundError, match="has no revision 'v9'"):
        fetch("org/tiny", _options(hub, tmp_path, revision="v9"))
    unreachable = HubOptions(token=TOKEN, cache_dir=tmp_path, endpoint="http://127.0.0.1:9", progress=False)
    with pytest.raises(ModelNotFoundError, match="could not download org/tiny .* not in the Hugging Face cache"):
        fetch("org/tiny", unreachable)
    cached = fetch("org/tiny", _options(hub, tmp_path))
    assert fetch("org/tiny", unreachable) == cached  # what was fetched still serves while the Hub is down


def test_a_sharded_checkpoint_fetches_and_loads_only_the_shards_its_index_names(hub, tmp_path) -> None:
    folder = tmp_path / "published"
    folder.mkdir()
    state = _publish(folder, seed=2, max_shard_size="200KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    (folder / "consolidated.safetensors").write_bytes((folder / shards[0]).read_bytes())  # Mistral's other format
    hub.add("org/sharded", folder)
    hub.seen.clear()
    fetched = fetch("org/sharded", _options(hub, tmp_path / "cache"))
    assert sorted(p.name for p in fetched.glob("*.safetensors")) == shards
    assert not hub.downloads("consolidated.safetensors")
    checkpoint = load_checkpoint(str(fetched), dtype="float32", progress=False)
    assert checkpoint.tensors.keys() == state.keys()


def test_gguf_repositories_fetch_their_one_file_and_refuse_a_choice_of_several(hub, tmp_path) -> None:
    one, many = tmp_path / "one", tmp_path / "many"
    for folder, names in ((one, ["m.Q4_0.gguf"]), (many, ["m.Q4_0.gguf", "m.Q8_0.gguf"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"GGUF" + bytes(60))
        (folder / "README.md").write_text("quantizations")
    hub.add("org/one-gguf", one)
    hub.add("org/many-gguf", many)
    fetched = fetch("org/one-gguf", _options(hub, tmp_path / "cache"))
    assert [p.name for p in fetched.iterdir()] == ["m.Q4_0.gguf"]
    with pytest.raises(UnsupportedCheckpointError, match=r"2 GGUF files \(m.Q4_0.gguf, m.Q8_0.gguf\)"):
        fetch("org/many-gguf", _options(hub, tmp_path / "cache"))


# ---- as a user runs it: `tokenmill serve --model-id org/name`, the Hub reached through HF_ENDPOINT ----------


def _serve_env(hub: FakeHub, cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {**env, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HUGGINGFACE_HUB_CACHE": str(cache),
            "HF_HOME": str(cache.parent / "hf-home"), **extra}


def test_serve_downloads_the_revision_with_a_progress_bar_and_serves_it(hub, tmp_path) -> None:
    import subprocess
    import sys

    import httpx

    from tests.api.conftest import free_port, wait_healthy

    prompt, steps = [5, 6, 7], 6
    expected = build_tiny("llama", seed=1).greedy(prompt, steps)
    assert expected != build_tiny("llama", seed=0).greedy(prompt, steps)  # the revisions answer apart
    port, log = free_port(), tmp_path / "serve.log"
    hub.seen.clear()
    server = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli", "serve", "--model-id", "org/tiny", "--revision", "v1",
         "--hostname", "127.0.0.1", "--port", str(port), "--grpc-port", "0", "--dtype", "float32",
         "--kv-cache-bytes", str(4 << 20), "--backend", "cpu"],
        env=_serve_env(hub, tmp_path / "cache"), stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 240, server)
        assert httpx.get(f"{url}/info", timeout=10).json()["model_id"] == "org/tiny"
        body = {"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": steps, "details": True}}
        tokens = [t["id"] for t in httpx.post(f"{url}/generate", json=body, timeout=60).json()["details"]["tokens"]]
        assert tokens == expected[:len(tokens)] and (len(tokens) == steps or tokens[-1] == 1)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert re.search(r"Fetching \d+ files: 100%", log.read_text())
    assert {s.authorization for s in _model_requests(hub)} == {f"Bearer {TOKEN}"}
    assert len(hub.downloads("model.safetensors")) == 1  # the model server loaded the launcher's download


def test_serve_offline_with_an_empty_cache_stops_saying_why(hub, tmp_path) -> None:
    from tests.conftest import run_cli

    hub.seen.clear()
    result = run_cli("serve", "--model-id", "org/tiny", "--port", "1", check=False,
                     env=_serve_env(hub, tmp_path / "empty", HF_HUB_OFFLINE="1"))
    assert result.returncode == 2
    assert "tokenmill serve: model 'org/tiny' is not in the Hugging Face cache" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert not hub.seen
