"""Counting the host syncs of a piece of code: the tool that proves a decode step is sync-free.

On an accelerator the host queues work and runs ahead of the device; any read of a device value
(`.item()`, `bool(t)`, `.tolist()`, `.cpu()`) or any op whose output shape depends on device values
(`.nonzero()`, `t[mask]`) makes the host wait for the queue to drain, and the step pays the device's
whole latency. A step should have exactly one: reading the sampled token ids.

`SyncAudit` is a dispatch mode that sees every aten op and records the ones that sync, with where in the
Python code each came from. It works on any device, and best on `meta`: meta tensors have shapes and no
data, so a whole step traces on a machine without the accelerator, and kernels that register meta (fake)
implementations, as Triton ops do, run in the trace as they would on the device. On meta a sync cannot
return a real value, so the audit answers with a dummy (0 or False, zeros for a copy to the host, empty
for a data-dependent shape) and the trace runs to the end, counting every sync on its way::

    with SyncAudit() as audit:
        runner.execute(decode_steps)
    assert not audit.syncs, audit.report()

The ops counted, each checked by experiment on torch 2.13 (`tests/engine/test_sync_audit.py`):

- `aten._local_scalar_dense`: what `.item()`, `bool()`, `int()`, `float()` and `torch.is_nonzero` all
  lower to (`aten.is_nonzero` is listed too for kernels that register it directly);
- a copy whose source is on a device and whose destination is the host: `aten._to_copy` (`.cpu()`,
  `.to("cpu")`, and `.tolist()`, which copies to the host first) and `aten.copy_` into a host tensor;
- `aten.nonzero` (`torch.where(cond)` too), `aten.masked_select`, `aten.index.Tensor` /
  `aten.index_put_` with a boolean index (`t[mask]`, `t[mask] = v`, which run a nonzero inside),
  `aten.repeat_interleave.Tensor` without `output_size`: their output sizes come from device values;
- `aten.equal` and `aten.allclose`, which answer a Python bool computed on the device.

Only tensors off the host count: the same ops on host tensors cost no sync.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_SCALAR_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default}
_BOOL_ANSWERS = {aten.equal.default, aten.allclose.default}
_HOST_COPIES = {aten._to_copy.default, aten.copy_.default}
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}

_TORCH_DIR = os.path.dirname(torch.__file__)
_STACK_DEPTH = 3  # frames kept per sync, innermost first


@dataclass(frozen=True)
class Sync:
    """One host sync: the aten op and the innermost Python frames outside torch that led to it."""

    op: str
    stack: tuple[str, ...]  # "path:line in function", innermost first

    @property
    def where(self) -> str:
        return self.stack[0] if self.stack else "?"

    def __str__(self) -> str:
        return f"{self.op} at {' <- '.join(self.stack) or '?'}"


class SyncAudit(TorchDispatchMode):
    """Records every op that makes the host wait for a device (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[Sync] = []

    def report(self) -> str:
        """The syncs, one a line, for an assertion message."""
        return f"{len(self.syncs)} host sync(s):\n" + "\n".join(f"  {sync}" for sync in self.syncs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.syncs.append(Sync(str(func), _stack()))
            if _on_meta(func, args, kwargs):
                return _dummy(func, args, kwargs)
        return func(*args, **kwargs)


def _on_device(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type != "cpu"


def _syncs(func, args, kwargs) -> bool:
    if func in _SCALAR_READS or func in _BOOL_ANSWERS:
        return any(_on_device(a) for a in args)
    if func is aten._to_copy.default:
        destination = kwargs.get("device") or args[0].device
        return _on_device(args[0]) and torch.device(destination).type == "cpu"
    if func is aten.copy_.default:
        return not _on_device(args[0]) and _on_device(args[1])
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None and _on_device(args[0])
    if func in _DATA_DEPENDENT:
        return _on_device(args[0])
    if func in _INDEXING:
        return any(_on_device(i) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None)
    return False


def _on_meta(func, args, kwargs) -> bool:
    if func in _INDEXING:
        return any(isinstance(i, torch.Tensor) and i.is_meta for i in args[1])
    return any(isinstance(a, torch.Tensor) and a.is_meta for a in args)


def _dummy(func, args, kwargs):
    """What a meta tensor's sync returns: values it cannot know, as zeros, and shapes as empty."""
    if func in _SCALAR_READS:
        dtype = args[0].dtype
        return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
    if func in _BOOL_ANSWERS:
        return False
    if func is aten._to_copy.default:
        return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
    if func is aten.copy_.default:
        return args[0].zero_()
    if func is aten.nonzero.default:
        return torch.empty(0, args[0].dim(), dtype=torch.int64, device="meta")
    if func is aten.masked_select.default:
        return torch.empty(0, dtype=args[0].dtype, device="meta")
    if func is aten.repeat_interleave.Tensor:
        return torch.empty(0, dtype=torch.int64, device="meta")
    if func is aten.index.Tensor:
        # A mask of k dimensions selects through k index tensors of its nonzero count: here none.
        indices = []
        for index in args[1]:
            if index is not None and index.dtype in (torch.bool, torch.uint8):
                indices += [torch.empty(0, dtype=torch.int64, device="meta")] * index.dim()
            else:
                indices.append(index)
        return func(args[0], indices)
    return func(*args, **kwargs)  # index_put_ with a mask has a meta kernel: its output shape is known


def _stack() -> tuple[str, ...]:
    frames = [f for f in traceback.extract_stack()[:-1]
              if not f.filename.startswith(_TORCH_DIR) and f.filename != __file__]
    return tuple(f"{_short(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames[-_STACK_DEPTH:]))


def _short(path: str) -> str:
    parts = path.replace(os.sep, "/").split("/")
    return "/".join(parts[-2:])
