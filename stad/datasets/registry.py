"""Finding dataset adapters through the ``stad.datasets`` entry-point group.

Discovery reads installed distributions' metadata only; nothing is imported until an adapter
is used (the pattern of xarray's backends and flake8's plugin finder). A plugin that fails to
import, declares an API version we do not speak, or raises while listing samples is reported
with its name, distribution and version as a :class:`~stad.errors.PluginError` (exit code 5);
it never breaks ``stad --help``, ``stad datasets list`` or other adapters. Built-in adapters
are registered through the same group, so that path is exercised on every run.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from stad.datasets.base import API_VERSION, DatasetAdapter, Sample, Split, is_path
from stad.errors import DataError, PluginError, StadError, UsageError

GROUP = "stad.datasets"
BUILTIN_DISTRIBUTION = "stad"

T = TypeVar("T")


@dataclass(frozen=True)
class AdapterEntry:
    """One registered adapter, known from metadata alone."""

    name: str
    value: str
    distribution: str
    version: str
    shadowed_by: str | None = None  # another distribution registering the same name

    def label(self) -> str:
        where = f"{self.distribution} {self.version}"
        return f"dataset adapter '{self.name}' ({self.value}, from {where})"

    def advice(self) -> str:
        """What the user can do about a fault of this plugin."""
        if self.distribution == BUILTIN_DISTRIBUTION:
            return "a bug in stad: please report it"
        return f"a fault of the plugin: report it to {self.distribution}'s authors or uninstall it"


# A plugin's code may end the process (sys.exit, in a module that needs what is not installed):
# that is its fault too, never a silent exit 0 of the command that loaded it.
_PLUGIN_FAULTS = (Exception, SystemExit)


def _entry_points() -> list[md.EntryPoint]:
    return list(md.entry_points(group=GROUP))


def discover() -> list[AdapterEntry]:
    """Every registered adapter, sorted by name, without importing any of them.

    When two distributions register the same name, the built-in one (from ``stad``) wins;
    between two third-party distributions neither wins, and using the name is an error.
    Both are listed, the loser with ``shadowed_by`` set.
    """
    by_name: dict[str, list[AdapterEntry]] = {}
    for ep in _entry_points():
        dist = ep.dist
        entry = AdapterEntry(
            name=ep.name,
            value=ep.value,
            distribution=dist.name if dist is not None else "unknown",
            version=dist.version if dist is not None else "unknown",
        )
        group = by_name.setdefault(ep.name, [])
        if entry not in group:  # the same distribution seen twice on sys.path
            group.append(entry)
    out: list[AdapterEntry] = []
    for name in sorted(by_name):
        group = sorted(by_name[name], key=lambda e: (e.distribution != BUILTIN_DISTRIBUTION,
                                                     e.distribution))
        if len(group) == 1:
            out.append(group[0])
            continue
        winner = group[0] if group[0].distribution == BUILTIN_DISTRIBUTION else None
        for e in group:
            if e is winner:
                out.append(e)
            else:
                others = ", ".join(o.distribution for o in group if o is not e)
                out.append(replace(e, shadowed_by=others))
    return out


def names() -> list[str]:
    """Names of the adapters that can be used."""
    return sorted({e.name for e in discover()})


def _find(name: str) -> AdapterEntry:
    entries = [e for e in discover() if e.name == name]
    if not entries:
        known = ", ".join(names()) or "none"
        raise UsageError(f"no dataset adapter named '{name}' (installed: {known}); "
                        "see `stad datasets list`")
    usable = [e for e in entries if e.shadowed_by is None]
    if not usable:
        dists = ", ".join(f"{e.distribution} {e.version}" for e in entries)
        raise PluginError(f"dataset adapter '{name}' is registered by several distributions "
                          f"({dists}); uninstall all but one")
    return usable[0]


def load_entry(entry: AdapterEntry) -> DatasetAdapter:
    """Import and instantiate one adapter, checking its API version.

    What the plugin prints while it is imported and started goes to stderr on the main thread
    (:func:`_plugin_output`), as it does while the adapter lists categories and samples."""
    with _plugin_output():
        return _load_entry(entry)


def _plugin_output() -> contextlib.AbstractContextManager[object]:
    """Where a plugin's prints go while its code runs: stderr on the main thread, so that they
    never mix into a command's ``--json`` stdout; untouched on other threads (``sys.stdout``
    is the process's, and the API may load adapters on several)."""
    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(sys.stderr)


def _load_entry(entry: AdapterEntry) -> DatasetAdapter:
    try:
        factory = md.EntryPoint(name=entry.name, value=entry.value, group=GROUP).load()
    except _PLUGIN_FAULTS as exc:  # a plugin can raise anything on import
        raise PluginError(f"{entry.label()} failed to import: {type(exc).__name__}: {exc}; "
                          f"{entry.advice()}") from exc
    if not inspect.isclass(factory):
        raise PluginError(f"{entry.label()} names {type(factory).__name__} {factory!r:.60}, not "
                          "a class; the entry point must name the adapter class, as "
                          "'module:Class'")
    version = getattr(factory, "api_version", None)
    if not hasattr(factory, "api_version"):
        raise PluginError(f"{entry.label()} has no class attribute api_version; set it to the "
                          f"adapter API it was written for (this stad speaks {API_VERSION})")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PluginError(f"{entry.label()} has api_version {version!r}, not a whole number; "
                          f"this stad speaks {API_VERSION}")
    if version != API_VERSION:
        newer = "the plugin" if version < API_VERSION else "stad"
        raise PluginError(
            f"{entry.label()} speaks adapter API {version}, this stad speaks {API_VERSION}; "
            f"upgrade {newer}"
        )
    try:
        adapter = factory()
    except _PLUGIN_FAULTS as exc:
        raise PluginError(f"{entry.label()} failed to start: {type(exc).__name__}: {exc}; "
                          f"{entry.advice()}") from exc
    for method in ("categories", "samples"):
        if not callable(getattr(adapter, method, None)):
            raise PluginError(f"{entry.label()} has no {method}() method")
    return adapter


