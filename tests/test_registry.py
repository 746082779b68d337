"""Tests of stad.datasets.registry: adapter discovery, lazy loading and broken plugins.

Entry points are faked: ``stad.datasets.registry._entry_points`` is replaced by a list of real
``importlib.metadata.EntryPoint`` objects bound (``EntryPoint._for``) to small fake
distributions, pointing at plugin modules that each test writes under ``tmp_path``. Module
names carry a per-test suffix, so no test sees a module imported by another.
"""

from __future__ import annotations

import importlib.metadata as md
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import FAILS_HALF_WAY, FAILS_LISTING
from typer.testing import CliRunner

import stad.datasets.registry as registry
from stad._version import __version__
from stad.cli import app
from stad.datasets.base import Sample
from stad.errors import DataError, PluginError, UsageError

GOOD = '''
from pathlib import Path
from stad.datasets import API_VERSION, Sample

class Adapter:
    api_version = API_VERSION
    description = "a good test adapter"

    def categories(self, root):
        return ["b", "a"]

    def samples(self, root, category, split):
        if split == "train":
            for i in range(3):
                yield Sample(image=Path(root) / category / f"{i}.png", mask=None,
                             label="normal", split="train")
'''

IMPORT_FAILS = '''
raise ImportError("this plugin needs libfoo, which is not installed")
'''

WRONG_API = '''
class Adapter:
    api_version = 99
    description = "from the future"
    def categories(self, root): return []
    def samples(self, root, category, split): return iter([])
'''





DATA_ERROR = '''
from stad.datasets import API_VERSION
from stad.errors import DataError

class Adapter:
    api_version = API_VERSION
    description = "reports bad data"
    def categories(self, root):
        raise DataError(f"{root} has no index.csv")
    def samples(self, root, category, split):
        raise DataError(f"{root} has no index.csv")
'''

NOT_A_SAMPLE = '''
from stad.datasets import API_VERSION

class Adapter:
    api_version = API_VERSION
    description = "yields tuples"
    def categories(self, root): return ["c"]
    def samples(self, root, category, split):
        yield ("image.png", None)
'''

WRONG_SPLIT_OR_NONE = '''
from pathlib import Path
from stad.datasets import API_VERSION, Sample

class Adapter:
    api_version = API_VERSION
    description = "lists its test images for every split; a stray None in train"
    def categories(self, root): return ["c"]
    def samples(self, root, category, split):
        if split == "train":
            yield Sample(image=Path(root) / "0.png", mask=None, label="normal", split="train")
            yield None
            yield Sample(image=Path(root) / "1.png", mask=None, label="normal", split="train")
        else:
            yield Sample(image=Path(root) / "bad.png", mask=None, label="anomalous",
                         split="test", defect="crack")
'''

NO_CATEGORIES = '''
from stad.datasets import API_VERSION

class Adapter:
    api_version = API_VERSION
    description = "finds nothing [bold]here[/bold]"
    def categories(self, root): return []
    def samples(self, root, category, split): return iter([])
'''

CONSTRUCTOR_FAILS = '''
from stad.datasets import API_VERSION

class Adapter:
    api_version = API_VERSION
    description = "cannot start"
    def __init__(self):
        raise OSError("no config")
    def categories(self, root): return []
    def samples(self, root, category, split): return iter([])
'''

MARKS_IMPORT = '''
from pathlib import Path
Path({marker!r}).mkdir()

class Adapter:
    api_version = 1
    description = "must never be imported"
    def categories(self, root): return ["evil"]
    def samples(self, root, category, split): return iter([])
'''


_COUNTER = itertools.count()


@dataclass(frozen=True)
class FakeDist:
    """What the registry reads from ``EntryPoint.dist``."""

    name: str
    version: str


def _ep(name: str, value: str, dist: str = "stad-fake", version: str = "1.0") -> md.EntryPoint:
    return md.EntryPoint(name=name, value=value, group=registry.GROUP)._for(FakeDist(dist, version))


