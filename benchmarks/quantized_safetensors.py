"""The embedded SmolLM2-135M-Instruct as pre-quantized safetensors checkpoints, one per format tokenmill reads.

The source is the bf16 HF folder the bench exports from the embedded GGUF for vLLM
(`benchmarks.setup_vllm.export_hf_folder`: the Q4_1 model dequantized), read in float32. Each format is
written from it by round-to-nearest (`benchmarks.quantize_checkpoints`): compressed-tensors by the library's
own compressors, GPTQ, AWQ and fp8 packed from their published layouts. No calibration: GPTQ's and AWQ's
own algorithms want a GPU and time; these files test the format's path, and a calibrated file would score
better than its row.

GPTQ and AWQ take the usual 128-input groups: SmolLM2-135M's hidden size, 576, is 4.5 of them, so each row
ends in a 64-input group, as real 128-group quantizers leave it (the loader reads such short last groups
exactly). compressed-tensors' own compressor refuses groups that do not divide the inputs ("tensor column
shape must be divisble by the given group_size"), so its W4A16 takes groups of 64.
Files are cached under the bench cache; delete them to remake.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable

from benchmarks import quantize_checkpoints as write
from benchmarks.cache import bench_cache
from benchmarks.setup_vllm import export_hf_folder

GROUP = 128
CT_GROUP = 64  # compressed-tensors' compressor wants groups that divide 576
INT = dict(type="int", symmetric=True)
FP8 = dict(num_bits=8, type="float", symmetric=True, strategy="channel")

# name -> how to write it from (model, tokenizer, folder).
FORMATS: dict[str, Callable[[Any, Any, Path], Any]] = {
    f"GPTQ 4-bit g{GROUP} sym": lambda m, t, f: write.write_gptq(m, t, f, 4, GROUP, desc_act=False, symmetric=True),
    f"GPTQ 4-bit g{GROUP} act-order asym": lambda m, t, f: write.write_gptq(m, t, f, 4, GROUP, desc_act=True,
                                                                           symmetric=False),
    f"AWQ 4-bit g{GROUP}": lambda m, t, f: write.write_awq(m, t, f, GROUP),
    "fp8 per-channel (fbgemm_fp8)": write.write_fp8_channels,
    "compressed-tensors W8A8-FP8": lambda m, t, f: write.write_compressed_tensors(
        m, t, f, FP8, "float-quantized", input_activations=dict(FP8, strategy="token", dynamic=True)),
    f"compressed-tensors W4A16 g{CT_GROUP}": lambda m, t, f: write.write_compressed_tensors(
        m, t, f, dict(INT, num_bits=4, strategy="group", group_size=CT_GROUP), "pack-quantized"),
    "compressed-tensors W8A16 per-channel": lambda m, t, f: write.write_compressed_tensors(
        m, t, f, dict(INT, num_bits=8, strategy="channel"), "pack-quantized"),
}


def source_folder() -> Path:
    """The dense bf16 checkpoint every format is made from (the one vLLM serves in the bench)."""
    from tokenmill.loader import default_model_path

    return export_hf_folder(Path(default_model_path()))


def _folder_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def quantized_checkpoints(names: tuple[str, ...] = tuple(FORMATS)) -> dict[str, Path]:
    """Each named format's checkpoint folder, made once (the source model is read only when one is missing)."""
    directory = bench_cache() / "safetensors"
    folders = {name: directory / f"SmolLM2-135M-Instruct.{_folder_name(name)}" for name in names}
    missing = [name for name, folder in folders.items() if not (folder / "config.json").exists()]
    if missing:
        model, tokenizer = _source_model()
        for name in missing:
            print(f"writing SmolLM2 as {name}", flush=True)
            partial = folders[name].with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            FORMATS[name](model, tokenizer, partial)
            partial.rename(folders[name])
    return folders


def _source_model() -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = source_folder()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


if __name__ == "__main__":  # python -m benchmarks.quantized_safetensors
    for format_name, path in quantized_checkpoints().items():
        size = sum(file.stat().st_size for file in path.iterdir())
        print(f"{format_name}: {path} ({size / 1e6:.0f} MB)", flush=True)
