"""Build llama.cpp's `llama-server` and `llama-quantize` from the sources vendored in llama-cpp-python's
sdist on PyPI.

PyPI is the only source reachable here, and the sdist carries llama.cpp whole (vendor/llama.cpp). The
build is CPU-native (GGML_NATIVE picks up AVX-512 / AVX512-BF16) and takes about 9 minutes on 2 cores;
both tools come from one build and are cached, so later runs start at once. A cache holding one tool
alone (made before `llama-quantize` was added) builds only the missing one.
"""

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from benchmarks.cache import bench_cache

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
TOOLS = ("llama-server", "llama-quantize")


def llama_binary(tool: str) -> Path:
    return bench_cache() / "llama.cpp" / "bin" / tool


def llama_server_binary() -> Path:
    return llama_binary("llama-server")


def llama_quantize_binary() -> Path:
    return llama_binary("llama-quantize")


def build_llama_tools(tools: tuple[str, ...] = TOOLS) -> None:
    """Build whichever of `tools` the cache lacks, in one CMake build."""
    missing = [tool for tool in tools if not llama_binary(tool).exists()]
    if not missing:
        return
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as tmp:
        print(f"fetching {LLAMA_CPP_PYTHON} sdist", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", tmp, LLAMA_CPP_PYTHON],
            check=True,
        )
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (source,) = Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp")
        build = Path(tmp) / "build"
        print(f"building {', '.join(missing)} (about 9 minutes on 2 cores)", flush=True)
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"],
            check=True, stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            ["cmake", "--build", str(build), *(arg for tool in missing for arg in ("--target", tool)), "-j", "2"],
            check=True, stdout=subprocess.DEVNULL,
        )
        for tool in missing:
            llama_binary(tool).parent.mkdir(parents=True, exist_ok=True)
            (build / "bin" / tool).rename(llama_binary(tool))
            print(f"{tool} built: {llama_binary(tool)}", flush=True)


def build_llama_server() -> Path:
    build_llama_tools()  # the bench needs both (the GGUF types' files): one build makes them together
    return llama_server_binary()


def build_llama_quantize() -> Path:
    build_llama_tools(("llama-quantize",))  # `make gguf-check` needs it alone
    return llama_quantize_binary()


if __name__ == "__main__":
    build_llama_tools()
