"""Finding, validating and choosing backend plugins.

Every backend, ours included, is an entry point in the ``tokenmill.backends`` group. Loading one runs
three checks, and a plugin that fails any of them is *refused* (listed with the reason, never
registered): its module imports, pluggy accepts its hook implementations (known hook names, no
argument the spec lacks), and it implements `tokenmill_discover`. Discovery then runs per plugin in
its own try/except, so one broken plugin never takes the process down.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy

from tokenmill import defaults, hookspecs
from tokenmill.errors import BackendUnavailableError
from tokenmill.interfaces import BackendStatus, Discovery

logger = logging.getLogger(__name__)

DEFAULTS_NAME = "tokenmill.defaults"


@dataclass(frozen=True)
class PluginReport:
    """One registered or refused plugin and what its discovery said."""

    name: str
    source: str  # the entry point's value, or the object registered directly
    distribution: str | None  # the installed package that provides it
    discovery: Discovery
    missing_hooks: tuple[str, ...] = ()  # hooks it needs to run but does not implement

    @property
    def is_selectable(self) -> bool:
        return self.discovery.is_usable and not self.missing_hooks


@dataclass(frozen=True)
class Selection:
    """The chosen backend and why it was chosen."""

    name: str
    reason: str
    report: PluginReport


class BackendRegistry:
    """The plugin manager of one process: registers plugins, runs discovery, picks a backend."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.pm.register(defaults, name=DEFAULTS_NAME)
        self._sources: dict[str, tuple[str, str | None]] = {}
        self._refused: dict[str, PluginReport] = {}
        self._reports: dict[str, PluginReport] | None = None

    # ---- registration -----------------------------------------------------------------------------

    def load_entry_points(self, group: str = hookspecs.ENTRY_POINT_GROUP) -> None:
        """Load and register every plugin advertised under `group`."""
        for entry_point in sorted(importlib.metadata.entry_points(group=group), key=lambda ep: ep.name):
            distribution = entry_point.dist.name if entry_point.dist else None
            if entry_point.name in self._sources or entry_point.name in self._refused:
                logger.warning("backend %r is registered twice; keeping the first", entry_point.name)
                continue
            try:
                plugin = entry_point.load()
            except Exception as exc:  # noqa: BLE001 - any import failure refuses this plugin alone
                self._refuse(entry_point.name, entry_point.value, distribution, f"import failed: {exc!r}")
                continue
            self.register(entry_point.name, plugin, source=entry_point.value, distribution=distribution)

    def register(self, name: str, plugin: Any, source: str | None = None, distribution: str | None = None) -> bool:
        """Validate and register one plugin; return False (and record why) when it is refused."""
        source = source or repr(plugin)
        problem = self._contract_problem(plugin)
        if problem is None:
            try:
                self.pm.register(plugin, name=name)
            except pluggy.PluginValidationError as exc:
                problem = str(exc)
            except ValueError as exc:  # already registered under another name
                problem = str(exc)
        if problem is not None:
            self._refuse(name, source, distribution, problem)
            return False
        self._sources[name] = (source, distribution)
        self._reports = None
        return True

    def _contract_problem(self, plugin: Any) -> str | None:
        names = {name for name in dir(plugin) if name.startswith("tokenmill_")}
        unknown = sorted(name for name in names if not hasattr(hookspecs, name))
        if unknown:
            return f"defines {', '.join(unknown)}, which match no hook in tokenmill.hookspecs"
        missing = [name for name in hookspecs.REQUIRED_AT_LOAD if name not in names]
        if missing:
            return f"does not implement the required hook {', '.join(missing)}"
        not_marked = sorted(n for n in names if self.pm.parse_hookimpl_opts(plugin, n) is None)
        if not_marked:
            return f"{', '.join(not_marked)} not marked with @tokenmill.hookimpl"
        return None

    def _refuse(self, name: str, source: str, distribution: str | None, why: str) -> None:
        message = f"backend plugin {name!r} ({source}) refused: {why}"
        logger.error(message)
        discovery = Discovery(status=BackendStatus.REFUSED, reason=why, priority=-1)
        self._refused[name] = PluginReport(name, source, distribution, discovery)
        self._reports = None

    # ---- discovery and selection ------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return sorted(self._sources)

    def plugin(self, name: str) -> Any:
        return self.pm.get_plugin(name)

    def reports(self) -> dict[str, PluginReport]:
        """Every plugin, registered or refused, with its discovery; computed once per registry."""
        if self._reports is None:
            reports = dict(self._refused)
            for name in self.names:
                reports[name] = self._discover(name)
            self._reports = dict(sorted(reports.items()))
        return self._reports

    def _discover(self, name: str) -> PluginReport:
        source, distribution = self._sources[name]
        plugin = self.pm.get_plugin(name)
        try:
            discovery = plugin.tokenmill_discover()
            if not isinstance(discovery, Discovery):
                raise TypeError(f"tokenmill_discover returned {type(discovery).__name__}, not Discovery")
        except Exception as exc:  # noqa: BLE001 - a failing discovery must not take the process down
            logger.warning("discovery of backend %r failed: %r", name, exc)
            discovery = Discovery(status=BackendStatus.ERROR, reason=f"discovery raised {exc!r}", priority=-1)
        missing = tuple(hook for hook in hookspecs.REQUIRED_TO_RUN if not hasattr(plugin, hook))
        if not any(all(hasattr(plugin, hook) for hook in hooks)
                   for hooks in (hookspecs.PAGED_CACHE_HOOKS, hookspecs.OWN_MODEL_HOOKS)):
            missing += tuple(hook for hook in hookspecs.PAGED_CACHE_HOOKS if not hasattr(plugin, hook))
        if discovery.is_usable and missing:
            discovery = Discovery(
                status=BackendStatus.INCOMPLETE,
                reason=f"device found, but the plugin does not implement {', '.join(missing)}",
                priority=discovery.priority,
                devices=discovery.devices,
                versions=discovery.versions,
                install_extra=discovery.install_extra,
            )
        return PluginReport(name, source, distribution, discovery, missing)

    def select(self, forced: str | None = None) -> Selection:
        """The backend to run: `forced` if given and usable, else the highest-priority usable one."""
        reports = self.reports()
        if forced:
            if forced not in reports:
                raise BackendUnavailableError(
                    f"no backend named {forced!r}; registered backends: {', '.join(reports) or 'none'}"
                )
            report = reports[forced]
            if not report.is_selectable:
                hint = _install_hint(report.discovery)
                raise BackendUnavailableError(
                    f"backend {forced!r} is not usable: {report.discovery.status.value}: "
                    f"{report.discovery.reason}{hint}"
                )
            return Selection(forced, "forced by --backend / TOKENMILL_BACKEND", report)
        candidates = [r for r in reports.values() if r.is_selectable]
        if not candidates:
            raise BackendUnavailableError("no usable backend found; run `tokenmill env` to see why")
        best = max(candidates, key=lambda r: (r.discovery.priority, r.name))
        others = [r.name for r in candidates if r is not best]
        why = f"highest priority ({best.discovery.priority}) among usable backends"
        why += f" (also usable: {', '.join(others)})" if others else " (the only usable one)"
        return Selection(best.name, why, best)

    def subset_caller(self, name: str, hook: str) -> Any:
        """A hook caller that reaches only plugin `name` and the core's defaults."""
        others = [p for n, p in self.pm.list_name_plugin() if n not in (name, DEFAULTS_NAME)]
        return self.pm.subset_hook_caller(hook, remove_plugins=others)


def _install_hint(discovery: Discovery) -> str:
    if discovery.status is BackendStatus.LIBRARY_MISSING and discovery.install_extra:
        return f" (install it with: pip install 'tokenmill[{discovery.install_extra}]')"
    return ""


def load_registry(extra_plugins: Iterable[tuple[str, Any]] = ()) -> BackendRegistry:
    """A registry with every entry-point plugin loaded, plus `extra_plugins` registered directly."""
    registry = BackendRegistry()
    registry.load_entry_points()
    for name, plugin in extra_plugins:
        registry.register(name, plugin)
    return registry
