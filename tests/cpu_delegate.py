"""A test backend that is the CPU plugin hook for hook, for tests that change one thing about it."""

from __future__ import annotations

from tokenmill.hookspecs import hookimpl
from tokenmill.interfaces import BackendStatus, Discovery
from tokenmill.plugins import cpu


class CPUDelegate:
    """The CPU plugin's required hooks; a subclass overrides what its test is about."""

    reason = "the CPU, delegated to"

    @hookimpl
    def tokenmill_discover(self):
        return Discovery(BackendStatus.USABLE, self.reason, priority=-1)

    @hookimpl
    def tokenmill_init_device(self, device_index):
        return cpu.tokenmill_init_device(device_index)

    @hookimpl
    def tokenmill_memory_budget(self, request):
        return cpu.tokenmill_memory_budget(request)

    @hookimpl
    def tokenmill_kv_cache_layout(self, shape, device):
        return cpu.tokenmill_kv_cache_layout(shape, device)

    @hookimpl
    def tokenmill_attention_backend(self, spec, layout):
        return cpu.tokenmill_attention_backend(spec, layout)
