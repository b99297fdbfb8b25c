"""The plugin host: one pluggy manager; built-ins load exactly like entry-point plugins.

``QBENCH_LOAD_PLUGINS=a,b`` restricts loading to the named plugins (built-in module names such
as ``qbench.plugins.nf4`` or their short names ``nf4``, and entry-point names). A plugin that
fails to import or register is remembered with its error (``qbench plugins`` shows it) and does
not stop the others.
"""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

import pluggy

from qbench import hookspecs
from qbench.params import QBenchError

ENTRY_POINT_GROUP = "qbench"

BUILTIN_PLUGINS = [
    "qbench.plugins.baseline",
    "qbench.plugins.int8_absmax",
    "qbench.plugins.affine",
    "qbench.plugins.nf4",
    "qbench.plugins.gptq",
    "qbench.plugins.awq",
    "qbench.plugins.smoothquant",
    "qbench.plugins.lora",
    "qbench.plugins.qlora",
    "qbench.plugins.peer_torchao",
    "qbench.plugins.peer_quanto",
    "qbench.plugins.peer_hqq",
    "qbench.plugins.peer_llmcompressor",
    "qbench.suites.memory",
    "qbench.suites.latency",
    "qbench.suites.perplexity",
    "qbench.suites.checkpointing",
    "qbench.suites.fidelity",
    "qbench.executors",
    "qbench.executor_ray",
]

_pm: pluggy.PluginManager | None = None
_failures: dict[str, str] = {}
_sources: dict[str, str] = {}  # plugin name -> "builtin" | "entry point <dist>" | "registered"


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _allowed(names: list[str]) -> set[str] | None:
    raw = os.environ.get("QBENCH_LOAD_PLUGINS")
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _wanted(name: str, allowed: set[str] | None) -> bool:
    return allowed is None or name in allowed or _short(name) in allowed


def get_plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is not None:
        return _pm
    pm = pluggy.PluginManager("qbench")
    pm.add_hookspecs(hookspecs)
    allowed = _allowed(BUILTIN_PLUGINS)
    for module_name in BUILTIN_PLUGINS:
        if _wanted(module_name, allowed):
            _load(pm, module_name, lambda m=module_name: importlib.import_module(m), "builtin")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if _wanted(ep.name, allowed):
            dist = getattr(ep.dist, "name", "?") if getattr(ep, "dist", None) else "?"
            _load(pm, ep.name, ep.load, f"entry point ({dist})")
    _pm = pm
    return pm


def _load(pm: pluggy.PluginManager, name: str, load, source: str) -> None:
    try:
        module = load()
        pm.register(module, name=name)
        _sources[name] = source
    except Exception as exc:  # a broken plugin must not break the others
        _failures[name] = f"{type(exc).__name__}: {exc}"


def register_plugin(module, name: str | None = None) -> None:
    """Register an object implementing qbench hooks (for tests and embedding applications)."""
    pm = get_plugin_manager()
    name = name or getattr(module, "__name__", repr(module))
    pm.register(module, name=name)
    _sources[name] = "registered"
    _registry_cache.clear()


def unregister_plugin(name: str) -> None:
    pm = get_plugin_manager()
    pm.unregister(name=name)
    _sources.pop(name, None)
    _registry_cache.clear()


_registry_cache: dict[str, dict] = {}


def _collect(hook_name: str, key) -> dict:
    if hook_name in _registry_cache:
        return _registry_cache[hook_name]
    pm = get_plugin_manager()
    found: dict = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin_name = impl.plugin_name

        def register(*args, _plugin=plugin_name):
            k, v = key(*args)
            found[k] = (v, _plugin)

        try:
            impl.function(register)
        except Exception as exc:
            _failures[plugin_name] = f"{type(exc).__name__} in {hook_name}: {exc}"
    _registry_cache[hook_name] = found
    return found


def methods() -> dict[str, type]:
    return {k: v for k, (v, _) in _collect("register_methods", lambda cls: (cls.name, cls)).items()}


def suites() -> dict[str, type]:
    return {k: v for k, (v, _) in _collect("register_suites", lambda cls: (cls.name, cls)).items()}


def executors() -> dict[str, type]:
    return {k: v for k, (v, _) in _collect("register_executors", lambda name, cls: (name, cls)).items()}


def provided_by(kind: str) -> dict[str, str]:
    """Name -> plugin that registered it, for ``kind`` in methods|suites|executors."""
    hook = {"methods": "register_methods", "suites": "register_suites", "executors": "register_executors"}[kind]
    getter = {"methods": methods, "suites": suites, "executors": executors}[kind]
    getter()
    return {k: plugin for k, (_, plugin) in _registry_cache[hook].items()}


def plugin_status() -> list[dict[str, str]]:
    """Every plugin seen: loaded ones with where they came from, failed ones with their error."""
    pm = get_plugin_manager()
    methods(), suites(), executors()
    rows = []
    for name, _ in pm.list_name_plugin():
        rows.append({"name": name, "source": _sources.get(name, "?"), "status": "ok", "error": ""})
    for name, error in _failures.items():
        rows = [r for r in rows if r["name"] != name]
        rows.append({"name": name, "source": _sources.get(name, "builtin" if name in BUILTIN_PLUGINS else "entry point"),
                     "status": "failed", "error": error})
    return rows


def make_method(name: str, params: dict):
    registry = methods()
    if name not in registry:
        raise QBenchError(f"unknown method {name!r}; valid methods: {', '.join(sorted(registry)) or '(none loaded)'}")
    return registry[name](**params)


def make_suite(name: str, params: dict):
    registry = suites()
    if name not in registry:
        raise QBenchError(f"unknown suite {name!r}; valid suites: {', '.join(sorted(registry)) or '(none loaded)'}")
    return registry[name](**params)


def reset() -> None:
    """Forget the plugin manager (tests that change QBENCH_LOAD_PLUGINS or entry points)."""
    global _pm
    _pm = None
    _failures.clear()
    _sources.clear()
    _registry_cache.clear()
