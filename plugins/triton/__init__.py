"""Triton kernels shared by the cuda, rocm and xpu backends: paged attention and fused layer ops.

A kernel library, not a backend: it registers no entry point and implements no hooks. Those plugins
build their `AttentionBackend` and `LayerOps` from `attention.py` and `layer_ops.py` here; `ops.py`
exposes every launcher as a `torch.library` custom op, and `aot.py` compiles the kernels for GPU
targets on a machine without one. Kernel modules import Triton, so nothing is imported from here.
"""
