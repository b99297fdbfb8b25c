"""The plugin host: one pluggy manager; built-ins load exactly like entry-point plugins.

``QBENCH_LOAD_PLUGINS=a,b`` restricts loading to the named plugins (built-in module names such
as ``qbench.plugins.nf4`` or their short names ``nf4``, and entry-point names). A plugin that
fails to import or register — whatever it raises, ``SystemExit`` included — is remembered with its
error (``qbench plugins`` shows it) and does not stop the others; Ctrl-C while one loads is
reported, then stops the program as usual.

A name is provided by one distribution only: a plugin registering a method, suite or executor
name that another one already provides is refused with a message naming both distributions (a
built-in keeps its name; between two third-party plugins neither gets it until one is
uninstalled). Every record says which distribution and version provided its method and suite.
"""
from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points

import pluggy

from qbench import hookspecs
from qbench.params import QBenchError, label

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
    "qbench.suites.accuracy",
    "qbench.executors",
    "qbench.executor_ray",
]

_pm: pluggy.PluginManager | None = None
_failures: dict[str, str] = {}
_sources: dict[str, str] = {}  # plugin name -> "builtin" | "entry point <dist>" | "registered"
_dists: dict[str, tuple[str | None, str | None]] = {}  # plugin name -> (distribution, version)
_refused: dict[str, dict[str, str]] = {}  # hook -> name -> why nobody gets that name


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
            _dists[module_name] = (OWN_DISTRIBUTION, _own_version())
            _load(pm, module_name, lambda m=module_name: importlib.import_module(m), "builtin")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if _wanted(ep.name, allowed):
            dist = getattr(ep.dist, "name", "?") if getattr(ep, "dist", None) else "?"
            _dists[ep.name] = (dist, getattr(ep.dist, "version", None) if getattr(ep, "dist", None) else None)
            _load(pm, ep.name, ep.load, f"entry point ({dist})")
    _pm = pm
    return pm


OWN_DISTRIBUTION = "qbench-quant"


def _own_version() -> str | None:
    from qbench.records import distribution_version

    return distribution_version(OWN_DISTRIBUTION)


def _isolated(plugin: str, action: str, call) -> bool:
    """Run ``call()``; whatever it raises is the plugin's failure, not qbench's. True if it worked.
    Ctrl-C is recorded and said, then goes on stopping the program."""
    try:
        call()
        return True
    except KeyboardInterrupt:
        _failures[plugin] = f"KeyboardInterrupt {action}"
        print(f"qbench: interrupted {action} plugin {plugin}", file=sys.stderr, flush=True)
        raise
    except BaseException as exc:  # noqa: B036 — SystemExit from a plugin must not end qbench
        detail = f": {exc}" if str(exc) else ""
        _failures[plugin] = f"{type(exc).__name__} {action}{detail}"
        return False


def _load(pm: pluggy.PluginManager, name: str, load, source: str) -> None:
    def load_and_register():
        pm.register(load(), name=name)
        _sources[name] = source

    _isolated(name, "while importing", load_and_register)


def register_plugin(module, name: str | None = None) -> None:
    """Register an object implementing qbench hooks (for tests and embedding applications)."""
    pm = get_plugin_manager()
    name = name or getattr(module, "__name__", repr(module))
    pm.register(module, name=name)
    _sources[name] = "registered"
    _registry_cache.clear()
    _refused.clear()


def unregister_plugin(name: str) -> None:
    pm = get_plugin_manager()
    pm.unregister(name=name)
    _sources.pop(name, None)
    _registry_cache.clear()
    _refused.clear()


_registry_cache: dict[str, dict] = {}


def provider(plugin: str) -> str:
    """\"qbench-sign-method 0.1\" — the distribution (and version) a plugin came from."""
    dist, version = _dists.get(plugin, (None, None))
    if dist is None:
        return f"{plugin} (registered in process)"
    return f"{dist} {version}" if version else dist


