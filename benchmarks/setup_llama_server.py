"""Build llama.cpp's `llama-server` from the sources vendored in llama-cpp-python's sdist on PyPI.

PyPI is the only source reachable here, and the sdist carries llama.cpp whole (vendor/llama.cpp). The
build is CPU-native (GGML_NATIVE picks up AVX-512 / AVX512-BF16) and takes about 9 minutes on 2 cores;
the binary is cached, so later runs start at once.
"""

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from benchmarks.cache import bench_cache

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def llama_server_binary() -> Path:
    return bench_cache() / "llama.cpp" / "bin" / "llama-server"


def build_llama_server() -> Path:
    binary = llama_server_binary()
    if binary.exists():
        return binary
    root = binary.parent.parent
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
        print("building llama-server (about 9 minutes on 2 cores)", flush=True)
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"],
            check=True, stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            ["cmake", "--build", str(build), "--target", "llama-server", "-j", "2"],
            check=True, stdout=subprocess.DEVNULL,
        )
        binary.parent.mkdir(parents=True, exist_ok=True)
        (build / "bin" / "llama-server").rename(binary)
    print(f"llama-server built: {binary}", flush=True)
    return binary


if __name__ == "__main__":
    build_llama_server()