BUILTINS = [
    _ep("mvtec", "stad.datasets.mvtec:MVTecAdapter", "stad", __version__),
    _ep("folder", "stad.datasets.folder:FolderAdapter", "stad", __version__),
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("STAD_") and n != "STAD_CACHE"]:
        monkeypatch.delenv(name)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], str]]:
    """Write a plugin module; returns its unique module name."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    made: list[str] = []

    def make(stem: str, source: str) -> str:
        name = f"stadtest_{stem}_{os.getpid()}_{next(_COUNTER)}"
        (folder / f"{name}.py").write_text(source, encoding="utf-8")
        made.append(name)
        return name

    yield make
    for name in made:
        sys.modules.pop(name, None)


def _use(monkeypatch: pytest.MonkeyPatch, eps: list[md.EntryPoint]) -> None:
    monkeypatch.setattr(registry, "_entry_points", lambda: list(eps))


def _by_name(entries: list[registry.AdapterEntry]) -> dict[str, list[registry.AdapterEntry]]:
    out: dict[str, list[registry.AdapterEntry]] = {}
    for e in entries:
        out.setdefault(e.name, []).append(e)
    return out


# ---- discovery ---------------------------------------------------------------------------------


def test_discover_reads_metadata_without_importing(plugin: Callable[[str, str], str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    good = plugin("good", GOOD)
    broken = plugin("broken", IMPORT_FAILS)
    _use(monkeypatch, [*BUILTINS, _ep("zgood", f"{good}:Adapter", "stad-good", "2.1"),
                       _ep("broken", f"{broken}:Adapter", "stad-broken", "0.3")])
    entries = registry.discover()
    assert [e.name for e in entries] == ["broken", "folder", "mvtec", "zgood"]
    zgood = _by_name(entries)["zgood"][0]
    assert (zgood.value, zgood.distribution, zgood.version) == (f"{good}:Adapter",
                                                                "stad-good", "2.1")
    assert zgood.shadowed_by is None
    assert registry.names() == ["broken", "folder", "mvtec", "zgood"]
    assert good not in sys.modules and broken not in sys.modules
    registry.get_adapter("zgood")
    assert good in sys.modules  # loaded when used, not before


def test_entry_point_without_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, [md.EntryPoint(name="orphan", value="x:Y", group=registry.GROUP)])
    (entry,) = registry.discover()
    assert (entry.distribution, entry.version) == ("unknown", "unknown")


def test_good_adapter(plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch,
                      tmp_path: Path) -> None:
    good = plugin("good", GOOD)
    _use(monkeypatch, [*BUILTINS, _ep("good", f"{good}:Adapter", "stad-good", "2.1")])
    adapter = registry.get_adapter("good")
    assert adapter.name == "good" and adapter.description == "a good test adapter"
    assert adapter.categories(tmp_path) == ["a", "b"]  # sorted by the registry
    samples = adapter.list_samples(tmp_path, "a", "train")
    assert [s.image.name for s in samples] == ["0.png", "1.png", "2.png"]
    assert all(isinstance(s, Sample) and s.split == "train" for s in samples)
    assert adapter.list_samples(tmp_path, "a", "test") == []
    assert adapter.default_root() is None
    assert registry.check(registry._find("good")) == "ok"


def test_unknown_name(monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, BUILTINS)
    with pytest.raises(UsageError) as info:
        registry.get_adapter("kolektor")
    message = str(info.value)
    assert "kolektor" in message and "folder, mvtec" in message


def test_same_distribution_seen_twice_is_not_a_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, [*BUILTINS, BUILTINS[0]])
    entries = registry.discover()
    assert [e.name for e in entries] == ["folder", "mvtec"]
    assert registry.get_adapter("mvtec").entry.distribution == "stad"


# ---- broken plugins ----------------------------------------------------------------------------


def _plugin_error(name: str) -> str:
    with pytest.raises(PluginError) as info:
        registry.get_adapter(name)
    return str(info.value)


def test_plugin_that_fails_to_import(plugin: Callable[[str, str], str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    mod = plugin("broken", IMPORT_FAILS)
    _use(monkeypatch, [*BUILTINS, _ep("broken", f"{mod}:Adapter", "stad-broken", "0.3")])
    message = _plugin_error("broken")
    assert "'broken'" in message and "stad-broken 0.3" in message
    assert "failed to import" in message and "libfoo" in message
    # The others still work.
    assert registry.get_adapter("mvtec").name == "mvtec"


@pytest.mark.parametrize("value", ["stadtest_no_such_module_x:Adapter", "os.path:NoSuchClass"])
def test_plugin_pointing_nowhere(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    _use(monkeypatch, [_ep("nowhere", value, "stad-nowhere", "1.0")])
    message = _plugin_error("nowhere")
    assert "'nowhere'" in message and "failed to import" in message


def test_plugin_with_wrong_api_version(plugin: Callable[[str, str], str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    mod = plugin("future", WRONG_API)
    _use(monkeypatch, [_ep("future", f"{mod}:Adapter", "stad-future", "9.0")])
    message = _plugin_error("future")
    assert "'future'" in message and "stad-future 9.0" in message
    assert "API 99" in message and "upgrade" in message


def test_plugin_whose_constructor_fails(plugin: Callable[[str, str], str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    mod = plugin("nostart", CONSTRUCTOR_FAILS)
    _use(monkeypatch, [_ep("nostart", f"{mod}:Adapter")])
    message = _plugin_error("nostart")
    assert "'nostart'" in message and "failed to start" in message and "no config" in message


def test_plugin_that_raises_in_categories(plugin: Callable[[str, str], str],
                                          monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    mod = plugin("nocats", FAILS_LISTING)
    _use(monkeypatch, [_ep("nocats", f"{mod}:Adapter", "stad-nocats", "1.2")])
    adapter = registry.get_adapter("nocats")  # importing is fine
    with pytest.raises(PluginError) as info:
        adapter.categories(tmp_path)
    message = str(info.value)
    assert "'nocats'" in message and "stad-nocats 1.2" in message
    assert "categories()" in message and "KeyError" in message


def test_plugin_that_raises_half_way_through_samples(plugin: Callable[[str, str], str],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    mod = plugin("halfway", FAILS_HALF_WAY)
    _use(monkeypatch, [_ep("halfway", f"{mod}:Adapter", "stad-halfway", "0.1")])
    adapter = registry.get_adapter("halfway")
    it = adapter.samples(tmp_path, "c", "train")
    assert next(it).image.name == "0.png"
    assert next(it).image.name == "1.png"
    with pytest.raises(PluginError) as info:
        next(it)
    message = str(info.value)
    assert "'halfway'" in message and "samples()" in message and "half-way" in message
    with pytest.raises(PluginError):
        adapter.list_samples(tmp_path, "c", "train")


def test_plugin_data_error_passes_through(plugin: Callable[[str, str], str],
                                          monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    mod = plugin("baddata", DATA_ERROR)
    _use(monkeypatch, [_ep("baddata", f"{mod}:Adapter")])
    adapter = registry.get_adapter("baddata")
    with pytest.raises(DataError, match="index.csv"):
        adapter.categories(tmp_path)
    with pytest.raises(DataError, match="index.csv"):
        adapter.list_samples(tmp_path, "c", "test")


def test_plugin_yielding_something_else(plugin: Callable[[str, str], str],
                                        monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    mod = plugin("tuples", NOT_A_SAMPLE)
    _use(monkeypatch, [_ep("tuples", f"{mod}:Adapter")])
    with pytest.raises(PluginError, match="tuple"):
        registry.get_adapter("tuples").list_samples(tmp_path, "c", "test")


def test_samples_of_another_split_or_none_are_plugin_faults(plugin: Callable[[str, str], str],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    # Anomalous test images listed as `val` would have set the threshold on defects.
    mod = plugin("wrongsplit", WRONG_SPLIT_OR_NONE)
    _use(monkeypatch, [_ep("wrongsplit", f"{mod}:Adapter")])
    adapter = registry.get_adapter("wrongsplit")
    with pytest.raises(PluginError, match="split 'test' .*bad.png.* asked for 'val'"):
        adapter.list_samples(tmp_path, "c", "val")
    assert [s.split for s in adapter.list_samples(tmp_path, "c", "test")] == ["test"]
    # None is not the end of the listing: it is reported, not a silent cut
    with pytest.raises(PluginError, match="yielded NoneType"):
        adapter.list_samples(tmp_path, "c", "train")


def test_a_root_without_categories_is_a_data_error_naming_it(
        plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    _use(monkeypatch, [*BUILTINS, _ep("empty", f"{plugin('empty', NO_CATEGORIES)}:Adapter")])
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", "empty",
                                      "--root", str(tmp_path)])
    assert result.exit_code == 3, result.output
    assert "no categories" in result.stderr and str(tmp_path) in result.stderr
    # its description is listed as written (no markup), beside the built-ins' descriptions
    listed = CliRunner().invoke(app, ["datasets", "list", "--json"])
    rows = {r["name"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert rows["empty"]["description"] == "finds nothing [bold]here[/bold]"
    assert rows["mvtec"]["description"].startswith("MVTec AD layout")
    table = CliRunner().invoke(app, ["datasets", "list"], env={"COLUMNS": "250"})
    assert "finds nothing [bold]here[/bold]" in table.stdout


# ---- duplicate names ---------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
def test_duplicate_name_from_two_third_party_distributions(
        plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch,
        reverse: bool) -> None:
    a = plugin("dupa", GOOD)
    b = plugin("dupb", GOOD)
    eps = [_ep("dup", f"{a}:Adapter", "stad-a", "1.0"), _ep("dup", f"{b}:Adapter", "stad-b", "2.0")]
    _use(monkeypatch, [*BUILTINS, *(reversed(eps) if reverse else eps)])
    dups = _by_name(registry.discover())["dup"]
    assert {(e.distribution, e.shadowed_by) for e in dups} == {("stad-a", "stad-b"),
                                                               ("stad-b", "stad-a")}
    message = _plugin_error("dup")
    assert "stad-a 1.0" in message and "stad-b 2.0" in message
    assert a not in sys.modules and b not in sys.modules
    statuses = {e.distribution: registry.check(e) for e in dups}
    assert statuses == {"stad-a": "duplicate name, also registered by stad-b",
                        "stad-b": "duplicate name, also registered by stad-a"}


@pytest.mark.parametrize("reverse", [False, True])
def test_third_party_cannot_shadow_a_builtin(plugin: Callable[[str, str], str],
                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             reverse: bool) -> None:
    marker = tmp_path / "evil-imported"
    evil = plugin("evil", MARKS_IMPORT.format(marker=str(marker)))
    eps = [*BUILTINS, _ep("mvtec", f"{evil}:Adapter", "stad-evil", "6.6")]
    _use(monkeypatch, list(reversed(eps)) if reverse else eps)
    mvtecs = _by_name(registry.discover())["mvtec"]
    assert {(e.distribution, e.shadowed_by) for e in mvtecs} == {("stad", None),
                                                                 ("stad-evil", "stad")}
    adapter = registry.get_adapter("mvtec")
    assert adapter.entry.distribution == "stad"
    assert type(adapter._adapter).__name__ == "MVTecAdapter"
    loser = next(e for e in mvtecs if e.distribution == "stad-evil")
    assert registry.check(loser) == ("not used: 'mvtec' is a built-in adapter of stad; rename "
                                     "this entry point")
    assert not marker.exists() and evil not in sys.modules


# ---- check() -----------------------------------------------------------------------------------


def test_check_statuses(plugin: Callable[[str, str], str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [
        *BUILTINS,
        _ep("good", f"{plugin('good', GOOD)}:Adapter", "stad-good", "1.0"),
        _ep("broken", f"{plugin('broken', IMPORT_FAILS)}:Adapter", "stad-broken", "0.3"),
        _ep("future", f"{plugin('future', WRONG_API)}:Adapter", "stad-future", "9.0"),
        _ep("nocats", f"{plugin('nocats', FAILS_LISTING)}:Adapter", "stad-nocats", "1.2"),
    ]
    _use(monkeypatch, eps)
    status = {e.name: registry.check(e) for e in registry.discover()}
    assert status["mvtec"] == status["folder"] == status["good"] == "ok"
    assert status["nocats"] == "ok"  # it imports and starts; it fails only when used
    assert status["broken"].startswith("error:") and "failed to import" in status["broken"]
    assert status["future"].startswith("error:") and "API 99" in status["future"]


# ---- through the CLI ---------------------------------------------------------------------------


def test_cli_datasets_list_shows_broken_adapters(plugin: Callable[[str, str], str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [
        *BUILTINS,
        _ep("broken", f"{plugin('broken', IMPORT_FAILS)}:Adapter", "stad-broken", "0.3"),
        _ep("future", f"{plugin('future', WRONG_API)}:Adapter", "stad-future", "9.0"),
        _ep("dup", f"{plugin('dupa', GOOD)}:Adapter", "stad-a", "1.0"),
        _ep("dup", f"{plugin('dupb', GOOD)}:Adapter", "stad-b", "2.0"),
    ]
    _use(monkeypatch, eps)
    result = CliRunner().invoke(app, ["datasets", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(r["schema_version"] == 1 for r in rows)
    status = {(r["name"], r["distribution"]): r["status"] for r in rows}
    assert status[("mvtec", "stad")] == "ok" and status[("folder", "stad")] == "ok"
    assert status[("broken", "stad-broken")].startswith("error:")
    assert status[("future", "stad-future")].startswith("error:")
    assert status[("dup", "stad-a")].startswith("duplicate name")
    assert status[("dup", "stad-b")].startswith("duplicate name")
    broken = next(r for r in rows if r["name"] == "broken")
    assert broken["version"] == "0.3" and broken["entry_point"].endswith(":Adapter")
    table = CliRunner().invoke(app, ["datasets", "list"])
    assert table.exit_code == 0
    assert "broken" in table.stdout and "stad-broken" in table.stdout


@pytest.mark.parametrize(("stem", "source"), [
    ("broken", IMPORT_FAILS), ("future", WRONG_API), ("halfway", FAILS_HALF_WAY),
])
def test_cli_using_a_broken_adapter_exits_5(plugin: Callable[[str, str], str],
                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            stem: str, source: str) -> None:
    name = f"my{stem}"
    for i in range(2):  # the files FAILS_HALF_WAY lists before it fails (`show` checks them)
        (tmp_path / f"{i}.png").write_bytes(b"")
    _use(monkeypatch, [*BUILTINS, _ep(name, f"{plugin(stem, source)}:Adapter", "stad-x", "1")])
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", name,
                                      "--root", str(tmp_path), "--category", "c"])
    assert result.exit_code == 5, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stad: error:")
    assert f"'{name}'" in lines[0]
    assert "Traceback" not in result.output


def test_cli_using_a_duplicate_name_exits_5(plugin: Callable[[str, str], str],
                                            monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    _use(monkeypatch, [_ep("dup", f"{plugin('dupa', GOOD)}:Adapter", "stad-a", "1.0"),
                       _ep("dup", f"{plugin('dupb', GOOD)}:Adapter", "stad-b", "2.0")])
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", "dup",
                                      "--root", str(tmp_path), "--category", "c"])
    assert result.exit_code == 5
    assert "stad-a 1.0" in result.stderr and "stad-b 2.0" in result.stderr


# ---- plugins that end the process, mislabel or repeat samples (a plugin author's review) -------

EXITS_ON_IMPORT = '''
import sys
sys.exit({code!r})
'''

EXITS_IN_SAMPLES = '''
import sys
from stad.datasets import API_VERSION

class Adapter:
    api_version = API_VERSION
    description = "gives up"
    def categories(self, root): return ["c"]
    def samples(self, root, category, split):
        sys.exit(0)
'''

PRINTS_ON_IMPORT = GOOD + '''
print("loading the plugin...")
'''

PRINTS_WHILE_LISTING = '''
from pathlib import Path
from stad.datasets import API_VERSION, Sample

class Adapter:
    api_version = API_VERSION
    description = "talks while it lists"
    def categories(self, root):
        print("looking for categories")
        return ["c"]
    def samples(self, root, category, split):
        print("listing", split)
        if split == "train":
            yield Sample(image=Path(root) / "0.png", mask=None, label="normal", split="train")
'''

REPEATS = '''
from pathlib import Path
from stad.datasets import API_VERSION, Sample

class Adapter:
    api_version = API_VERSION
    description = "lists its image twice, the second time absolute"
    def categories(self, root): return ["c"]
    def samples(self, root, category, split):
        yield Sample(image=Path(root) / "0.png", mask=None, label="normal", split=split)
        yield Sample(image=(Path(root) / "0.png").absolute(), mask=None, label="normal",
                     split=split)
'''

CATEGORIES_RETURN = '''
from pathlib import Path
from stad.datasets import API_VERSION

class Adapter:
    api_version = API_VERSION
    description = "categories of the wrong type"
    def categories(self, root): return {value}
    def samples(self, root, category, split): return iter([])
'''

API_VERSION_OF = '''
class Adapter:
    {attribute}
    description = "an api_version to check"
    def categories(self, root): return []
    def samples(self, root, category, split): return iter([])

adapter = Adapter()
'''


@pytest.mark.parametrize("code", [0, "this plugin needs opencv; pip install opencv-python"])
def test_a_plugin_ending_the_process_on_import_is_its_fault(
        plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        code: int | str) -> None:
    mod = plugin("exits", EXITS_ON_IMPORT.format(code=code))
    _use(monkeypatch, [*BUILTINS, _ep("exits", f"{mod}:Adapter", "stad-exits", "0.1")])
    message = _plugin_error("exits")
    assert "failed to import: SystemExit" in message and str(code) in message
    assert "report it to stad-exits's authors or uninstall it" in message
    listed = CliRunner().invoke(app, ["datasets", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r["status"] for r in map(json.loads, listed.stdout.splitlines())}
    assert rows["mvtec"] == "ok" and rows["exits"].startswith("error:")
    used = CliRunner().invoke(app, ["datasets", "show", "--dataset", "exits",
                                    "--root", str(tmp_path), "--category", "c"])
    assert used.exit_code == 5 and used.stderr.startswith("stad: error:")


def test_a_plugin_ending_the_process_in_samples_is_its_fault(
        plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    _use(monkeypatch, [_ep("quits", f"{plugin('quits', EXITS_IN_SAMPLES)}:Adapter", "q", "1")])
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", "quits",
                                      "--root", str(tmp_path), "--category", "c"])
    assert result.exit_code == 5, result.output
    assert "failed in samples(): SystemExit" in result.stderr


def test_what_a_plugin_prints_on_import_does_not_reach_json_stdout(
        plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, [*BUILTINS, _ep("chatty", f"{plugin('chatty', PRINTS_ON_IMPORT)}:Adapter")])
    result = CliRunner().invoke(app, ["datasets", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["name"] for line in result.stdout.splitlines()] == [
        "chatty", "folder", "mvtec"]
    assert "loading the plugin..." in result.stderr


def test_an_image_listed_twice_is_a_plugin_fault(plugin: Callable[[str, str], str],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    _use(monkeypatch, [_ep("twice", f"{plugin('twice', REPEATS)}:Adapter", "stad-twice", "1")])
    adapter = registry.get_adapter("twice")
    for split in ("val", "test"):  # it would count twice in the calibration or the metrics
        with pytest.raises(PluginError, match=rf"yielded .*0\.png twice in the {split} split"):
            adapter.list_samples(Path("data"), "c", split)
    # training images may repeat (lines of a list file) and are streamed, not held
    assert len(adapter.list_samples(Path("data"), "c", "train")) == 2
    # `datasets show`, which plugin authors are told to test with, refuses it too
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "0.png").write_bytes(b"")  # listed files are checked, not read
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", "twice", "--root", "data"])
    assert result.exit_code == 5 and "twice in the val split" in result.stderr


DEFAULT_ROOT = '''
from pathlib import Path
from stad.datasets import API_VERSION, Sample

class Adapter:
    api_version = API_VERSION
    description = "a default root of its own, or none"
    def default_root(self): return {value}
    def categories(self, root): return ["c"]
    def samples(self, root, category, split):
        yield Sample(image={image}, mask=None, label="normal", split=split)
'''


@pytest.mark.parametrize(("value", "image", "code", "message"), [
    ("None", 'Path(root) / "0.png"', 2, "needs a data root: pass --root"),  # no default
    ("42", 'Path(root) / "0.png"', 5, "default_root() returned int 42, not a path or None"),
    ('"data"', "None", 5, "Sample.image must be a path (str or os.PathLike), got NoneType"),
    ('"data"', "1", 5, "Sample.image must be a path (str or os.PathLike), got int 1"),
])
def test_a_plugins_default_root_and_sample_paths_are_checked(
        plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        value: str, image: str, code: int, message: str) -> None:
    # They crashed with exit 1 (a TypeError), or blamed the data for a plugin's fault.
    monkeypatch.chdir(tmp_path)
    source = DEFAULT_ROOT.format(value=value, image=image)
    _use(monkeypatch, [_ep("rooted", f"{plugin('rooted', source)}:Adapter", "stad-rooted", "1")])
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", "rooted"])
    assert result.exit_code == code and message in result.stderr, result.output


@pytest.mark.parametrize(("value", "expected"), [
    ('"widget"', "categories() returned str, not a list of str"),
    ('[Path("widget")]', "categories() returned a list holding PosixPath"),
    ("3", "categories() returned int, not a list of str"),
])
def test_categories_of_the_wrong_type_are_a_plugin_fault(
        plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        value: str, expected: str) -> None:
    mod = plugin("cats", CATEGORIES_RETURN.format(value=value))
    _use(monkeypatch, [_ep("cats", f"{mod}:Adapter", "stad-cats", "1")])
    if "Path" in value and os.name == "nt":
        expected = expected.replace("PosixPath", "WindowsPath")
    with pytest.raises(PluginError) as info:
        registry.get_adapter("cats").categories(tmp_path)
    assert expected in str(info.value) and "'cats'" in str(info.value)


@pytest.mark.parametrize(("attribute", "target", "expected"), [
    ("pass", "Adapter", "has no class attribute api_version"),
    ('api_version = "1"', "Adapter", "has api_version '1', not a whole number"),
    ("api_version = 0", "Adapter", "speaks adapter API 0, this stad speaks 1; upgrade the plugin"),
    ("api_version = 1", "adapter", "names Adapter <"),
    ("api_version = None", "Adapter", "has api_version None, not a whole number"),
])
def test_api_version_messages_say_what_is_wrong(plugin: Callable[[str, str], str],
                                                monkeypatch: pytest.MonkeyPatch, attribute: str,
                                                target: str, expected: str) -> None:
    mod = plugin("api", API_VERSION_OF.format(attribute=attribute))
    _use(monkeypatch, [_ep("api", f"{mod}:{target}", "stad-api", "1")])
    assert expected in _plugin_error("api")


def test_an_entry_point_naming_a_module_is_not_a_class(plugin: Callable[[str, str], str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    mod = plugin("module", GOOD)
    _use(monkeypatch, [_ep("module", mod, "stad-module", "1")])
    message = _plugin_error("module")
    assert "names module <module" in message and "not a class" in message


def test_datasets_show_checks_that_listed_files_exist(plugin: Callable[[str, str], str],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    source = '''
from pathlib import Path
from stad.datasets import API_VERSION, Sample

class Adapter:
    api_version = API_VERSION
    description = "lists a mask that is not there"
    def categories(self, root): return ["c"]
    def samples(self, root, category, split):
        if split == "test":
            yield Sample(image=Path(root) / "bad.png", mask=Path(root) / "bad_mask.png",
                         label="anomalous", split="test", defect="crack")
'''
    (tmp_path / "bad.png").write_bytes(b"")
    _use(monkeypatch, [_ep("nomask", f"{plugin('nomask', source)}:Adapter", "stad-nomask", "1")])
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", "nomask",
                                      "--root", str(tmp_path), "--category", "c"])
    assert result.exit_code == 3, result.output
    assert result.stderr.strip() == (f"stad: error: mask {tmp_path / 'bad_mask.png'} of image "
                                     f"{tmp_path / 'bad.png'} (test split) does not exist")


def test_an_anomalous_sample_named_good_is_refused() -> None:
    with pytest.raises(ValueError, match="'good' is the defect type of normal images"):
        Sample(image=Path("x.png"), mask=None, label="anomalous", split="test", defect="good")


def test_a_sample_without_a_defect_type_takes_its_labels() -> None:
    assert Sample(Path("x.png"), None, "normal", "test").defect == "good"
    assert Sample(Path("x.png"), None, "anomalous", "test").defect == "anomalous"
    assert Sample(Path("x.png"), None, "anomalous", "test", "scratch").defect == "scratch"
    assert Sample(Path("x.png"), None, "normal", "test", "ok").defect == "ok"  # a name of its own


def test_categories_may_be_any_iterable_of_str(plugin: Callable[[str, str], str],
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    for value in ('(c for c in ["b", "a"])', '{"b": 1, "a": 2}.keys()', '("b", "a")'):
        mod = plugin("iter", CATEGORIES_RETURN.format(value=value))
        _use(monkeypatch, [_ep("iter", f"{mod}:Adapter", "stad-iter", "1")])
        assert registry.get_adapter("iter").categories(tmp_path) == ["a", "b"]


def test_a_plugin_loaded_off_the_main_thread_leaves_stdout_alone(
        plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    _use(monkeypatch, [_ep("chatty", f"{plugin('chatty', PRINTS_ON_IMPORT)}:Adapter")])
    before = sys.stdout
    seen = []
    thread = threading.Thread(target=lambda: seen.append(sys.stdout is before and
                                                         registry.get_adapter("chatty").name))
    thread.start()
    thread.join()
    assert seen == ["chatty"] and sys.stdout is before


def test_absolute_paths_under_a_relative_root_are_named_relative_to_it(
        plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """An adapter that resolves its paths, used with a relative --root: the names fit-students
    records for its held-back images are found again by calibrate, whose root is absolute."""
    from stad.calibration import validation_samples
    from stad.datasets.selection import DataSelection, relative_name, relative_names

    source = '''
from pathlib import Path
from stad.datasets import API_VERSION, Sample

class Adapter:
    api_version = API_VERSION
    description = "resolves its paths"
    def categories(self, root): return ["c"]
    def samples(self, root, category, split):
        if split == "train":
            for i in range(3):
                yield Sample(image=(Path(root) / category / f"{i}.png").resolve(), mask=None,
                             label="normal", split="train")
'''
    monkeypatch.chdir(tmp_path)
    _use(monkeypatch, [_ep("resolving", f"{plugin('resolving', source)}:Adapter", "r", "1")])
    adapter = registry.get_adapter("resolving")
    at_fit = DataSelection(adapter, Path("data"), "c")
    names = relative_names(at_fit.samples("train"), at_fit.root)
    assert names == [str(Path("c") / f"{i}.png") for i in range(3)]
    at_calibrate = DataSelection(adapter, (tmp_path / "data").resolve(), "c")
    info = {"data": {"validation": {"images": names[1:]}}}
    assert [s.image.name for s in validation_samples(at_calibrate, info)] == ["1.png", "2.png"]
    # a model that recorded the absolute path (as stad did before) is read too
    old = {"data": {"validation": {"images": [str((tmp_path / "data/c/2.png").resolve())]}}}
    assert [s.image.name for s in validation_samples(at_calibrate, old)] == ["2.png"]
    assert relative_name(Path("data/c/0.png"), (tmp_path / "data").resolve()) == \
        str(Path("c/0.png"))
    assert relative_name(Path("/elsewhere/0.png"), Path("data")) == "/elsewhere/0.png"


def test_a_resolved_path_under_a_root_reached_through_a_link(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    from stad.datasets.selection import relative_name

    (tmp_path / "real" / "data" / "c").mkdir(parents=True)
    image = tmp_path / "real" / "data" / "c" / "0.png"
    image.write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "link")
    assert relative_name(image.resolve(), Path("data")) == str(Path("c/0.png"))


def test_what_a_plugin_prints_while_listing_does_not_reach_json_stdout(
        plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    (tmp_path / "0.png").write_bytes(b"")
    _use(monkeypatch, [_ep("talky", f"{plugin('talky', PRINTS_WHILE_LISTING)}:Adapter")])
    result = CliRunner().invoke(app, ["datasets", "show", "--dataset", "talky",
                                      "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["splits"]["train"]["images"] == 1  # stdout: the JSON only
    assert "looking for categories" in result.stderr and "listing test" in result.stderr