_END = object()  # the end of an adapter's samples (None is a plugin's mistake, not the end)


class Adapter:
    """A loaded adapter whose faults are reported as faults of the plugin, by name.

    ``DataError`` from the adapter (the data does not fit its layout) passes through with its
    exit code 3, and so does an ``OSError`` that names a file (a folder without read
    permission, a file gone: the data's fault, not the plugin's), as a ``DataError`` naming
    it; any other exception, on listing or half-way through iteration, becomes a
    ``PluginError`` naming the plugin.
    """

    def __init__(self, entry: AdapterEntry, adapter: DatasetAdapter) -> None:
        self.entry = entry
        self.name = entry.name
        self._adapter = adapter
        self.description: str = str(getattr(adapter, "description", ""))

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            with _plugin_output():
                return fn()
        except StadError:
            raise
        except _PLUGIN_FAULTS as exc:
            if isinstance(exc, OSError) and exc.filename is not None:
                raise DataError(f"cannot read {exc.filename}: {exc.strerror or exc} (dataset "
                                f"adapter {self.name!r}, in {what})") from None
            raise PluginError(f"{self.entry.label()} failed in {what}: "
                              f"{type(exc).__name__}: {exc}; {self.entry.advice()}") from exc

    def default_root(self) -> Path | None:
        """The adapter's own data root when ``--root`` is not given (optional hook)."""
        hook = getattr(self._adapter, "default_root", None)
        if not callable(hook):
            return None
        root = self._guard("default_root()", hook)
        if root is None:  # no default: --root is needed
            return None
        if not is_path(root):
            raise PluginError(f"{self.entry.label()}: default_root() returned "
                              f"{type(root).__name__} {root!r:.60}, not a path or None")
        return Path(root)

    def categories(self, root: Path) -> list[str]:
        found = self._guard("categories()", lambda: self._adapter.categories(Path(root)))
        if isinstance(found, str | bytes) or not isinstance(found, Iterable):
            raise PluginError(f"{self.entry.label()}: categories() returned "
                              f"{type(found).__name__}, not a list of str")
        found = self._guard("categories()", lambda: list(found))
        wrong = [c for c in found if not isinstance(c, str)]
        if wrong:
            raise PluginError(f"{self.entry.label()}: categories() returned a list holding "
                              f"{type(wrong[0]).__name__} {wrong[0]!r}, not only str")
        return sorted(found)

    def samples(self, root: Path, category: str, split: Split) -> Iterator[Sample]:
        it = self._guard("samples()", lambda: iter(self._adapter.samples(Path(root), category,
                                                                          split)))
        while True:
            sample = self._guard("samples()", lambda: next(it, _END))
            if sample is _END:
                return
            if not isinstance(sample, Sample):
                raise PluginError(f"{self.entry.label()} yielded {type(sample).__name__}, "
                                  "not stad.datasets.Sample")
            if sample.split != split:  # e.g. test images, anomalous ones too, listed as val
                raise PluginError(f"{self.entry.label()} yielded a sample of split "
                                  f"{sample.split!r} ({sample.image}) when asked for {split!r}")
            yield sample

    def list_samples(self, root: Path, category: str, split: Split) -> list[Sample]:
        """The samples of a split, held. An image listed twice among the validation or test
        samples would count twice in the calibration or the metrics: refused (training images
        may repeat, as lines of a list file may, and are streamed without being held)."""
        out = list(self.samples(root, category, split))
        if split != "train":
            seen: set[str] = set()
            for sample in out:
                key = os.path.abspath(sample.image)
                if key in seen:
                    raise PluginError(f"{self.entry.label()} yielded {sample.image} twice in "
                                      f"the {split} split; each image must be listed once")
                seen.add(key)
        return out


def get_adapter(name: str) -> Adapter:
    """Load the adapter registered as ``name``."""
    entry = _find(name)
    return Adapter(entry, load_entry(entry))


def check(entry: AdapterEntry) -> str:
    """``"ok"`` or a one-line reason why the adapter cannot be used (for ``datasets list``)."""
    return describe(entry)[0]


def describe(entry: AdapterEntry) -> tuple[str, str]:
    """:func:`check`'s status and the adapter's one-line ``description`` ("" where it cannot be
    loaded)."""
    if entry.shadowed_by is not None:
        if BUILTIN_DISTRIBUTION in entry.shadowed_by.split(", "):
            return (f"not used: '{entry.name}' is a built-in adapter of stad; rename this entry "
                    "point"), ""
        return f"duplicate name, also registered by {entry.shadowed_by}", ""
    try:
        adapter = load_entry(entry)
    except PluginError as exc:
        return f"error: {exc}", ""
    return "ok", Adapter(entry, adapter).description
