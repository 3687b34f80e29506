"""How each server is configured for the benchmark: same model, same 2 threads, enough slots for the load."""

import functools
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.servers import ServerSpec, free_port
from benchmarks.setup_llama_server import llama_server_binary
from benchmarks.setup_vllm import iomp_path, tcmalloc_path, vllm_python

THREADS = 2
REPO = Path(__file__).resolve().parent.parent


def tokenmill_spec(model: Path | None = None) -> ServerSpec:
    """`make serve`'s configuration (only the addresses differ), on `model` where given (a GGUF file)."""
    port = free_port()
    tokenmill = Path(sys.executable).parent / "tokenmill"
    return ServerSpec(
        name="tokenmill",
        command=[str(tokenmill), "serve", "--hostname", "127.0.0.1", "--port", str(port),
                 "--grpc-port", str(free_port()), *(["--model-id", str(model)] if model else [])],
        model="tokenmill",
        port=port,
    )


def llama_server_spec(gguf: Path, slots: int, slot_context: int = 2048) -> ServerSpec:
    """llama-server on the same GGUF; each slot gets `slot_context` tokens (2k: the longest fixed prompt + 128
    fits; the chat mix's longest prompt, the system prompt and 512 new tokens need 4k). Where its weight
    repacking crashes it on this machine, without it, and named so (`llama_server_repacks`)."""
    port = free_port()
    repack = llama_server_repacks(gguf)
    return ServerSpec(
        name=f"llama-server-np{slots}" + (f"-ctx{slot_context}" if slot_context != 2048 else "")
        + ("" if repack else "-norepack"),
        command=[str(llama_server_binary()), "-m", str(gguf), "-t", str(THREADS), "-np", str(slots),
                 "-c", str(slot_context * slots), "--host", "127.0.0.1", "--port", str(port), "--log-disable",
                 *([] if repack else ["--no-repack"])],
        model=gguf.stem,
        port=port,
    )


def vllm_spec(hf_folder: Path, bind_threads: bool = True, served_name: str = "smollm2",
              extra: tuple[str, ...] | list[str] = ()) -> ServerSpec:
    """vLLM's CPU build as issue #7 tuned it; `bind_threads=False` leaves its default OpenMP binding;
    `extra` flags go last (the 1B section's `--load-format dummy`)."""
    port = free_port()
    preload = [str(path) for path in (tcmalloc_path(), iomp_path()) if path]
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "LD_PRELOAD": ":".join(preload)}
    if bind_threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{THREADS - 1}"
    return ServerSpec(
        name=("vllm" if bind_threads else "vllm-default-bind") + (f" ({served_name})" if served_name != "smollm2" else ""),
        command=[str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_folder),
                 "--served-model-name", served_name, "--dtype", "bfloat16", "--max-model-len", "4096",
                 "--host", "127.0.0.1", "--port", str(port), *extra],
        model=served_name,
        env={**env, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(THREADS))},
        port=port,
    )


@functools.cache
def llama_server_repacks(gguf: Path, timeout_s: float = 120.0) -> bool:
    """Whether llama-server serves `gguf` with its weight repacking (its default) on this machine. On an
    Intel host with AMX (2026-12-03) it died with SIGSEGV as its thread pool started, after loading, and ran
    with `--no-repack`: asked once per GGUF and run, by starting it and waiting for its health check."""
    port = free_port()
    server = subprocess.Popen([str(llama_server_binary()), "-m", str(gguf), "-t", str(THREADS), "--host",
                               "127.0.0.1", "--port", str(port), "--log-disable"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while server.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                time.sleep(0.2)
        if server.poll() is None:
            return True  # slow, not crashed: the bench's own start-up wait judges it
        print(f"llama-server exited with {server.returncode} with its weight repacking on; the bench runs it "
              f"with --no-repack", flush=True)
        return False
    finally:
        server.kill()
        server.wait()
