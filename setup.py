"""Build hook: generate the gRPC Python modules from api/grpc/*.proto with grpcio-tools.

Everything else about the package is declared in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
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


setup(cmdclass={"build_py": BuildPyWithProtos})
