"""Tests of stad.config: settings from flags > STAD_* environment > TOML file > defaults.

Every test passes ``environ`` explicitly (or sets the process environment with monkeypatch),
writes its own TOML file under ``tmp_path`` and checks one rule of docs/usage.md "Settings".
The expected preset values are copied from ``STUDENT_PRESETS`` in stad/config.py (docs/method.md §4
for "paper"; "fast" is stad's own CPU preset).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest

from stad.config import PATCH_SIZES, STUDENT_PRESETS, Settings, resolve_settings
from stad.errors import UsageError


def _toml(tmp_path: Path, text: str, name: str = "stad.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _usage_error(**kwargs: Any) -> str:
    with pytest.raises(UsageError) as info:
        resolve_settings(**kwargs)
    return str(info.value)


# ---- each layer alone, and all combinations ----------------------------------------------------


def test_defaults_alone() -> None:
    settings = resolve_settings(environ={})
    assert settings == Settings()
    assert settings.dataset == "mvtec"
    assert settings.root is None and settings.category is None
    assert settings.seed == 0 and settings.device == "auto"
    assert settings.students.preset == "paper"
    assert settings.students.epochs == 100 and settings.students.image_size == 256
    assert settings.students.patch_sizes == list(PATCH_SIZES)
    assert settings.teacher.iterations == 50_000


def test_file_alone(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, 'category = "wood"\nseed = 7\nroot = "/data/mvtec"\n'
                          "[students]\nepochs = 5\n[calibrate]\ntarget_fpr = 0.05\n")
    settings = resolve_settings(config_file=cfg, environ={})
    assert settings.category == "wood"
    assert settings.seed == 7
    assert settings.root == Path("/data/mvtec")
    assert settings.students.epochs == 5
    assert settings.calibrate.target_fpr == 0.05
    # Keys the file does not set keep their defaults.
    assert settings.students.lr == Settings().students.lr
    assert settings.dataset == "mvtec"


def test_environment_alone() -> None:
    environ = {"STAD_CATEGORY": "tile", "STAD_STUDENTS__EPOCHS": "4", "STAD_SEED": "3",
               "HOME": "/home/someone", "PATH": "/usr/bin", "STADIUM": "not ours"}
    settings = resolve_settings(environ=environ)
    assert settings.category == "tile"
    assert settings.students.epochs == 4  # the string "4" is validated into an int
    assert isinstance(settings.students.epochs, int)
    assert settings.seed == 3


def test_flags_alone() -> None:
    settings = resolve_settings({"category": "grid", "students": {"epochs": 3}}, environ={})
    assert settings.category == "grid"
    assert settings.students.epochs == 3


def test_none_flags_do_not_hide_lower_layers() -> None:
    # Options the user did not give arrive as None and must not override the environment.
    flags = {"category": None, "seed": None, "students": {"epochs": None, "preset": None}}
    environ = {"STAD_CATEGORY": "env-cat", "STAD_STUDENTS__EPOCHS": "9"}
    settings = resolve_settings(flags, environ=environ)
    assert settings.category == "env-cat"
    assert settings.students.epochs == 9
    assert settings.seed == 0


@pytest.mark.parametrize(("use_file", "use_env", "use_flags"),
                         list(itertools.product([False, True], repeat=3)))
def test_precedence_of_every_combination(tmp_path: Path, use_file: bool, use_env: bool,
                                         use_flags: bool) -> None:
    # Each layer sets category and students.epochs to its own value; seed only in the file and
    # lr only in the environment, so that a higher layer must not erase a lower one's keys.
    cfg = _toml(tmp_path, 'category = "file"\nseed = 11\n[students]\nepochs = 1\n')
    environ = {"STAD_CATEGORY": "env", "STAD_STUDENTS__EPOCHS": "2", "STAD_STUDENTS__LR": "0.5"}
    flags = {"category": "flag", "students": {"epochs": 3}}
    settings = resolve_settings(flags if use_flags else None,
                                config_file=cfg if use_file else None,
                                environ=environ if use_env else {})
    expected = ("flag", 3) if use_flags else ("env", 2) if use_env else \
        ("file", 1) if use_file else (None, 100)
    assert (settings.category, settings.students.epochs) == expected
    assert settings.seed == (11 if use_file else 0)
    assert settings.students.lr == (0.5 if use_env else 1e-4)


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("STAD_") and n != "STAD_CACHE"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STAD_CATEGORY", "from-os-environ")
    monkeypatch.setenv("STAD_STUDENTS__EPOCHS", "6")
    settings = resolve_settings()
    assert settings.category == "from-os-environ"
    assert settings.students.epochs == 6


def test_settings_json_round_trip(tmp_path: Path) -> None:
    # The resolved settings are recorded in artifacts as JSON; they must read back equal.
    settings = resolve_settings({"root": tmp_path, "students": {"preset": "fast"}}, environ={})
    assert Settings.model_validate(json.loads(json.dumps(settings.model_dump(mode="json")))
                                   ) == settings


def test_settings_know_the_networks_patch_sizes() -> None:
    from stad import config, networks

    assert config.PATCH_SIZES == networks.PATCH_SIZES


# ---- STAD_CONFIG -------------------------------------------------------------------------------


def test_stad_config_selects_the_file(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, 'category = "chosen-by-env"\n[students]\nepochs = 12\n')
    settings = resolve_settings(environ={"STAD_CONFIG": str(cfg), "STAD_DEBUG": "1"})
    assert settings.category == "chosen-by-env"
    assert settings.students.epochs == 12


def test_explicit_config_file_beats_stad_config(tmp_path: Path) -> None:
    given = _toml(tmp_path, 'category = "given"\n', name="given.toml")
    from_env = _toml(tmp_path, 'category = "from-env"\n', name="env.toml")
    settings = resolve_settings(config_file=given, environ={"STAD_CONFIG": str(from_env)})
    assert settings.category == "given"


def test_an_empty_stad_config_is_refused_not_taken_for_no_file() -> None:
    # STAD_CONFIG=$CI_CONFIG with the variable never set ran on the defaults without a word.
    assert "STAD_CONFIG is set but empty" in _usage_error(environ={"STAD_CONFIG": ""})
    assert resolve_settings(environ={}) == Settings()


def test_stad_config_naming_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    message = _usage_error(environ={"STAD_CONFIG": str(missing)})
    assert str(missing) in message and "does not exist" in message


# ---- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "key"), [
    ("[students]\nepochz = 3\n", "students.epochz"),
    ('categori = "wood"\n', "categori"),
    ("[student]\nepochs = 3\n", "student"),
])
def test_unknown_key_in_file(tmp_path: Path, text: str, key: str) -> None:
    cfg = _toml(tmp_path, text)
    message = _usage_error(config_file=cfg, environ={})
    assert f"unknown setting '{key}'" in message
    assert f"config file {cfg}" in message


@pytest.mark.parametrize(("name", "key"), [
    ("STAD_STUDENTS__EPOCHZ", "students.epochz"),
    ("STAD_CATEGORI", "categori"),
    ("STAD_STUDENT__EPOCHS", "student"),  # a table that does not exist: its variable named
])
def test_unknown_key_in_environment(name: str, key: str) -> None:
    message = _usage_error(environ={name: "3"})
    assert f"unknown setting '{key}'" in message
    assert f"environment variable {name}" in message


def test_a_bad_value_in_the_environment_names_its_variable() -> None:
    message = _usage_error(environ={"STAD_STUDENTS__EPOCHS": "ten"})
    assert "setting 'students.epochs'" in message
    assert "environment variable STAD_STUDENTS__EPOCHS" in message


def test_unknown_key_in_flags() -> None:
    message = _usage_error(flags={"students": {"epochz": 3}}, environ={})
    assert "unknown setting 'students.epochz'" in message
    assert "command line" in message
    assert message.endswith("did you mean 'epochs'?")


def test_an_unknown_key_names_what_its_table_takes() -> None:
    # The hint serves the command line and Python alike (it said `stad <command> --help`).
    assert "did you mean 'batch_size'?" in _usage_error(flags={"score": {"batchsize": 2}},
                                                        environ={})
    message = _usage_error(flags={"score": {"zzz": 1}}, environ={})
    assert "'score' takes batch_size, fused, image_score" in message
    assert "did you mean 'root'?" in _usage_error(flags={"rooot": "x"}, environ={})
    assert ("it belongs in a table: students.epochs (in Python students={'epochs': ...}, in a "
            "config file under [students])") in _usage_error(flags={"epochs": 3}, environ={})


def test_unknown_key_is_attributed_to_its_own_layer(tmp_path: Path) -> None:
    # A valid key in every layer plus one misspelt key in the file: the message names the file.
    cfg = _toml(tmp_path, "[students]\nepochs = 1\nlearning_rate = 0.1\n")
    message = _usage_error(flags={"students": {"epochs": 2}}, config_file=cfg,
                           environ={"STAD_STUDENTS__EPOCHS": "3"})
    assert "students.learning_rate" in message and f"config file {cfg}" in message
    assert "environment" not in message and "command line" not in message


def test_cache_variable_is_not_a_setting(tmp_path: Path) -> None:
    # STAD_CACHE is read by stad.fsutil.cache_dir (documented in docs/usage.md); it is an
    # option like STAD_CONFIG and must not be reported as an unknown setting.
    settings = resolve_settings(environ={"STAD_CACHE": str(tmp_path)})
    assert settings == Settings()


def test_table_variable_and_key_variable_together() -> None:
    # STAD_STUDENTS (a table given a plain value) next to STAD_STUDENTS__EPOCHS: whatever order
    # the environment lists them in, the result is a UsageError, not a TypeError.
    for environ in ({"STAD_STUDENTS": "x", "STAD_STUDENTS__EPOCHS": "5"},
                    {"STAD_STUDENTS__EPOCHS": "5", "STAD_STUDENTS": "x"}):
        message = _usage_error(environ=environ)
        assert "students" in message.lower()


# ---- wrong types and values --------------------------------------------------------------------


@pytest.mark.parametrize("source", ["file", "environment", "command line"])
def test_wrong_type_names_key_and_source(tmp_path: Path, source: str) -> None:
    cfg = _toml(tmp_path, '[students]\nepochs = "ten"\n')
    kwargs: dict[str, Any] = {
        "file": {"config_file": cfg, "environ": {}},
        "environment": {"environ": {"STAD_STUDENTS__EPOCHS": "ten"}},
        "command line": {"flags": {"students": {"epochs": "ten"}}, "environ": {}},
    }[source]
    message = _usage_error(**kwargs)
    assert "setting 'students.epochs'" in message
    assert '"ten"' in message
    assert (f"config file {cfg}" if source == "file" else source) in message


@pytest.mark.parametrize(("flags", "key"), [
    ({"seed": "many"}, "seed"),
    ({"device": "tpu"}, "device"),
    ({"students": {"epochs": 0}}, "students.epochs"),
    ({"students": {"n_students": 1}}, "students.n_students"),
    ({"calibrate": {"target_fpr": 1.5}}, "calibrate.target_fpr"),
    ({"score": {"image_score": "mean"}}, "score.image_score"),
    ({"students": 5}, "students"),
])
def test_bad_value_names_key(flags: dict[str, Any], key: str) -> None:
    message = _usage_error(flags=flags, environ={})
    assert f"setting '{key}'" in message


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, 'seed = "x"\n[students]\nepochz = 1\n')
    message = _usage_error(config_file=cfg, environ={})
    assert "setting 'seed'" in message and "students.epochz" in message


# ---- presets -----------------------------------------------------------------------------------


def test_fast_preset_fills_the_student_settings() -> None:
    settings = resolve_settings({"students": {"preset": "fast"}}, environ={})
    assert (settings.students.image_size, settings.students.epochs,
            settings.students.crop_size, settings.students.precision) == (256, 3, 64, "auto")
    assert settings.students.patch_sizes == [17, "17@128", "33@128"]
    given = resolve_settings({"students": {"preset": "fast", "patch_sizes": "17,33,65"}},
                             environ={})
    assert given.students.patch_sizes == [17, 33, 65]  # what the user sets wins
    assert (settings.students.min_steps, settings.students.n_students) == (900, 2)
    assert settings.students.lr_schedule == "cosine"
    exact = resolve_settings({"students": {"preset": "fast", "epochs": 2}}, environ={})
    assert (exact.students.epochs, exact.students.min_steps) == (2, 0)  # epochs given: exact
    for key, value in STUDENT_PRESETS["fast"].items():
        assert getattr(settings.students, key) == value


@pytest.mark.parametrize(("size", "scales"), [
    (None, [17, "17@128", "33@128"]), (256, [17, "17@128", "33@128"]),
    (128, [17, "17@64", "33@64"]), ("512", [17, "17@256", "33@256"]),
    ("128.0", [17, "17@64", "33@64"]), (34, [17, "17@17", "33@17"])])
def test_preset_scales_keep_their_share_at_another_image_size(
        monkeypatch: pytest.MonkeyPatch, size: int | str | None, scales: list[int | str]) -> None:
    # A preset whose smaller scales work at half its image size keeps them at half of the
    # size the user gives (from any layer); scales the user gives are taken as they are.
    monkeypatch.setitem(STUDENT_PRESETS, "fast", {**STUDENT_PRESETS["fast"], "image_size": 256,
                                                  "patch_sizes": [17, "17@128", "33@128"]})
    environ = {} if size is None else {"STAD_STUDENTS__IMAGE_SIZE": str(size)}
    students = resolve_settings({"students": {"preset": "fast"}}, environ=environ).students
    assert students.patch_sizes == scales
    assert students.image_size == (256 if size is None else int(float(size)))
    given = resolve_settings({"students": {"preset": "fast", "image_size": 128,
                                           "patch_sizes": "17,17@32"}}, environ={}).students
    assert given.patch_sizes == [17, "17@32"]


@pytest.mark.parametrize("size", [33, 101, 32])
def test_preset_scales_that_cannot_keep_their_share_are_refused(
        monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setitem(STUDENT_PRESETS, "fast", {**STUDENT_PRESETS["fast"], "image_size": 256,
                                                  "patch_sizes": [17, "17@128", "33@128"]})
    message = _usage_error(flags={"students": {"preset": "fast", "image_size": size}},
                           environ={})
    assert f"students.image_size {size}: the fast preset's scale 17@128 works at 1/2" in message
    assert "multiple of 2 and at least 34" in message and "students.patch_sizes" in message


def test_paper_preset_is_the_default() -> None:
    students = resolve_settings(environ={}).students
    assert (students.image_size, students.epochs, students.crop_size, students.batch_size) == (
        256, 100, None, 1)
    for key, value in STUDENT_PRESETS["paper"].items():
        assert getattr(students, key) == value


@pytest.mark.parametrize(("preset_from", "value_from"),
                         list(itertools.product(["file", "environment", "command line"],
                                                repeat=2)))
def test_explicit_value_beats_preset_from_any_layer(tmp_path: Path, preset_from: str,
                                                    value_from: str) -> None:
    file_lines: list[str] = []
    environ: dict[str, str] = {}
    flags: dict[str, Any] = {"students": {}}
    for layer, key, value in ((preset_from, "preset", "fast"), (value_from, "epochs", 7)):
        if layer == "file":
            file_lines.append(f"{key} = {value!r}".replace("'", '"'))
        elif layer == "environment":
            environ[f"STAD_STUDENTS__{key.upper()}"] = str(value)
        else:
            flags["students"][key] = value
    cfg = _toml(tmp_path, "[students]\n" + "\n".join(file_lines) + "\n")
    students = resolve_settings(flags, config_file=cfg, environ=environ).students
    assert students.preset == "fast"
    assert students.epochs == 7  # explicit
    assert (students.image_size, students.crop_size) == (256, 64)  # from the preset


def test_unknown_preset_name() -> None:
    message = _usage_error(environ={"STAD_STUDENTS__PRESET": "turbo"})
    assert "setting 'students.preset'" in message and "environment" in message


def test_preset_of_the_wrong_type_is_a_usage_error(tmp_path: Path) -> None:
    # A list (TOML) or a table is not hashable; the preset lookup must not crash on it.
    cfg = _toml(tmp_path, '[students]\npreset = ["fast"]\n')
    assert "students.preset" in _usage_error(config_file=cfg, environ={})
    assert "students.preset" in _usage_error(flags={"students": {"preset": {"a": 1}}},
                                             environ={})


# ---- patch sizes -------------------------------------------------------------------------------


def test_patch_sizes_as_comma_separated_string() -> None:
    settings = resolve_settings({"students": {"patch_sizes": "33, 17"}},
                                environ={"STAD_TEACHER__PATCH_SIZES": "17,33"})
    assert settings.students.patch_sizes == [17, 33]
    assert settings.teacher.patch_sizes == [17, 33]


def test_patch_sizes_as_list(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "[students]\npatch_sizes = [65, 17, 65]\n"
                          "[teacher]\npatch_sizes = [33]\n")
    settings = resolve_settings(config_file=cfg, environ={})
    assert settings.students.patch_sizes == [17, 65]  # sorted, duplicates removed
    assert settings.teacher.patch_sizes == [33]


@pytest.mark.parametrize("value", ["17,30", "", "16", "17,abc", [], [17, 99]])
def test_invalid_patch_sizes(value: Any) -> None:
    message = _usage_error(flags={"students": {"patch_sizes": value}}, environ={})
    assert "students.patch_sizes" in message


def test_bad_patch_size_element_in_file_names_the_file(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, '[students]\npatch_sizes = [17, "x"]\n')
    message = _usage_error(config_file=cfg, environ={})
    assert "students.patch_sizes" in message
    assert f"config file {cfg}" in message  # not "defaults": the value came from the file


# ---- the file itself ---------------------------------------------------------------------------


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "[students\nepochs = = 3\n")
    message = _usage_error(config_file=cfg, environ={})
    assert str(cfg) in message and "not valid TOML" in message


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    message = _usage_error(config_file=missing, environ={})
    assert str(missing) in message and "does not exist" in message


def test_folder_as_config_file(tmp_path: Path) -> None:
    message = _usage_error(config_file=tmp_path, environ={})
    assert str(tmp_path) in message


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes('category = "Düsseldorf"\n'.encode("latin-1"))
    message = _usage_error(config_file=cfg, environ={})
    assert str(cfg) in message


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert resolve_settings(config_file=_toml(tmp_path, ""), environ={}) == Settings()


@pytest.mark.parametrize("section", ["teacher", "students"])
def test_image_size_has_an_upper_bound(section: str) -> None:
    from pydantic import ValidationError

    from stad.config import MAX_IMAGE_SIZE, Settings

    Settings.model_validate({section: {"image_size": MAX_IMAGE_SIZE}})
    with pytest.raises(ValidationError, match="less than or equal to 4096"):
        Settings.model_validate({section: {"image_size": MAX_IMAGE_SIZE + 1}})
