"""The embedded SmolLM2-135M-Instruct in every common GGUF type, made by llama.cpp's own `llama-quantize`.

The route is a user's: a bf16 GGUF, then `llama-quantize` to each type. The embedded file is Q4_1 (no
bf16 SmolLM2 GGUF is reachable here), so the bf16 file is that model dequantized by gguf-py and written
back by gguf-py's `GGUFWriter` with every metadata field copied (file type now bf16; 1-D norms float32,
as convert_hf_to_gguf.py keeps them). `llama-quantize` (built with llama-server, see
setup_llama_server.py) then makes each type from that file, so every type quantizes the same weights.

SmolLM2-135M's hidden size is 576, not a multiple of the K-quants' 256-input super-blocks: llama-quantize
stores those tensors in its fallback types (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K/IQ4_XS
-> IQ4_NL), so each K file mixes several types; `python -m benchmarks.quantized_files` lists them.
Files are cached under the bench cache; delete them to remake.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from benchmarks.cache import bench_cache
from benchmarks.setup_llama_server import build_llama_quantize

# llama-quantize's names; *_M are the mixes most GGUFs are published in.
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS")
STEM = "SmolLM2-135M-Instruct"


def _directory() -> Path:
    directory = bench_cache() / "gguf"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def bf16_file() -> Path:
    """The embedded model as a bf16 GGUF (made once)."""
    from tokenmill.loader import default_model_path
    from tokenmill.loader.gguf_file import GGUFFile

    path = _directory() / f"{STEM}.BF16.gguf"
    if path.exists():
        return path
    source = default_model_path()
    reader, tensors = gguf.GGUFReader(source), GGUFFile(source)
    partial = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        # GGUF.* are the reader's own; the writer writes the architecture; the file type changes.
        if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    for name, info in tensors.tensors.items():
        values = np.asarray(tensors.load(name), dtype=np.float32)
        if values.ndim == 1:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(path)
    return path


def quantized_file(ggml_type: str, threads: int = 2) -> Path:
    """The model in llama-quantize's `ggml_type` (one of TYPES), made from `bf16_file()` once."""
    path = _directory() / f"{STEM}.{ggml_type}.gguf"
    if path.exists():
        return path
    partial = path.with_suffix(".partial")
    result = subprocess.run([str(build_llama_quantize()), str(bf16_file()), str(partial), ggml_type, str(threads)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-quantize {ggml_type} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    partial.rename(path)
    return path


def quantized_files(types: tuple[str, ...] = TYPES, threads: int = 2) -> dict[str, Path]:
    return {ggml_type: quantized_file(ggml_type, threads) for ggml_type in types}


def linear_types(path: Path) -> Counter:
    """How many 2-D (matrix) tensors of the file are stored in each ggml type."""
    from tokenmill.loader.gguf_file import GGUFFile

    return Counter(info.ggml_type.name for info in GGUFFile(path).tensors.values() if len(info.shape) == 2)


if __name__ == "__main__":  # python -m benchmarks.quantized_files
    for name, file in quantized_files().items():
        print(f"{name}: {file.stat().st_size / 1e6:.0f} MB, matrices {dict(linear_types(file))}", flush=True)
