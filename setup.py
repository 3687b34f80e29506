"""Build hooks: generate the gRPC Python modules from api/grpc/*.proto with grpcio-tools, and compile the
CPU backend's C kernels.

Everything else about the package is declared in pyproject.toml.
"""

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO_DIR = ROOT / "api" / "grpc"
# Proto files are compiled as if they lived at tokenmill/api/grpc/, so the generated modules import
# each other as `tokenmill.api.grpc.*`, the name they have once installed.
VIRTUAL_DIR = "tokenmill/api/grpc"


def generate_grpc_modules() -> None:
    import tempfile

    from grpc_tools import protoc

    for proto in sorted(PROTO_DIR.glob("*.proto")):
        with tempfile.TemporaryDirectory() as out:
            args = ["grpc_tools.protoc", f"--proto_path={VIRTUAL_DIR}={PROTO_DIR}", f"--python_out={out}",
                    f"--pyi_out={out}", f"--grpc_python_out={out}", f"{VIRTUAL_DIR}/{proto.name}"]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
            for generated in (Path(out) / VIRTUAL_DIR).iterdir():
                (PROTO_DIR / generated.name).write_text(generated.read_text())


class BuildPyWithProtos(build_py):
    def run(self):
        generate_grpc_modules()
        super().run()


# Built for the machine it is installed on (AVX-512 where there is AVX-512); set TOKENMILL_CPU_ARCH
# (e.g. x86-64-v3) to build a package for other machines.
CPU_ARCH = os.environ.get("TOKENMILL_CPU_ARCH", "native")


def cpu_extension(name: str) -> Extension:
    """plugins/cpu/csrc/NAME.c as tokenmill.plugins.cpu._NAME; OpenMP through libgomp.so.1, the
    soname of PyTorch's own copy, so its parallel loops run on PyTorch's thread pool."""
    return Extension(f"tokenmill.plugins.cpu._{name}", sources=[f"plugins/cpu/csrc/{name}.c"],
                     depends=[str(header) for header in (ROOT / "plugins/cpu/csrc").glob("*.h")],
                     extra_compile_args=["-O3", f"-march={CPU_ARCH}", "-fopenmp"], extra_link_args=["-fopenmp"])


setup(cmdclass={"build_py": BuildPyWithProtos},
      ext_modules=[cpu_extension(name) for name in ("paged_attention", "layer_ops", "bf16_gemm", "decode_stack", "lora",
                                                        "token_mask", "greedy_pick")])
