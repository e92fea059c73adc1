"""Plugin discovery and the registries of policies, backends and models.

One :class:`pluggy.PluginManager`. Built-in plugins are ordinary modules registered
through the same hooks as third-party ones; third-party distributions are found
through the ``fastflow`` entry-point group, loaded lazily and once.

``FASTFLOW_LOAD_PLUGINS`` selects which installed plugin distributions load: unset
loads all, an empty string loads none, ``a,b`` loads only those (an unknown name
warns). A plugin that fails to import, or raises inside a hook, is reported with its
name on stderr and recorded in ``fastflow plugins``; the rest keeps working.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import DuplicateNameError, UnknownNameError

ENTRY_POINT_GROUP = "fastflow"

#: Modules that make up fastflow itself; they register through the public hooks.
BUILTIN_PLUGINS = (
    "fastflow.policies.none",
    "fastflow.policies.fixed",
    "fastflow.policies.threshold",
    "fastflow.policies.ucb",
    "fastflow.policies.ucb_paper",
    "fastflow.policies.planned",
    "fastflow.backends.torch_backend",
    "fastflow.backends.torch_compile_backend",
    "fastflow.backends.onnxruntime_backend",
    "fastflow.backends.tensorrt_backend",
    "fastflow.models.analytic",
    "fastflow.models.glyphs",
    "fastflow.models.clips",
    "fastflow.commands.bench",
    "fastflow.commands.export",
    "fastflow.generate_command",
)

KINDS = ("policies", "backends", "models")
SINGULAR = {"policies": "policy", "backends": "backend", "models": "model"}


@dataclass
class Entry:
    """One registered thing: a policy, a backend or a model."""

    kind: str
    name: str
    obj: Any
    plugin: str
    description: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    error: str | None = None
    registers: dict = field(default_factory=lambda: {k: [] for k in (*KINDS, "commands")})


class Plugins:
    """The plugin manager plus the registries built from it."""

    def __init__(self, *, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager("fastflow")
        self.pm.add_hookspecs(hookspecs)
        self._calling: str | None = None  # the plugin whose hook implementation runs now
        if os.environ.get("FASTFLOW_TRACE_PLUGINS"):
            self._trace_to_stderr()
        self.info: dict[str, PluginInfo] = {}
        self._registries: dict[str, dict[str, Entry]] = {}
        for modname in BUILTIN_PLUGINS:
            self._load_module(modname, builtin=True)
        if load_entry_points:
            self._load_entry_points()

    def _trace_to_stderr(self) -> None:
        """FASTFLOW_TRACE_PLUGINS=1: every hook call, its implementations and its time."""
        import time

        started: dict = {}

        def before(hook_name, impls, kwargs):
            started[hook_name] = time.perf_counter()
            names = ", ".join(i.plugin_name for i in reversed(impls))  # pluggy calls the last registered first
            print(f"fastflow trace: {hook_name}({', '.join(kwargs)}) -> {names}", file=sys.stderr)

        def after(outcome, hook_name, impls, kwargs):
            ms = 1000 * (time.perf_counter() - started.pop(hook_name, time.perf_counter()))
            err = outcome.exception
            print(f"fastflow trace: {hook_name} done in {ms:.1f} ms" + (f", raised {err!r}" if err else ""),
                  file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)

    # -- loading -----------------------------------------------------------------
    def _warn(self, message: str) -> None:
        print(f"fastflow: {message}", file=sys.stderr)

    def _load_module(self, modname: str, *, builtin: bool, name: str | None = None,
                     dist: str | None = None, version: str | None = None) -> None:
        name = name or modname
        info = PluginInfo(name=name, distribution=dist, version=version, builtin=builtin)
        self.info[name] = info
        try:
            module = importlib.import_module(modname)
        except Exception as exc:  # a broken third-party plugin must not take fastflow down
            if builtin:  # but fastflow's own modules failing means a broken installation
                from .errors import FastFlowError

                raise FastFlowError(f"fastflow's own module {modname} failed to import ({type(exc).__name__}: "
                                    f"{exc}); the installation is broken: reinstall fastflow") from exc
            info.error = f"{type(exc).__name__}: {exc}"
            self._warn(f"plugin '{name}' failed to load: {info.error}")
            return
        self._register(module, name)

    def _load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        wanted_env = os.environ.get("FASTFLOW_LOAD_PLUGINS")
        wanted = None
        if wanted_env is not None:
            wanted = {w.strip() for w in wanted_env.split(",") if w.strip()}
        seen: set[str] = set()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else ep.name
            version = ep.dist.version if ep.dist is not None else None
            seen.add(dist)
            if wanted is not None and dist not in wanted and ep.name not in wanted:
                continue
            info = PluginInfo(name=ep.name, distribution=dist, version=version)
            if ep.name in self.info:
                info.error = f"plugin name '{ep.name}' is already taken by {self.info[ep.name].distribution or 'fastflow'}"
                self._warn(info.error)
                continue
            self.info[ep.name] = info
            try:
                plugin = ep.load()
            except Exception as exc:
                info.error = f"{type(exc).__name__}: {exc}"
                self._warn(f"plugin '{ep.name}' (from {dist}) failed to load: {info.error}")
                continue
            self._register(plugin, ep.name)
        if wanted:
            for name in sorted(wanted - seen - set(self.info)):
                self._warn(f"FASTFLOW_LOAD_PLUGINS names '{name}', which is not an installed plugin")

    # -- calling hooks ---------------------------------------------------------------
    # Hooks are called through pluggy (``self.pm.hook.<name>(...)``), so ordering,
    # tryfirst/trylast, wrappers and hook-call monitoring work. Each implementation is
    # wrapped once, when its plugin registers, so what it registers is attributed to its
    # plugin and an exception in one plugin spares the others.
    def _register(self, plugin, name: str) -> None:
        self.pm.register(plugin, name=name)
        for caller in self.pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function = self._isolated(impl.function, name, caller.name)

    def _isolated(self, fn, plugin_name: str, hook_name: str):
        def call(*args):
            outer, self._calling = self._calling, plugin_name
            try:
                return fn(*args)
            except DuplicateNameError:
                raise
            except Exception as exc:
                info = self.info.get(plugin_name)
                msg = f"{type(exc).__name__}: {exc}"
                if info is not None:
                    info.error = msg
                self._warn(f"plugin '{plugin_name}' failed in {hook_name}: {msg}")
                return None
            finally:
                self._calling = outer

        return functools.wraps(fn)(call)

    def registry(self, kind: str) -> dict[str, Entry]:
        """Name → :class:`Entry` for ``kind`` in ``policies``, ``backends``, ``models``."""
        if kind in self._registries:
            return self._registries[kind]
        entries: dict[str, Entry] = {}

        def make_register():
            def register(name_or_spec, obj=None, description: str = "", **extra) -> None:
                plugin_name = self._calling or "?"
                if kind == "models":  # register(spec)
                    spec = name_or_spec
                    name, obj, description = spec.name, spec, description or spec.description
                else:
                    name = name_or_spec
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{SINGULAR[kind]} name must be a non-empty string, got {name!r}")
                if name in entries:
                    order = list(self.info)  # registration order (pluggy calls the last first)
                    first, second = sorted((entries[name].plugin, plugin_name),
                                           key=lambda n: order.index(n) if n in order else len(order))
                    raise DuplicateNameError(
                        f"{SINGULAR[kind]} '{name}' is registered by two plugins: '{first}' and "
                        f"'{second}'. Uninstall one, or select plugins with "
                        f"FASTFLOW_LOAD_PLUGINS."
                    )
                entries[name] = Entry(kind, name, obj, plugin_name, description, extra)
                info = self.info.get(plugin_name)
                if info is not None:
                    info.registers[kind].append(name)

            return register

        getattr(self.pm.hook, f"register_{kind}")(register=make_register())
        self._registries[kind] = entries
        return entries

    def get(self, kind: str, name: str) -> Entry:
        entries = self.registry(kind)
        if name not in entries:
            raise UnknownNameError(SINGULAR[kind], name, entries, plural=kind)
        return entries[name]

    def add_commands(self, cli) -> None:
        """Let plugins add click commands; record which plugin added which. A command
        may not be replaced: fastflow's own win, else the first one registered, and the
        other plugin is reported as failing, naming both."""
        owner = getattr(cli, "_fastflow_owners", None)  # command → plugin, kept across calls
        if owner is None:
            owner = cli._fastflow_owners = {}
        for name in cli.commands:
            owner.setdefault(name, "fastflow")  # the CLI's own commands

        class Guarded(dict):  # cli.commands while plugins add theirs
            def __setitem__(d, name, cmd):
                plugin = self._calling or "?"
                if name in d and owner.get(name) != plugin:
                    first = owner.get(name, "?")
                    mine = self.info.get(plugin) is not None and self.info[plugin].builtin
                    theirs = first == "fastflow" or (first in self.info and self.info[first].builtin)
                    loser = first if (mine and not theirs) else plugin
                    if loser == first:
                        dict.__setitem__(d, name, cmd)
                        owner[name] = plugin
                        self._drop_command(first, name)
                    self._conflict(loser, f"command '{name}' is registered by two plugins: '{first}' and "
                                          f"'{plugin}'; {'the first' if loser == plugin else 'fastflow'}'s is kept. "
                                          f"Rename or uninstall one.")
                    return
                dict.__setitem__(d, name, cmd)
                owner[name] = plugin
                if plugin in self.info:
                    self.info[plugin].registers["commands"].append(name)

        plain, cli.commands = cli.commands, Guarded(cli.commands)
        try:
            self.pm.hook.register_commands(cli=cli)
        finally:
            cli.commands = dict(cli.commands)
        for info in self.info.values():
            info.registers["commands"].sort()
        del plain

    def _drop_command(self, plugin: str, name: str) -> None:
        if plugin in self.info and name in self.info[plugin].registers["commands"]:
            self.info[plugin].registers["commands"].remove(name)

    def _conflict(self, plugin: str, msg: str) -> None:
        if plugin in self.info:
            self.info[plugin].error = f"DuplicateNameError: {msg}"
        self._warn(f"plugin '{plugin}' failed in register_commands: DuplicateNameError: {msg}")

    def _availability(self, backend: str) -> str | bool:
        """True, or why the backend cannot run here."""
        entry = self._registries.get("backends", {}).get(backend)
        return _availability_of(entry.obj) if entry is not None else "not registered (name conflict)"

    def describe(self) -> list[dict]:
        """What ``fastflow plugins --json`` prints. A name two plugins register does not
        stop the listing: the conflict is shown on both rows, so the user can fix it."""
        conflicts = []
        for kind in KINDS:
            try:
                self.registry(kind)
            except DuplicateNameError as exc:
                conflicts.append(str(exc))
        for msg in conflicts:
            for info in self.info.values():
                if f"'{info.name}'" in msg:
                    info.error = msg if not info.error else f"{info.error}; {msg}"
        out = []
        for info in self.info.values():
            hooks = []
            plugin = self.pm.get_plugin(info.name)
            if plugin is not None:
                hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            row = {
                "name": info.name,
                "distribution": info.distribution or "fastflow",
                "version": info.version or _fastflow_version(),
                "builtin": info.builtin,
                "hooks": hooks,
                "registers": info.registers,
            }
            if info.registers["backends"]:
                row["available"] = {name: self._availability(name) for name in info.registers["backends"]}
            if info.error:
                row["error"] = info.error
            out.append(row)
        return out


def _availability_of(factory) -> str | bool:
    try:
        ok, reason = factory().available()
    except Exception as exc:  # availability must never break the listing
        return f"{type(exc).__name__}: {exc}"
    return True if ok else reason


def _fastflow_version() -> str:
    from . import __version__

    return __version__


_plugins: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager, created (and entry points loaded) on first use."""
    global _plugins
    if _plugins is None:
        _plugins = Plugins()
    return _plugins


def reset_plugins() -> None:
    """Forget the loaded plugins (tests use this after changing the environment)."""
    global _plugins
    _plugins = None