def _collect(hook_name: str, key) -> dict:
    if hook_name in _registry_cache:
        return _registry_cache[hook_name]
    pm = get_plugin_manager()
    offers: dict = {}  # name -> [(value, plugin)], in load order (built-ins first)
    for impl in getattr(pm.hook, hook_name).get_hookimpls():  # in registration order: built-ins first
        plugin_name = impl.plugin_name

        def register(*args, _plugin=plugin_name):
            k, v = key(*args)
            mine = [o for o in offers.setdefault(k, []) if o[1] != _plugin]
            offers[k] = mine + [(v, _plugin)]  # a plugin registering a name twice keeps its last

        _isolated(plugin_name, f"in {hook_name}", lambda: impl.function(register))
    found: dict = {}
    kind = hook_name.removeprefix("register_").rstrip("s")
    for k, offered in offers.items():
        if len(offered) == 1:
            found[k] = offered[0]
            continue
        builtins = [o for o in offered if _sources.get(o[1]) == "builtin"]
        owners = " and ".join(provider(p) for _, p in offered)
        if builtins:
            found[k] = builtins[0]
            for _, plugin in offered:
                if plugin != builtins[0][1]:
                    why = (f"{kind} {k!r} of {provider(plugin)} (plugin {plugin}) is refused: "
                           f"{provider(builtins[0][1])} provides it; rename it in {provider(plugin)}")
                    _failures[plugin] = "; ".join(filter(None, [_failures.get(plugin), why]))
                    _warn_once(why)
        else:
            why = (f"{kind} {k!r} is provided by both {owners}; uninstall one of them (or rename the {kind} in one)")
            _refused.setdefault(hook_name, {})[k] = why
            for _, plugin in offered:
                _failures[plugin] = "; ".join(filter(None, [_failures.get(plugin), why]))
            _warn_once(why)
    _registry_cache[hook_name] = found
    return found


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"qbench: warning: {message}", file=sys.stderr, flush=True)


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


def provenance(kind: str, name: str) -> dict[str, str | None]:
    """Which plugin, distribution and version provided method/suite/executor ``name`` (for records)."""
    plugin = provided_by(kind).get(name)
    dist, version = _dists.get(plugin, (None, None)) if plugin else (None, None)
    return {"plugin": plugin, "distribution": dist, "version": version}


def plugin_status() -> list[dict[str, str]]:
    """Every plugin seen: loaded ones with where they came from, failed ones with their error."""
    pm = get_plugin_manager()
    methods(), suites(), executors()
    rows = []
    for name, _ in pm.list_name_plugin():
        rows.append({"name": name, "source": _sources.get(name, "?"), "status": "ok", "error": ""})
    for name, error in _failures.items():
        rows = [r for r in rows if r["name"] != name]
        source = _sources.get(name, "builtin" if name in BUILTIN_PLUGINS else "entry point")
        rows.append({"name": name, "source": source,
                     "status": "failed", "error": error})
    return rows


def check_refused(kind: str, name: str) -> None:
    """QBenchError if two plugins offer ``name`` (kind: methods, suites, executors) and neither got it."""
    hook = f"register_{kind}"
    {"methods": methods, "suites": suites, "executors": executors}[kind]()
    if name in _refused.get(hook, {}):
        raise QBenchError(_refused[hook][name])


def current_label(method: dict) -> str:
    """A recorded method's label by today's defaults. A label leaves default values out and defaults
    change (gptq's act_order, then sym), so the label a record was written with may name other
    values today. Rebuilt from the recorded values where the record has every parameter the
    installed method has; else the recorded label."""
    recorded = method.get("label", method["name"])
    params, defaults = method.get("params"), getattr(methods().get(method["name"]), "params", None)
    if not isinstance(params, dict) or not isinstance(defaults, dict) or set(defaults) - set(params):
        return recorded
    return label(method["name"], {k: v for k, v in params.items() if k in defaults}, defaults)


def make_method(name: str, params: dict):
    registry = methods()
    check_refused("methods", name)
    if name not in registry:
        raise QBenchError(f"unknown method {name!r}; valid methods: {', '.join(sorted(registry)) or '(none loaded)'}")
    return registry[name](**params)


def make_suite(name: str, params: dict):
    registry = suites()
    check_refused("suites", name)
    if name not in registry:
        raise QBenchError(f"unknown suite {name!r}; valid suites: {', '.join(sorted(registry)) or '(none loaded)'}")
    return registry[name](**params)


def reset() -> None:
    """Forget the plugin manager (tests that change QBENCH_LOAD_PLUGINS or entry points)."""
    global _pm
    _pm = None
    _failures.clear()
    _sources.clear()
    _dists.clear()
    _refused.clear()
    _warned.clear()
    _registry_cache.clear()
