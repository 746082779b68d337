"""Tests of the ``stad`` command line (stad/cli.py): parsing, output and the exit-code mapping.

Most tests run the Typer app in-process with ``typer.testing.CliRunner``; the last ones run the
real ``python -m stad`` in a subprocess, in a temporary folder with a clean environment. Exit
codes are the table of docs/exit-codes.md (stad/errors.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import stad.datasets.registry
import stad.datasets.selection
from stad import console
from stad._version import __version__
from stad.cli import app
from stad.errors import (
    EXIT_ARTIFACT,
    EXIT_BROKEN_PIPE,
    EXIT_DATA,
    EXIT_INTERRUPTED,
    EXIT_PLUGIN,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    ArtifactError,
    PluginError,
)

COMMANDS = ("pretrain-teacher", "fit-students", "calibrate", "score", "evaluate", "datasets")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("STAD_") and n != "STAD_CACHE"]:
        monkeypatch.delenv(name)
    # -q and --debug set module state; give each test its own so that none leaks out.
    monkeypatch.setattr(console, "state", console._State())


def _run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def _one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _show_args(root: Path) -> list[str]:
    return ["datasets", "show", "--dataset", "mvtec", "--root", str(root), "--category", "c"]


# ---- help and version --------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    result = _run("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout
    for option in ("--version", "--quiet", "--debug"):
        assert option in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = _run(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout


def test_version() -> None:
    result = _run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"stad {__version__}\n"


# ---- datasets list -----------------------------------------------------------------------------


def test_datasets_list_json_lines() -> None:
    result = _run("datasets", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and all(row["schema_version"] == 1 for row in rows)
    builtins = {row["name"]: row for row in rows if row["distribution"] == "stad"}
    assert {"mvtec", "folder", "synthetic"} <= set(builtins)
    for name in ("mvtec", "folder", "synthetic"):
        assert builtins[name]["status"] == "ok"
        assert builtins[name]["entry_point"].startswith(f"stad.datasets.{name}:")
        assert builtins[name]["description"]  # each adapter's one line
    assert [row["name"] for row in rows] == sorted(row["name"] for row in rows)


def test_datasets_list_table() -> None:
    result = _run("datasets", "list")
    assert result.exit_code == 0
    for name in ("mvtec", "folder", "synthetic"):
        assert name in result.stdout


# ---- parsing errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["datasets", "list", "--bogus"],
    ["datasets", "show", "--root"],  # missing value
    ["no-such-command"],
    ["score", "--on-error"],
])
def test_parsing_errors_exit_2(args: list[str]) -> None:
    result = _run(*args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert "Traceback" not in result.output


# ---- StadError → exit code ---------------------------------------------------------------------


def test_data_error_is_one_line_with_its_code(tmp_path: Path) -> None:
    result = _run(*_show_args(tmp_path / "nowhere"))
    assert result.exit_code == EXIT_DATA
    line = _one_error_line(result)
    assert line.startswith("stad: error: ") and "nowhere" in line
    assert result.stdout == ""


def test_debug_adds_the_traceback(tmp_path: Path) -> None:
    result = _run("--debug", *_show_args(tmp_path / "nowhere"))
    assert result.exit_code == EXIT_DATA
    assert "Traceback (most recent call last)" in result.stderr
    assert "DataError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("stad: error: ")


@pytest.mark.parametrize("flag", ["--debug", "-q", "--quiet"])
def test_global_flags_work_after_the_subcommand_too(tmp_path: Path, flag: str) -> None:
    # What people type: `stad fit-students ... -q`; once "No such option: -q".
    result = _run(*_show_args(tmp_path / "nowhere"), flag)
    assert result.exit_code == EXIT_DATA, result.output
    assert ("Traceback" in result.stderr) == (flag == "--debug")
    assert console.state.quiet == (flag != "--debug")
    # After "--" nothing is moved: it is the subcommand's (here an unexpected argument).
    assert _run(*_show_args(tmp_path / "nowhere"), "--", flag).exit_code == EXIT_USAGE


@pytest.mark.parametrize("command", ["score", "fit-students", "pretrain-teacher"])
def test_help_shows_no_type_beside_flags(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout and "--json" in result.stdout
    assert "<path>" in result.stdout  # options with a value keep theirs


def test_help_shows_the_documented_defaults() -> None:
    # The "[default: ...]" that help texts end with is printed, not taken for Rich markup.
    result = CliRunner().invoke(app, ["fit-students", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())  # as wrapped to the terminal
    assert "[default: 0]" in text and "[default: the preset's: paper 3, fast 2]" in text
    assert "[default: the preset's: paper 256, fast 256]" in text  # --image-size


@pytest.mark.parametrize("command", ["calibrate", "evaluate", "export"])
def test_help_says_the_data_defaults_to_the_models(command: str) -> None:
    # usage.md: these read the data the model was fitted on; help said "[default: mvtec]".
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    assert "[default: the one the model was fitted on]" in text and "mvtec" not in text


@pytest.mark.parametrize(("value", "traceback"), [("1", True), ("true", True), ("0", False),
                                                  ("false", False), ("Off", False), ("", False)])
def test_stad_debug_variable_adds_the_traceback(tmp_path: Path, value: str,
                                                traceback: bool) -> None:
    # STAD_DEBUG=false turned tracebacks on (anything but "" and "0" did)
    result = _run(*_show_args(tmp_path / "nowhere"), env={"STAD_DEBUG": value})
    assert result.exit_code == EXIT_DATA
    assert ("Traceback" in result.stderr) == traceback


def test_debug_does_not_leak_into_the_next_run(tmp_path: Path) -> None:
    assert _run("--debug", *_show_args(tmp_path / "nowhere")).exit_code == EXIT_DATA
    assert "Traceback" not in _run(*_show_args(tmp_path / "nowhere")).stderr


def test_usage_errors_from_settings(tmp_path: Path) -> None:
    unknown = _run(*_show_args(tmp_path), env={"STAD_STUDENTS__EPOCHZ": "1"})
    assert unknown.exit_code == EXIT_USAGE
    assert "students.epochz" in _one_error_line(unknown)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[students\n")
    bad = _run(*_show_args(tmp_path), "--config", str(bad_toml))
    assert bad.exit_code == EXIT_USAGE
    assert str(bad_toml) in _one_error_line(bad)
    no_adapter = _run("datasets", "show", "--dataset", "kolektor", "--root", str(tmp_path))
    assert no_adapter.exit_code == EXIT_USAGE
    assert "kolektor" in _one_error_line(no_adapter)
    # The fast preset's scales at 128² follow --image-size at half of it: 101 has no half.
    odd = _run("fit-students", "--dataset", "synthetic", "--root", str(tmp_path),
               "--preset", "fast", "--image-size", "101", "--out", str(tmp_path / "m.safetensors"))
    assert odd.exit_code == EXIT_USAGE
    assert "students.image_size 101: the fast preset's scale 17@128" in _one_error_line(odd)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(("error", "code"), [
    (ArtifactError("model.safetensors is corrupt"), EXIT_ARTIFACT),
    (PluginError("dataset adapter 'x' failed"), EXIT_PLUGIN),
])
def test_each_error_class_maps_to_its_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           error: Exception, code: int) -> None:
    def fail(selection: Any) -> dict[str, Any]:
        raise error

    monkeypatch.setattr(stad.datasets.selection, "summarize", fail)
    result = _run(*_show_args(tmp_path))
    assert result.exit_code == code
    assert _one_error_line(result) == f"stad: error: {error}"


# ---- unexpected exceptions ---------------------------------------------------------------------


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("boom")


def test_unexpected_error_exits_1_without_traceback(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stad.datasets.selection, "summarize", _boom)
    result = _run(*_show_args(tmp_path))
    assert result.exit_code == EXIT_UNEXPECTED
    line = _one_error_line(result)
    assert line.startswith("stad: unexpected error: RuntimeError: boom")
    assert "--debug" in line


def test_unexpected_error_in_datasets_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stad.datasets.registry, "discover", _boom)
    result = _run("datasets", "list", "--json")
    assert result.exit_code == EXIT_UNEXPECTED
    assert "unexpected error" in _one_error_line(result)


def test_unexpected_error_with_debug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stad.datasets.selection, "summarize", _boom)
    result = _run("--debug", *_show_args(tmp_path))
    assert result.exit_code == EXIT_UNEXPECTED
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: boom" in result.stderr
    assert "unexpected error" in result.stderr


def test_ctrl_c_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(selection: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(stad.datasets.selection, "summarize", interrupt)
    result = _run(*_show_args(tmp_path))
    assert result.exit_code == EXIT_INTERRUPTED
    assert _one_error_line(result) == "stad: interrupted"


def test_sigterm_stops_any_command_as_ctrl_c_does(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A cancelled CI job sends SIGTERM: exit 130 with clean-up, like Ctrl-C, then the default
    # handler is back (the test would be killed by the signal if the command had none).
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def terminated(selection: Any) -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode, long before this ends
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(stad.datasets.selection, "summarize", terminated)
    result = _run(*_show_args(tmp_path))
    assert result.exit_code == EXIT_INTERRUPTED
    assert _one_error_line(result) == "stad: interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_printable_escapes_controls_and_keeps_other_characters() -> None:
    assert console.printable("a\tb\nc\x1b[31m\u2028\u202edone") == \
        "a\\tb\\nc\\x1b[31m\\u2028\\u202edone"
    kept = "part\u00a0 7\u3000\u200c\u00e9\u65e5.png"  # spaces, a joiner, é, 日
    assert console.printable(kept) == kept


# ---- -q ----------------------------------------------------------------------------------------


def _chatty_summary(selection: Any) -> dict[str, Any]:
    console.message("a note for the user")
    return {"dataset": "mvtec", "root": str(selection.root), "category": "c", "splits": {}}


@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_quiet_silences_notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              flag: str) -> None:
    monkeypatch.setattr(stad.datasets.selection, "summarize", _chatty_summary)
    loud = _run(*_show_args(tmp_path), "--json")
    assert loud.exit_code == 0 and "a note for the user" in loud.stderr
    quiet = _run(flag, *_show_args(tmp_path), "--json")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
    assert json.loads(quiet.stdout)["schema_version"] == 1


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines_of(steps: list[tuple[float, int]], total: int, capsys: pytest.CaptureFixture[str]
              ) -> list[str]:
    """The progress lines of a task advanced by ``n`` at each ``(time, n)``."""
    clock = _Clock()
    task = console.Reporter(None, lines=True, clock=clock).task("students p17", total)
    for when, n in steps:
        clock.now = when
        task.advance(n, loss=12.5)
    task.done()
    return capsys.readouterr().err.splitlines()


def test_long_tasks_write_progress_lines_where_stderr_is_a_log(
        capsys: pytest.CaptureFixture[str]) -> None:
    # One step a second: a line at each tenth once 30 s have passed since the last.
    every_second = [(float(t), 1) for t in range(1, 101)]
    assert _lines_of(every_second, 100, capsys) == [
        "students p17: 30/100 (30 %), 30 s, about 70 s left  loss 12.5",
        "students p17: 60/100 (60 %), 60 s, about 40 s left  loss 12.5",
        "students p17: 90/100 (90 %), 90 s, about 10 s left  loss 12.5"]
    # A task that ends within 30 s leaves the log clean.
    assert _lines_of([(t / 10, 1) for t in range(1, 101)], 100, capsys) == []
    # Slow steps: a line every 5 minutes even where no tenth was completed since.
    slow = [(10.0 * t, 1) for t in range(1, 91)]
    assert [line.split(",")[0] for line in _lines_of(slow, 1000, capsys)] == [
        "students p17: 30/1000 (3 %)", "students p17: 60/1000 (6 %)",
        "students p17: 90/1000 (9 %)"]
    # A resumed run: the 500 steps it skips at once do not count in the rate (1 step / 60 s);
    # then the next line waits for the next tenth or 5 minutes.
    resumed = [(0.0, 500), *[(60.0 * t, 1) for t in range(1, 6)]]
    assert _lines_of(resumed, 1000, capsys) == [
        "students p17: 501/1000 (50 %), 60 s, about 8 h 19 min left  loss 12.5"]


def test_commands_report_progress_in_lines_where_stderr_is_not_a_terminal(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()  # under pytest stderr is captured: not a terminal
    monkeypatch.setattr(console.time, "monotonic", clock)
    with console.reporter() as shown:
        task = shown.task("scoring", 10)
        for t in range(1, 11):
            clock.now = 10.0 * t
            task.advance()
    assert capsys.readouterr().err.splitlines() == [
        "scoring: 3/10 (30 %), 30 s, about 70 s left",
        "scoring: 6/10 (60 %), 60 s, about 40 s left",
        "scoring: 9/10 (90 %), 90 s, about 10 s left"]


def test_progress_lines_are_silenced_by_quiet(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console.state, "quiet", True)
    assert _lines_of([(float(t), 1) for t in range(1, 101)], 100, capsys) == []


# ---- the real command --------------------------------------------------------------------------


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STAD_") or k == "STAD_CACHE"}
    return subprocess.run([sys.executable, "-m", "stad", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_end_to_end_version(tmp_path: Path) -> None:
    proc = _subprocess(["--version"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"stad {__version__}\n"


def test_end_to_end_datasets_list(tmp_path: Path) -> None:
    proc = _subprocess(["datasets", "list", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {"mvtec", "folder", "synthetic"} <= {r["name"] for r in rows}
    assert all(r["schema_version"] == 1 for r in rows)


def test_end_to_end_error_exit_code(tmp_path: Path) -> None:
    proc = _subprocess(_show_args(tmp_path / "nowhere"), tmp_path)
    assert proc.returncode == EXIT_DATA
    assert proc.stderr.startswith("stad: error: ") and len(proc.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written to the working folder


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["datasets", "list"],
                                  ["datasets", "show", "--dataset", "synthetic", "--category",
                                   "grain", "--root", "{tmp}"]])
def test_every_command_exits_141_when_stdout_has_no_reader(args: list[str],
                                                           tmp_path: Path) -> None:
    # `stad datasets list | true`: rich exited 1 by itself and --help/--version printed outside
    # the commands, where Click exited 1; a script told them from a failure by the code alone.
    if "{tmp}" in args:  # data generated first: its notes must not be the first write
        CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "stad",
                               *[a.format(tmp=tmp_path) for a in args]],
                              stdout=write, stderr=subprocess.PIPE, timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == EXIT_BROKEN_PIPE, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr and b"error" not in proc.stderr
